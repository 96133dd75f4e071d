"""ONNX export of a CLIP, FP32 or quantized: ``image_encoder.onnx`` and ``text_encoder.onnx``.

Each graph is one tower's ``encode_*`` (unnormalized embedding, as the evaluator receives
it before its own L2 normalization) with a dynamic batch axis.

A quantized model is exported in QDQ form. Why this route: the TorchScript exporter keeps a
parameter's state-dict name on its initializer when constant folding is off, so every
QuantLayer weight is exported as a float initializer first and then *replaced* by graph
surgery with its integer codes (UINT8, or UINT4 for <= 4 bits, opset 21) feeding a per-channel
DequantizeLinear; no float copy of a quantized weight stays in the file. The codes are
recovered exactly from the model (``round(W/s) + zp``, checked to reproduce ``W``).
Per-tensor activation quantizers are exported through ``torch.fake_quantize_per_tensor_affine``
(QuantizeLinear + DequantizeLinear, UINT8). The grid is unsigned ``[0, 2^b-1]``; for b < 8
the upper end is enforced by a float ``Min`` before QuantizeLinear (the lower end 0 is UINT8's
own), which gives exactly the same codes as the torch clamp: no approximation. Per-channel
activation quantizers (the inputs of q/k/v and MLP fc1) are written as the quantizer's own
arithmetic, ``clip(round(x / s), -z, qmax - z) * s``: no integer kernel can take a per-input-
channel scale (it sits inside the dot product), and ORT's per-axis QuantizeLinear runs
element by element, ~200x slower than the arithmetic. Same codes, same values.

A coded token table (``QuantEmbedding``) is looked up before it is dequantized: ``Gather``
on the UINT8 codes and on the per-row scale and zero point, then ``(q - zp) * s`` on the
rows looked up, so a text query never dequantizes the whole table. Gather has no UINT4
type, so a <= 4-bit table is stored UINT4 and dequantized whole (``DequantizeLinear``,
axis 0) before the lookup: the smallest file, at a per-query cost.

Each graph carries what a runtime needs besides the tensors, as ONNX metadata
(``metadata_props``): the image graph its input size and normalization, the text graph the
open_clip tokenizer and context length it expects.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import open_clip
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from d4c_core.errors import ArtifactError, SpecError
from d4c_core.quant.quantizers import ActQuantizer
from d4c_core.quant.wrap import QuantEmbedding, QuantLayer
from d4c_core.vocabulary import ONNX_IMAGE_FILE, ONNX_TEXT_FILE

IMAGE_FILE, TEXT_FILE = ONNX_IMAGE_FILE, ONNX_TEXT_FILE
# The TorchScript exporter goes to opset 20; the files are stamped 21 (UINT4 needs it). The
# operators changed from 20 to 21 (Q/DQ, Cast, Reshape, Shape, ...) only gained types, so a
# graph valid at 20 means the same at 21.
EXPORT_OPSET, FILE_OPSET = 20, 21


class _Encoder(nn.Module):
    """One tower of a CLIP as a module whose forward the exporter traces."""

    def __init__(self, model: nn.Module, tower: str) -> None:
        super().__init__()
        self.model = model
        self.tower = tower

    def forward(self, x: Tensor) -> Tensor:
        if self.tower == "image":
            return self.model.encode_image(x)
        return self.model.encode_text(x)


def _act_forward(self: ActQuantizer, x: Tensor) -> Tensor:
    """ActQuantizer's eval forward in ops the exporter turns into Min + Q/DQ (UINT8).

    Per channel, it is ``ActQuantizer.forward`` itself (Div, Round, Max, Min, Mul): ONNX
    Runtime's per-axis QuantizeLinear over the last axis quantizes element by element (about
    200x slower than per tensor), and its DequantizeLinear would be fused into a kernel that
    rejects per-channel zero points. Same codes, same values, exactly.
    """
    if not self.enabled:
        return x
    s = self.scale.detach().float()
    z = self.zero_point.detach().round().to(torch.int32)
    if self.channels:
        zf = z.float()
        return torch.clamp(torch.round(x / s), self.qmin - zf, self.qmax - zf) * s
    if self.bits < 8:  # keep codes on the b-bit grid: top code (qmax - z) * s, exactly
        x = torch.minimum(x, (self.qmax - z).float() * s)
    return torch.fake_quantize_per_tensor_affine(x, s.reshape(()), z.reshape(()), 0, 255)


def _table_forward(self: QuantEmbedding, ids: Tensor) -> Tensor:
    """The lookup on the raw table (a Gather on its initializer, rewritten afterwards)."""
    return torch.nn.functional.embedding(ids, self.weight)


def _layer_forward(self: QuantLayer, x: Tensor) -> Tensor:
    """QuantLayer's forward on the raw ``weight`` parameter (replaced by codes afterwards)."""
    x = self.act_quant(x)
    if self.is_conv:
        return torch.nn.functional.conv2d(x, self.weight, self.bias, **self.conv_args)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def weight_codes(layer: QuantLayer | QuantEmbedding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scale, zero_point)`` of a layer's weight, per output channel.

    A loaded artifact holds ``W = (q - zp) * s`` with weight fake quantization off; an
    in-memory model holds the FP weight and its quantizer's decision. Either way the codes
    must reproduce the weight the torch model computes with, or the export is refused.
    """
    wq = layer.weight_quant
    with torch.no_grad():
        if layer.quant_weight:
            codes = wq.int_weight(layer.weight)
            w = wq(layer.weight)
        else:
            codes = torch.clamp(torch.round(layer.weight / wq.scale) + wq.zero_point, 0, wq.qmax)
            w = layer.weight
        if not torch.equal((codes - wq.zero_point) * wq.scale, w):
            raise ArtifactError("a quantized weight is not on its integer grid")
    return (
        codes.to(torch.uint8).cpu().numpy(),
        wq.scale.detach().reshape(-1).float().cpu().numpy(),
        wq.zero_point.detach().reshape(-1).round().to(torch.uint8).cpu().numpy(),
    )


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[dict[str, QuantLayer | QuantEmbedding]]:
    """Swap quantizer forwards for export-friendly ones; yield the coded modules by weight name."""
    patched: list[nn.Module] = []
    layers: dict[str, QuantLayer | QuantEmbedding] = {}
    forwards = {
        ActQuantizer: _act_forward,
        QuantLayer: _layer_forward,
        QuantEmbedding: _table_forward,
    }
    for name, mod in model.named_modules():
        forward = forwards.get(type(mod))
        if forward is None:
            continue
        mod.forward = types.MethodType(forward, mod)  # type: ignore[method-assign]
        patched.append(mod)
        if not isinstance(mod, ActQuantizer):
            layers[f"model.{name}.weight"] = mod
    try:
        yield layers
    finally:
        for mod in patched:
            del mod.forward


def _dummy_input(model: nn.Module, tower: str) -> Tensor:
    """A batch of 2 with the tower's input shape (values do not matter to the trace)."""
    if tower == "image":
        size = model.visual.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return torch.zeros(2, 3, h, w)
    ctx = int(model.context_length)
    vocab = int(getattr(model, "vocab_size", 0) or model.token_embedding.num_embeddings)
    return (torch.arange(2 * ctx) % vocab).reshape(2, ctx).to(torch.int64)


