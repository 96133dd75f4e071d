"""ONNX export: FP32 graphs vs open_clip, QDQ graphs vs the torch quantized model, in ONNX
Runtime, and ``d4c export OUT --format onnx``.

Each quantized case quantizes a built-in tiny model with a budget of seconds (test_api's
FAST recipe at the case's bits), writes the artifact and exports it. The default run covers
every bit width and both models once (w8a8/w6a6 on the ViT, w4a8/w4a4 on the RN); the other
four combinations are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from d4c_core import export, load_model, load_quantized, quantize
from d4c_core.cli import main
from d4c_core.errors import ArtifactError, SpecError
from d4c_core.onnx_export import IMAGE_FILE, TEXT_FILE, export_onnx, ort_session
from d4c_core.quant.wrap import quant_layers
from d4c_core.testbed.tasks import tasks
from tests.core.test_api import FAST

ARCHS = ("d4c-tiny-vit", "d4c-tiny-rn")
PROMPTS = ["a red car", "an empty room", "two dogs on grass", "x", "a photo of a small bird"]
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
CASES = [
    ("d4c-tiny-vit", 8, 8),
    ("d4c-tiny-rn", 4, 8),
    ("d4c-tiny-vit", 6, 6),
    ("d4c-tiny-rn", 4, 4),
    pytest.param("d4c-tiny-rn", 8, 8, marks=pytest.mark.slow),
    pytest.param("d4c-tiny-vit", 4, 8, marks=pytest.mark.slow),
    pytest.param("d4c-tiny-rn", 6, 6, marks=pytest.mark.slow),
    pytest.param("d4c-tiny-vit", 4, 4, marks=pytest.mark.slow),
]


def _run(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The graph in ONNX Runtime, fully optimizing, as ``ort_session`` configures it."""
    sess = ort_session(path)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """8 testbed images and 5 prompts: not the batch of 2 the graphs were traced with.

    Testbed images, not noise: on N(0, 1) pixels a tiny w6a6 model is at its own float-noise
    floor (torch alone, input scaled by 1 + 1e-7: cosine 0.99897 on one sample), so a
    per-sample 0.999 bound there would test rounding ties, not the export.
    """
    images, _ = tasks()["object10"].split("test", 8)
    return images, tokenizer(PROMPTS)


