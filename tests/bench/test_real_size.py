"""bench/real_size.py end to end on the tiny ResNet with minimal sizes: every stage timed,
the ratios computed from the measurements they name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from d4c_core.models import ModelSpec, load_clip
from d4c_core.quant.reconstruct import units
from d4c_core.quant.wrap import wrap_for_quantization
from d4c_core.recipe import QuantRecipe

BENCH = Path(__file__).resolve().parents[2] / "bench" / "real_size.py"


def test_tiny_resnet_job_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "real.json"
    args = ["--models=d4c-tiny-rn", "--images=8", "--prefix-images=4", "--step-reps=2"]
    res = subprocess.run(
        [sys.executable, str(BENCH), *args, f"--json={out}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    (row,) = json.loads(out.read_text())
    stages = ("calibration", "range_init", "reconstruction", "evaluation", "export")
    assert all(row["timings"][s] > 0 for s in stages)
    assert row["capture_ratio"] == pytest.approx(
        row["timings"]["reconstruction"] / row["fp_plus_quant_forward_s"]
    )
    model = wrap_for_quantization(load_clip(ModelSpec("d4c-tiny-rn")).model, QuantRecipe())
    names = [u.name for u in units(model)]
    assert row["units"] == len(names) and sorted(row["unit_step_s"]) == sorted(names)
    assert row["projected_reconstruction_s"] == pytest.approx(
        20_000 * sum(row["unit_step_s"].values())
    )
    assert row["peak_rss_mib"] > 100
    assert "| d4c-tiny-rn | 8 |" in res.stdout and "capture ratio" in res.stdout