def _trace(model: nn.Module, tower: str, path: Path) -> None:
    """TorchScript export of one tower, constant folding off so weight names survive.

    FP ``nn.MultiheadAttention`` in eval takes a fused fast path the exporter cannot trace
    (``aten::_native_multi_head_attention``; ViT-B-32's FP32 export failed on it): it is off
    for the trace, restored after.
    """
    names = ("image", "embedding") if tower == "image" else ("tokens", "embedding")
    enc = _Encoder(model, tower).eval()  # the exporter restores the wrapper's mode onto model
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                enc,
                (_dummy_input(model, tower),),
                str(path),
                dynamo=False,
                opset_version=EXPORT_OPSET,
                do_constant_folding=False,
                input_names=[names[0]],
                output_names=[names[1]],
                dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _int_tensor(name: str, values: np.ndarray, bits: int) -> TensorProto:
    """UINT4 for <= 4 bits (exact: the codes fit), packed two per byte in ``raw_data`` as
    the ONNX spec lays 4-bit tensors out (``make_tensor`` would spend a varint per value);
    UINT8 otherwise."""
    if bits <= 4:
        return numpy_helper.from_array(values.astype(ml_dtypes.uint4), name)
    return numpy_helper.from_array(values, name)


def _gather_table(proto: onnx.ModelProto, name: str, table: QuantEmbedding) -> bool:
    """Rewrite ``Gather(table, ids)`` as a lookup of codes, scale and zero point, then
    ``(float(q) - zp) * s`` on the looked-up rows. False when the table is not gathered
    that way (then it is dequantized whole, like a layer's weight)."""
    graph = proto.graph
    users = [n for n in graph.node if name in n.input]
    if table.weight_quant.bits <= 4 or len(users) != 1 or users[0].op_type != "Gather":
        return False
    gather = users[0]
    if gather.input[0] != name or any(a.name == "axis" and a.i != 0 for a in gather.attribute):
        return False
    codes, scale, zp = weight_codes(table)
    base = name.removesuffix(".weight")
    graph.initializer.remove(next(t for t in graph.initializer if t.name == name))
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes, f"{base}.qweight"),
            numpy_helper.from_array(scale.reshape(-1, 1), f"{base}.wscale"),
            numpy_helper.from_array(zp.reshape(-1, 1), f"{base}.wzero"),
        ]
    )
    ids, out = gather.input[1], gather.output[0]
    new = [
        helper.make_node("Gather", [f"{base}.{k}", ids], [f"{base}/{k}_rows"])
        for k in ("qweight", "wscale", "wzero")
    ] + [
        helper.make_node("Cast", [f"{base}/qweight_rows"], [f"{base}/qf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [f"{base}/wzero_rows"], [f"{base}/zf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{base}/qf", f"{base}/zf"], [f"{base}/centered"]),
        helper.make_node("Mul", [f"{base}/centered", f"{base}/wscale_rows"], [out]),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for i, node in enumerate(new):
        graph.node.insert(at + i, node)
    return True


def _replace_weights(proto: onnx.ModelProto, layers: dict[str, QuantLayer | QuantEmbedding]) -> int:
    """Turn each coded module's float initializer into codes -> DequantizeLinear (a table:
    codes -> Gather -> arithmetic, see ``_gather_table``).

    The DequantizeLinear output takes the initializer's name, so its consumers are unchanged.
    Returns how many weights were replaced.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    count = 0
    for name, layer in layers.items():
        if name not in inits:
            continue  # the other tower's layer: not in this graph
        count += 1
        if isinstance(layer, QuantEmbedding) and _gather_table(proto, name, layer):
            continue
        codes, scale, zp = weight_codes(layer)
        bits = layer.weight_quant.bits
        graph.initializer.remove(inits[name])
        base = name.removesuffix(".weight")
        graph.initializer.extend(
            [
                _int_tensor(f"{base}.qweight", codes, bits),
                numpy_helper.from_array(scale, f"{base}.wscale"),
                _int_tensor(f"{base}.wzero", zp, bits),
            ]
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{base}.qweight", f"{base}.wscale", f"{base}.wzero"],
                [name],
                name=f"{base}.dequantize",
                axis=0,
            )
        )
    for i, node in enumerate(nodes):  # before every consumer: a valid topological order
        graph.node.insert(i, node)
    return count


def graph_metadata(model: nn.Module, tower: str, arch: str | None) -> dict[str, str]:
    """What a runtime needs besides the graph: the image tower's input size and
    normalization (open_clip's eval preprocessing), the text tower's tokenizer."""
    if tower == "image":
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        size = size if isinstance(size, int) else size[0]
        return {
            "image_size": str(size),
            "mean": json.dumps([float(v) for v in cfg["mean"]]),
            "std": json.dumps([float(v) for v in cfg["std"]]),
            "interpolation": str(cfg.get("interpolation", "bicubic")),
            "resize_mode": str(cfg.get("resize_mode", "shortest")),
            "input": "float32 (N, 3, H, W), RGB in [0, 1], then (x - mean) / std",
        }
    meta = {
        "context_length": str(int(model.context_length)),
        "input": "int64 (N, context_length) token ids, end-of-text token = the largest id",
    }
    if arch is not None:
        tok = open_clip.get_tokenizer(arch)
        meta["tokenizer"] = f"open_clip.get_tokenizer({arch!r})"
        meta["tokenizer_class"] = type(tok).__name__
    return meta


def _export_tower(model: nn.Module, tower: str, path: Path, metadata: dict[str, str]) -> None:
    """Trace one tower, put integer weights in, stamp the opset and metadata, check, save."""
    with _export_mode(model) as layers:
        _trace(model, tower, path)
    proto = onnx.load(str(path))
    _replace_weights(proto, layers)
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = FILE_OPSET
    helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def ort_session(path: str | Path) -> Any:
    """An ONNX Runtime CPU session that computes what the torch quantized model computes.

    ORT fuses a weight DequantizeLinear into ``MatMulNBits``, whose default accuracy level
    (4) re-quantizes the *activation* to int8 blocks: not the exported grid, and measured at
    cosine 0.995 vs torch on a w6a6 tiny ViT. Level 1 keeps the activation in fp32 (0.9996+).
    The FP32 graphs are unaffected either way.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _source_arch(source: Any) -> str | None:
    """The open_clip arch a LoadedModel/QuantizedModel/LoadedQuantized was built as."""
    spec = getattr(source, "spec", None)
    if spec is not None:
        return str(spec.arch)
    manifest = getattr(source, "manifest", None)
    return manifest["model"]["arch"] if isinstance(manifest, dict) else None


def _as_model(source: Any) -> tuple[nn.Module, str | None]:
    """``(CLIP module, arch)`` from a module, a LoadedModel/LoadedQuantized/QuantizedModel,
    or an artifact dir; the arch is None for a bare module."""
    if isinstance(source, str | os.PathLike):
        from d4c_core.artifacts import load_quantized

        source = load_quantized(Path(source))
    model = getattr(source, "model", source)
    if not isinstance(model, nn.Module):
        raise SpecError(f"cannot export {type(source).__name__}: not a CLIP model")
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise SpecError(f"unsupported architecture {type(model).__name__} (needs a CLIP)")
    return model, _source_arch(source)


def export_onnx(source: Any, out_dir: str | Path) -> dict[str, Path]:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx`` for ``source`` into ``out_dir``.

    ``source``: an FP or quantized CLIP module, a ``LoadedModel``/``LoadedQuantized``, or an
    artifact directory (verified on load). The files are written to a temp dir beside
    ``out_dir`` and renamed, so ``out_dir`` appears only complete; it must not exist yet.
    The model is left as it was (eval mode, quantizers restored).
    """
    out = Path(out_dir)
    if out.exists():
        raise SpecError(f"{out}: already exists")
    model, arch = _as_model(source)
    training = model.training
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with torch.no_grad():
            for tower, fname in (("image", IMAGE_FILE), ("text", TEXT_FILE)):
                _export_tower(model, tower, tmp / fname, graph_metadata(model, tower, arch))
        tmp.rename(out)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ArtifactError | SpecError):
            raise
        # The message reaches service clients: no server path in it.
        detail = str(e).replace(str(tmp), "<export dir>").replace(str(out.parent), "<dir>")
        raise SpecError(f"ONNX export failed: {type(e).__name__}: {detail}") from e
    finally:
        model.train(training)
    return {"image": out / IMAGE_FILE, "text": out / TEXT_FILE}