def _cosines(model: torch.nn.Module, files: dict[str, Path], tokenizer) -> dict[str, list]:
    images, tokens = _inputs(tokenizer)
    with torch.no_grad():
        ref = {"image": model.encode_image(images), "text": model.encode_text(tokens)}
    got = {"image": _run(files["image"], images), "text": _run(files["text"], tokens)}
    return {k: F.cosine_similarity(got[k], ref[k], dim=-1).tolist() for k in ref}


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_export_matches_open_clip(arch: str, tmp_path: Path) -> None:
    lm = load_model(arch)
    files = export_onnx(lm, tmp_path / "onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [IMAGE_FILE, TEXT_FILE]
    for path in files.values():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    cos = _cosines(lm.model, files, lm.tokenizer)
    assert min(cos["image"]) >= 0.9999 and min(cos["text"]) >= 0.9999, cos
    assert not lm.model.training  # the caller's model is left in eval mode


def _quantized_artifact(arch: str, w: int, a: int, root: Path) -> Path:
    """W<=4 cases code the token table at 4 bits (UINT4, dequantized whole before the
    lookup), the others at 8 (UINT8 rows gathered first): both export paths are covered."""
    table = 4 if w <= 4 else 8
    recipe = FAST.replace(quant={"weight_bits": w, "act_bits": a, "token_embedding_bits": table})
    out = root / f"{arch}-w{w}a{a}"
    export(quantize(load_model(arch), recipe), out)
    return out


def _check_integer_weights(path: Path, model: torch.nn.Module, tower: str) -> None:
    """Every quantized weight of the tower is an integer initializer; no float copy of it."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    layers = [i for i in quant_layers(model) if i.tower == tower]
    assert layers
    floats = [numpy_helper.to_array(t) for t in inits.values() if t.data_type in FLOATS]
    for info in layers:
        bits = info.module.weight_quant.bits
        q = inits[f"model.{info.name}.qweight"]
        assert q.data_type == (TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8)
        assert inits[f"model.{info.name}.wzero"].data_type == q.data_type
        assert f"model.{info.name}.weight" not in inits
        w = info.module.weight.detach().numpy()
        assert not any(f.shape == w.shape and np.array_equal(f, w) for f in floats), info.name
    ops = [n.op_type for n in proto.graph.node]
    if tower == "text":  # the token table: codes + per-row scale, no float table
        table = model.token_embedding
        bits = table.weight_quant.bits
        q = inits["model.token_embedding.qweight"]
        assert q.data_type == (TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8)
        assert list(q.dims) == list(table.weight.shape)
        assert "model.token_embedding.weight" not in inits
        assert not any(f.size >= table.weight.numel() for f in floats)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    if any(i.module.act_quant.bits < 8 for i in layers):
        assert "Min" in ops  # the b-bit grid's top inside UINT8


@pytest.mark.parametrize(("arch", "w", "a"), CASES)
def test_quantized_export_matches_torch(arch: str, w: int, a: int, tmp_path: Path) -> None:
    art = _quantized_artifact(arch, w, a, tmp_path)
    files = export_onnx(art, tmp_path / "onnx")
    lq = load_quantized(art)
    for tower, path in files.items():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        assert onnx.load(str(path)).opset_import[0].version == 21
        _check_integer_weights(path, lq.model, tower)
    meta = {t: ort_session(p).get_modelmeta().custom_metadata_map for t, p in files.items()}
    assert int(meta["image"]["image_size"]) == 32  # both tiny models' input size
    assert json.loads(meta["image"]["mean"]) == pytest.approx(
        list(lq.preprocess.transforms[-1].mean)
    )
    assert meta["text"]["tokenizer"] == f"open_clip.get_tokenizer({arch!r})"
    assert int(meta["text"]["context_length"]) == lq.model.context_length
    cos = _cosines(lq.model, files, lq.tokenizer)
    print(f"{arch} w{w}a{a} cosine min image {min(cos['image']):.6f} text {min(cos['text']):.6f}")
    assert min(cos["image"]) >= 0.999 and min(cos["text"]) >= 0.999, cos


def test_export_refuses_bad_sources(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    with pytest.raises(ArtifactError):
        export_onnx(tmp_path / "junk", tmp_path / "onnx")
    with pytest.raises(SpecError, match="unsupported architecture"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]  # nothing half-written
    (tmp_path / "taken").mkdir()
    with pytest.raises(SpecError, match="already exists"):
        export_onnx(load_model("d4c-tiny-vit"), tmp_path / "taken")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantized_artifact("d4c-tiny-vit", 4, 8, tmp_path_factory.mktemp("cli"))


def test_cli_export_writes_onnx_beside_a_valid_artifact(artifact: Path, capsys) -> None:
    assert main(["export", str(artifact), "--format", "onnx"]) == 0
    assert sorted(p.name for p in (artifact / "onnx").iterdir()) == [IMAGE_FILE, TEXT_FILE]
    assert main(["inspect", str(artifact)]) == 0  # still a verified artifact
    capsys.readouterr()
    assert main(["export", str(artifact)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(artifact), "--overwrite"]) == 0
    assert not list(artifact.glob(".onnx*"))


def test_cli_export_bad_input_is_one_error_line(artifact: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "plain").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "plain"):
        assert main(["export", str(bad), "--format", "onnx"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in artifact.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    model_file = next(p for p in broken.iterdir() if p.suffix == ".safetensors")
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"\0")
    assert main(["export", str(broken), "--dest", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o").exists() and not (broken / "onnx").exists()
    with pytest.raises(SystemExit) as e:
        main(["export", str(artifact), "--format", "tflite"])
    assert e.value.code == 2


@pytest.mark.slow
def test_fp32_export_of_a_real_size_vit(tmp_path: Path) -> None:
    """ViT-B-32's FP attention takes torch's fused fast path in eval, which the exporter
    cannot trace: the export turns it off (and restores it)."""
    from d4c_core.models import ModelSpec

    lm = load_model(ModelSpec("ViT-B-32"))
    before = torch.backends.mha.get_fastpath_enabled()
    files = export_onnx(lm, tmp_path / "onnx")
    assert torch.backends.mha.get_fastpath_enabled() == before
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model.encode_image(x)
    got = _run(files["image"], x)
    assert float(F.cosine_similarity(got, ref).min()) >= 0.9999
