"""The ONNX files checked in ONNX Runtime: ``exports: ["onnx"]`` in a job, and ORT's
zero-shot accuracy on the full test split of both testbed tasks vs the torch quantized model.

The issue's bound: ORT top-1 within 0.3 points of torch on every full test split (5,000
images), per-sample embedding cosine >= 0.999. The ViT runs by default; the ResNet is slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d4c_core import export, load_model, load_quantized, quantize
from d4c_core.artifacts import verify
from d4c_core.cli import _eval_task
from d4c_core.onnx_check import OrtClip, onnx_report
from d4c_core.onnx_export import IMAGE_FILE, TEXT_FILE, export_onnx
from d4c_core.testbed.tasks import tasks
from tests.core.test_api import FAST

W4A8 = FAST.replace(quant={"weight_bits": 4, "act_bits": 8, "recon_iters": 20})


def test_exports_onnx_in_the_artifact(tmp_path: Path) -> None:
    """The recipe's export: both graphs listed with sha256 in the manifest, and report.json's
    ``onnx`` section measured in ORT against the model the artifact loads back as."""
    q = quantize(load_model("d4c-tiny-rn"), W4A8.replace(exports=["onnx"]))
    manifest = export(q, tmp_path / "a")
    assert {IMAGE_FILE, TEXT_FILE} <= set(manifest["files"])
    assert verify(tmp_path / "a") == manifest
    report = json.loads((tmp_path / "a" / "report.json").read_text())["onnx"]
    assert report["files"] == {"image": IMAGE_FILE, "text": TEXT_FILE}
    for tower in ("image", "text"):
        cos = report["cosine"][tower]
        assert cos["n"] == 8 and cos["min"] >= 0.999, report
    assert "zero_shot" not in report  # no evaluation task in quantize(): nothing to compare
    # The shipped graphs compute what the loaded artifact computes.
    lq = load_quantized(tmp_path / "a")
    ort = OrtClip({"image": tmp_path / "a" / IMAGE_FILE, "text": tmp_path / "a" / TEXT_FILE})
    images, _ = tasks()["object10"].split("test", 4)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(
            ort.encode_image(images), lq.model.encode_image(images)
        )
    assert float(cos.min()) >= 0.999


def test_without_exports_no_onnx_files(tmp_path: Path) -> None:
    manifest = export(quantize(load_model("d4c-tiny-vit"), FAST), tmp_path / "a")
    assert not {IMAGE_FILE, TEXT_FILE} & set(manifest["files"])
    assert "onnx" not in json.loads((tmp_path / "a" / "report.json").read_text())


@pytest.mark.parametrize(
    "arch", ["d4c-tiny-vit", pytest.param("d4c-tiny-rn", marks=pytest.mark.slow)]
)
def test_ort_zero_shot_matches_torch_on_full_test_splits(arch: str, tmp_path: Path) -> None:
    q = quantize(load_model(arch), W4A8)
    files = export_onnx(q, tmp_path / "onnx")
    images, tokens = q.calibration_images[:8], q.calibration_tokens[:8]
    for name in tasks():
        task = _eval_task(name)
        report = onnx_report(files, q.model, images, tokens, task=task, tokenizer=q.tokenizer)
        zs = report["zero_shot"]
        print(arch, name, json.dumps(zs["onnx"]), json.dumps(zs["torch"]))
        assert zs["onnx"]["n"] == zs["torch"]["n"] == len(task.labels) == 5000
        assert abs(zs["delta_top1"]) <= 0.3, zs
        assert zs["torch"]["top1"] > 100 / len(task.classnames) * 3  # far above chance
        assert report["cosine"]["image"]["min"] >= 0.999
        assert report["cosine"]["text"]["min"] >= 0.999


def test_failed_onnx_export_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """An architecture the exporter cannot take fails the export as a SpecError (a job's
    clear failure) and leaves no artifact and no temp dir behind."""
    from d4c_core import onnx_export
    from d4c_core.errors import SpecError

    q = quantize(load_model("d4c-tiny-vit"), FAST.replace(exports=["onnx"]))

    def refuse(_model: object, _tower: str, path: Path) -> None:
        raise RuntimeError(f"cannot trace this architecture into {path}")

    monkeypatch.setattr(onnx_export, "_trace", refuse)
    with pytest.raises(SpecError, match="ONNX export failed: RuntimeError: cannot trace") as e:
        export(q, tmp_path / "a")
    # A job's problem detail names no server path.
    assert "<export dir>/image_encoder.onnx" in str(e.value) and "/tmp" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
