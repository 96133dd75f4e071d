"""The accuracy benchmark harness in a reduced mode: cells, resume, FP reference, table."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from d4c_core.evaluate import zero_shot
from d4c_core.models import BUILTIN_TAG, ModelSpec, load_clip
from d4c_core.testbed.tasks import tasks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def acc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_mean_std_and_method_fields(acc: ModuleType) -> None:
    vals = [71.5, 74.0, 73.25]
    want = f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
    assert acc._mean_std(vals) == want
    assert acc._mean_std([]) == "—"
    b = acc.Budget(images=16, synth_iters=7)
    assert acc.calib_fields("noise", b) == {"method": "noise", "num_images": 16}
    assert acc.calib_fields("d4c:pgsi+scg", b)["synth"] == {
        "iters": 7,
        "components": ("pgsi", "scg"),
    }
    assert "components" not in acc.calib_fields("d4c", b)["synth"]
    variant = acc.calib_fields("d4c/per-batch-adam", b)
    assert variant["method"] == "d4c" and variant["synth"] == {"iters": 7, "per_batch_adam": True}
    from d4c_core.recipe import CalibrationRecipe

    assert CalibrationRecipe.from_dict(variant).synth.per_batch_adam
    assert acc.fits("d4c-tiny-rn", "d4c/per-batch-adam") and not acc.fits("d4c-tiny-vit", "bns")


def test_reduced_run_resumes_and_tabulates(
    acc: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "r.jsonl"
    argv = [
        "--out", str(out), "--models", "d4c-tiny-rn", "--methods", "real,noise",
        "--bits", "w8a8", "--seeds", "0", "--images", "4", "--recon-iters", "1",
        "--test-images", "1000", "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert acc.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cells = {(r["method"], r["bits"], r["seed"]) for r in rows}
    assert cells == {("fp", "fp", 0), ("real", "w8a8", 0), ("noise", "w8a8", 0)}
    assert len({r["budget"] for r in rows}) == 1

    # FP row = an independent zero-shot of the shipped model on the same test images.
    loaded = load_clip(ModelSpec("d4c-tiny-rn", pretrained=BUILTIN_TAG))
    task = tasks()["object10"]
    ref = zero_shot(
        loaded.model, loaded.tokenizer, task.classnames, task.templates, task.split("test", 1000)
    )
    fp = next(r for r in rows if r["method"] == "fp")
    assert fp["tasks"]["object10"]["top1"] == pytest.approx(ref["top1"], abs=1e-9)
    # Quantized cells are real measurements, not copies of FP: same task set, plausible range.
    for r in rows:
        assert set(r["tasks"]) == set(tasks())
        assert 0.0 <= r["tasks"]["object10"]["top1"] <= 100.0

    printed = capsys.readouterr().out
    real = next(r for r in rows if r["method"] == "real")
    noise = next(r for r in rows if r["method"] == "noise")
    line = next(x for x in printed.splitlines() if "| object10 |" in x and "W8A8" in x)
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[:4] == ["d4c-tiny-rn", "object10", f"{ref['top1']:.2f}", "W8A8"]
    assert cols[4] == f"{real['tasks']['object10']['top1']:.2f}"
    assert cols[5] == f"{noise['tasks']['object10']['top1']:.2f}"
    assert set(cols[6:]) == {"—"}  # synthesis slots stay in the table

    # Same budget again: nothing recomputed; a changed budget is kept apart.
    assert acc.main(argv) == 0
    assert len(out.read_text().splitlines()) == len(rows)
    assert acc.main([*argv, "--table", "--recon-iters", "2"]) == 0
    assert "W8A8" not in capsys.readouterr().out.split("|---")[-1]
