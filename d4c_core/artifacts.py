"""Quantized artifacts: real integer weights on disk, checksummed, and loaded back.

An artifact is a directory::

    model.safetensors   integer weight codes (+ fp16 scales, uint8 zero points) of every
                        QuantLayer, activation quantizer ranges, every FP tensor as-is
    report.json         what the job measured (accuracy, timings, ...)
    manifest.json       format, model spec + fingerprint, recipe, versions, sha256 of files
    <extra files>       e.g. calibration.png

Why integers and not the fake-quant state dict: the FP weight must not ship (it is the thing
being compressed), and the file size is part of the product (W4 ~ 1/8 of FP32). Loading
dequantizes the codes once into ``QuantLayer.weight`` and switches weight fake quantization
off, so the loaded model computes exactly what the in-memory fake-quant model computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import open_clip
import safetensors
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from d4c_core.errors import ArtifactError, CheckpointError, SpecError
from d4c_core.models import ModelSpec, _eval_transform, create_architecture, load_state_into
from d4c_core.quant.wrap import QuantLayer, quant_layers, quantize_, set_quant_state
from d4c_core.recipe import Recipe

log = logging.getLogger(__name__)

FORMAT = "d4c-quantized"
FORMAT_VERSION = 1
META_KEY = "d4c"
MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.json"
_RESERVED = (MODEL_FILE, REPORT_FILE, MANIFEST_FILE)
# State-dict entries of a QuantLayer that the artifact replaces by qweight/wscale/wzero.
_REPLACED = ("weight", "weight_quant.scale", "weight_quant.zero_point", "weight_quant.alpha")
_QSUFFIXES = (".qweight", ".wscale", ".wzero")
# fp16 range: the smallest positive subnormal keeps a scale from flushing to 0 (then W/s is
# inf); the largest finite keeps it from becoming inf.
_FP16_MIN, _FP16_MAX = 2.0**-24, 65504.0


# --------------------------------------------------------------------------- packing


def pack_int(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes in ``[0, 2^bits-1]`` -> flat uint8; bits <= 4 two per byte, low nibble first.

    Row-major flatten; an odd count is padded with one zero nibble.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise ValueError(f"codes outside [0, {2**bits - 1}] for {bits} bits")
    u = flat.to(torch.uint8)
    if bits > 4:
        return u.cpu()
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return (u[0::2] | (u[1::2] << 4)).cpu()


def unpack_int(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_int`: the first ``numel`` codes as a flat int64 tensor."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    expected = (numel + 1) // 2 if bits <= 4 else numel
    if packed.numel() != expected:
        raise ValueError(
            f"{packed.numel()} packed bytes, expected {expected} for {numel} {bits}-bit codes"
        )
    if bits <= 4:
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]
    else:
        codes = packed
    codes = codes.to(torch.int64)
    if codes.numel() and int(codes.max()) > 2**bits - 1:
        raise ValueError(f"code {int(codes.max())} does not fit {bits} bits")
    return codes


# --------------------------------------------------------------------------- scales


def finalize_scales_(model: nn.Module) -> int:
    """Round every QuantLayer's weight scale, in place, to fp16 precision; return how many changed.

    The artifact stores scales in fp16. Rounding the in-memory scale the same way makes the
    fake-quant model and the exported integer model bit-identical. Run it right after range
    init: in HARD mode the codes are ``floor(W/s) + (alpha >= 0) + zp``, so moving ``s`` after
    the rounding decisions were learned could flip some of them. Idempotent.
    """
    changed = 0
    with torch.no_grad():
        for info in quant_layers(model):
            s = info.module.weight_quant.scale
            r = s.clamp(_FP16_MIN, _FP16_MAX).half().float()
            changed += int((r != s).sum())
            s.copy_(r)
    return changed


# --------------------------------------------------------------------------- export


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "size": path.stat().st_size}


def _d4c_version() -> str:
    try:
        return importlib_metadata.version("d4c-service")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def _versions() -> dict[str, str]:
    return {
        "d4c_core": _d4c_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _check_extra_name(name: str) -> None:
    """Extra files live directly in the artifact dir: plain names only, no overwriting ours."""
    if not name or Path(name).name != name or name in (".", "..") or name in _RESERVED:
        raise ArtifactError(f"extra file name {name!r} is not allowed")


def _quant_tensors(info_name: str, layer: QuantLayer) -> dict[str, Tensor]:
    wq = layer.weight_quant
    codes = wq.int_weight(layer.weight.detach()).round().to(torch.int64)
    out = {
        f"{info_name}.qweight": pack_int(codes, wq.bits),
        f"{info_name}.wscale": wq.scale.detach().reshape(-1).cpu().half(),
        f"{info_name}.wzero": wq.zero_point.detach().reshape(-1).cpu().round().to(torch.uint8),
    }
    return out


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Serialize in memory, then write with Python I/O: a full or read-only disk then raises
    ``OSError`` with its errno (``safetensors.save_file`` turns it into an opaque
    ``SafetensorError``), which callers map to a clear storage error."""
    data = save(tensors, metadata=metadata)
    with path.open("wb") as f:
        f.write(data)


