"""bench/onnx_speed.py end to end on d4c-tiny-vit with minimal repetitions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import onnx
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
REQUIRED = ("fp32", "ours_w8a8", "ours_w4a8", "ort_static_w8a8")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_onnx_speed", BENCH / "onnx_speed.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tiny_vit_every_variant_measured(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "speed.json"
    argv = [
        "--models=d4c-tiny-vit",
        "--quantizer=ranges",
        "--calib-images=2",
        "--mse-candidates=1",
        "--batches=1,2",
        "--reps=1",
        "--reps1=1",
        "--warmup=0",
        "--profile-runs=1",
        "--no-what-if",
        f"--cache-dir={tmp_path / 'cache'}",
        f"--work={tmp_path / 'work'}",
        f"--json={out}",
    ]
    bench.main(argv)
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 2 and report["machine"]["onnxruntime"]
    (res,) = report["results"]
    assert res["model"] == "d4c-tiny-vit" and set(REQUIRED) <= set(res["variants"])
    for v in REQUIRED:
        for batch in ("1", "2"):
            assert res["throughput"][batch][v]["images_per_s"] > 0, (v, batch)
        assert res["sizes"][v]["image"]["bytes"] > 0, v
        nodes = res["kernels"][v]["nodes"]
        assert nodes and all(n > 0 for n in nodes.values()), v
        assert sum(res["kernels"][v]["time_share"].values()) == pytest.approx(1.0, abs=0.01)
    for v in ("fp32", "ours_w8a8", "ours_w4a8"):
        assert res["sizes"][v]["text"]["bytes"] > 0, v
    assert "text" not in res["sizes"]["ort_static_w8a8"]  # only the image graph is quantized
    # Quantized weights are stored as integers: every quantized image graph is smaller.
    for v in ("ours_w8a8", "ours_w4a8", "ort_static_w8a8"):
        assert res["sizes"][v]["image"]["vs_fp32"] < 0.6, v
    assert res["sizes"]["ours_w4a8"]["image"]["bytes"] < res["sizes"]["ours_w8a8"]["image"]["bytes"]
    # The kernel classification: FP32 runs no integer kernel, ORT's static graph and ours do.
    kinds = {v: set(res["kernels"][v]["nodes"]) for v in REQUIRED}
    assert not kinds["fp32"] & bench.INTEGER_OPS
    assert kinds["ort_static_w8a8"] & bench.INTEGER_OPS
    assert kinds["ours_w8a8"] & bench.INTEGER_OPS
    # The per-channel activation quantizers (q/k/v and fc1 inputs) are float ops in the
    # exported graph: no per-axis QuantizeLinear, Round nodes instead, and ORT runs them.
    graph = onnx.load(str(tmp_path / "work" / "d4c-tiny-vit" / "ours_w8a8" / "image_encoder.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    per_axis = [
        n.name
        for n in graph.graph.node
        if n.op_type == "QuantizeLinear" and any(a.name == "axis" for a in n.attribute)
    ]
    assert not per_axis, per_axis
    assert "QuantizeLinear" in ops and ops.count("Round") >= 4
    assert res["kernels"]["ours_w8a8"]["nodes"].get("Round", 0) >= 1
    for v in ("ours_w8a8", "ours_w4a8", "ort_static_w8a8"):
        assert 0.9 < res["cosine_vs_fp32_min"][v] <= 1.0 + 1e-6, v
    # A second run with the same settings reuses the cached result.
    again = bench.main(argv)
    assert again["results"][0]["finished"] == res["finished"]