def export(
    model: nn.Module,
    spec: ModelSpec,
    recipe: Recipe,
    out_dir: Path,
    *,
    fingerprint: str,
    report: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Write the artifact of a quantized (``quantize_``-wrapped, range-initialized) model.

    ``spec`` is the spec the FP model came from. Weight codes are the quantizer's current
    decision (HARD AdaRound or NEAREST). ``out_dir`` must exist; the caller makes it appear
    atomically (temp dir + rename). Returns the manifest.
    """
    out_dir = Path(out_dir)
    extra_files = dict(extra_files or {})
    for name, src in extra_files.items():
        _check_extra_name(name)
        if not Path(src).is_file():
            raise ArtifactError(f"extra file {name!r}: {src} does not exist")
    layers = quant_layers(model)
    if not layers:
        raise ArtifactError("model has no quantized layers (was quantize_ applied?)")
    changed = finalize_scales_(model)
    if changed:
        log.warning(
            "export: %d weight scales were not fp16-finalized; the exported model may differ "
            "slightly from the one evaluated (call finalize_scales_ right after range init)",
            changed,
        )

    tensors: dict[str, Tensor] = {}
    replaced: set[str] = set()
    layer_bits: dict[str, list[int]] = {}
    layer_shapes: dict[str, list[int]] = {}
    with torch.no_grad():
        for info in layers:
            mod = info.module
            tensors.update(_quant_tensors(info.name, mod))
            replaced.update(f"{info.name}.{k}" for k in _REPLACED)
            layer_bits[info.name] = [mod.weight_quant.bits, mod.act_quant.bits]
            layer_shapes[info.name] = list(mod.weight.shape)
        seen_storage: set[int] = set()
        for key, t in model.state_dict().items():
            if key in replaced:
                continue
            if key in tensors:
                raise ArtifactError(f"state dict key {key!r} collides with a quantized tensor")
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:  # safetensors refuses shared storage
                t = t.clone()
            seen_storage.add(ptr)
            tensors[key] = t

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "recipe": recipe.to_json(),
        "arch": spec.arch,
        "layer_bits": json.dumps(layer_bits, sort_keys=True),
        # Codes are stored flat; the shape lets readers (weight_bytes, load) check the count.
        "layer_shapes": json.dumps(layer_shapes, sort_keys=True),
    }
    # One metadata key: safetensors writes several in random order, and the same model must
    # give the same bytes (resume is checked against an uninterrupted run by sha256).
    write_safetensors(
        out_dir / MODEL_FILE, tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)}
    )
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for name, src in extra_files.items():
        shutil.copyfile(src, out_dir / name)

    files = {n: _file_entry(out_dir / n) for n in (MODEL_FILE, REPORT_FILE, *extra_files)}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {**spec.to_dict(), "fingerprint": fingerprint},
        "recipe": recipe.to_dict(),
        "seed": recipe.seed,
        "versions": _versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True)
    (out_dir / MANIFEST_FILE).write_text(text + "\n")
    return json.loads(text)  # what verify() will read back (tuples become lists)


# --------------------------------------------------------------------------- verify / load


def verify(out_dir: Path) -> dict[str, Any]:
    """Check the manifest and every listed file's size and sha256; return the manifest."""
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(f"{out_dir.name}: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{MANIFEST_FILE} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST_FILE} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {manifest.get('format_version')!r} not supported "
            f"(expected {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise ArtifactError(f"{MANIFEST_FILE} does not list {MODEL_FILE}")
    for name, entry in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ArtifactError(f"{MANIFEST_FILE} lists an invalid file name {name!r}")
        if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
            raise ArtifactError(f"{MANIFEST_FILE}: entry for {name} lacks sha256/size")
        path = out_dir / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {name} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(f"{name}: size {size} != {entry['size']} in manifest")
        if _sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{name}: sha256 checksum mismatch (file corrupted or modified)")
    return manifest


@dataclass
class LoadedQuantized:
    """A quantized CLIP loaded from an artifact, ready to encode (eval mode, no grads)."""

    model: nn.Module
    recipe: Recipe
    manifest: dict[str, Any]
    tokenizer: Any
    preprocess: Any


def _file_meta(raw: dict[str, str] | None) -> dict[str, str]:
    """The artifact's metadata fields, stored as one JSON object under ``META_KEY``."""
    try:
        meta = json.loads((raw or {})[META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{MODEL_FILE} has no valid {META_KEY!r} metadata") from e
    if not isinstance(meta, dict):
        raise ArtifactError(f"{MODEL_FILE} metadata is not an object")
    return meta


def _read_model_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _file_meta(f.metadata())
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path.name} is not a valid safetensors file ({e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(f"{path.name} is not a {FORMAT} v{FORMAT_VERSION} file")
    return tensors, meta


def _json_meta(meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{MODEL_FILE} metadata lacks a valid {key!r}") from e


def load_quantized(out_dir: Path, device: str | torch.device = "cpu") -> LoadedQuantized:
    """Verify an artifact and rebuild its model with the dequantized integer weights.

    Weight fake quantization is off (the weight already is ``(q - zp) * s``); every
    activation quantizer is on with its stored range.
    """
    out_dir = Path(out_dir)
    manifest = verify(out_dir)
    try:
        recipe = Recipe.from_dict(manifest["recipe"])
        arch = manifest["model"]["arch"]
    except (KeyError, TypeError, SpecError) as e:
        raise ArtifactError(f"{MANIFEST_FILE}: bad recipe or model entry ({e})") from e
    tensors, meta = _read_model_file(out_dir / MODEL_FILE)
    if meta.get("arch") != arch:
        raise ArtifactError(f"{MODEL_FILE} is for {meta.get('arch')!r}, manifest says {arch!r}")
    try:
        same_recipe = Recipe.from_json(meta.get("recipe", "")) == recipe
    except SpecError:
        same_recipe = False
    if not same_recipe:
        raise ArtifactError(f"{MODEL_FILE} recipe differs from the manifest's")
    layer_bits = _json_meta(meta, "layer_bits")

    try:
        model = create_architecture(arch)
    except Exception as e:  # open_clip raises RuntimeError for unknown archs
        raise ArtifactError(f"cannot build architecture {arch!r} ({e})") from e
    quantize_(model, recipe.quant)
    layers = quant_layers(model)
    if sorted(layer_bits) != sorted(i.name for i in layers):
        raise ArtifactError(f"{MODEL_FILE}: quantized layers do not match {arch} + recipe")

    state: dict[str, Tensor] = {}
    for info in layers:
        mod, name = info.module, info.name
        wq = mod.weight_quant
        if layer_bits[name] != [wq.bits, mod.act_quant.bits]:
            raise ArtifactError(f"{name}: bits {layer_bits[name]} != recipe's")
        try:
            packed = tensors.pop(f"{name}.qweight")
            scale = tensors.pop(f"{name}.wscale").float().reshape(wq.scale.shape)
            zp = tensors.pop(f"{name}.wzero").float().reshape(wq.zero_point.shape)
            q = unpack_int(packed, wq.bits, mod.weight.numel()).reshape(mod.weight.shape)
        except KeyError as e:
            raise ArtifactError(f"{MODEL_FILE}: missing tensor {e.args[0]}") from e
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"{MODEL_FILE}: layer {name}: {e}") from e
        # Same expression as WeightQuantizer.forward, so the result is bit-identical.
        state[f"{name}.weight"] = (q.float() - zp) * scale
        state[f"{name}.weight_quant.scale"] = scale
        state[f"{name}.weight_quant.zero_point"] = zp
        state[f"{name}.weight_quant.alpha"] = torch.zeros_like(mod.weight)
    leftover = [k for k in tensors if k.endswith(_QSUFFIXES) and k.rsplit(".", 1)[0] in layer_bits]
    if leftover:
        raise ArtifactError(f"{MODEL_FILE}: unexpected tensor {leftover[0]}")
    state.update(tensors)
    try:
        load_state_into(model, state, MODEL_FILE)
    except CheckpointError as e:
        raise ArtifactError(str(e)) from e

    set_quant_state(model, weights=False, acts=True)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedQuantized(
        model=model,
        recipe=recipe,
        manifest=manifest,
        tokenizer=open_clip.get_tokenizer(arch),
        preprocess=_eval_transform(model),
    )


# --------------------------------------------------------------------------- summaries


def weight_bytes(out_dir: Path) -> dict[str, int]:
    """Bytes of the quantized weights (codes + scales + zero points) vs the same weights in FP32.

    Only the QuantLayer weights count: that is what quantization compresses; FP tensors
    (embeddings, norms) are the same size either way.
    """
    path = Path(out_dir) / MODEL_FILE
    quantized = 0
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = _json_meta(_file_meta(f.metadata()), "layer_shapes")
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if key.endswith(_QSUFFIXES):
                    t = f.get_tensor(key)
                    quantized += t.numel() * t.element_size()
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{MODEL_FILE} is not readable ({e})") from e
    fp32 = sum(4 * math.prod(shape) for shape in shapes.values())
    return {"quantized_bytes": quantized, "fp32_bytes": fp32}


def inspect(out_dir: Path) -> dict[str, Any]:
    """Verify an artifact and summarize it: what it is, how big, and what the job measured."""
    out_dir = Path(out_dir)
    manifest = verify(out_dir)
    wb = weight_bytes(out_dir)
    report: dict[str, Any] = {}
    if REPORT_FILE in manifest["files"]:
        try:
            report = json.loads((out_dir / REPORT_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{REPORT_FILE} is not valid JSON ({e})") from e
    model = manifest.get("model", {})
    return {
        "arch": model.get("arch"),
        "model": model,
        "recipe": manifest.get("recipe"),
        "created": manifest.get("created"),
        "versions": manifest.get("versions"),
        "files": {n: e["size"] for n, e in manifest["files"].items()},
        "checksums": "ok",
        "weights": {
            **wb,
            "ratio": wb["quantized_bytes"] / wb["fp32_bytes"] if wb["fp32_bytes"] else None,
        },
        "metrics": report.get("metrics") if isinstance(report, dict) else None,
    }
