"""bench/onnx_speed.py end to end on d4c-tiny-vit with minimal repetitions, plus its exact
graph rewrite checked against an independent numpy computation."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parents[2] / "bench"
REQUIRED = ("fp32", "ours_w8a8", "ours_w4a8", "ort_static_w8a8", "ours_w8a8_rq")


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
    # The rewrite: q/k/v and fc1 of the 4 blocks (ORT merges q/k/v's identical quantizers, so
    # fewer executed QuantizeLinear nodes go away than were rewritten), same output.
    assert res["rewritten_quantizers"] == 16
    q_ours = res["kernels"]["ours_w8a8"]["nodes"]["QuantizeLinear"]
    assert res["kernels"]["ours_w8a8_rq"]["nodes"].get("QuantizeLinear", 0) < q_ours
    assert res["kernels"]["ours_w8a8_rq"]["nodes"]["Round"] >= 4
    assert res["cosine_vs_fp32_min"]["ours_w8a8_rq_vs_ours_w8a8"] >= 0.99999
    assert res["cosine_vs_fp32_min"]["ours_w8a8_rq_max_abs_diff"] < 1e-4
    for v in ("ours_w8a8", "ours_w4a8", "ort_static_w8a8"):
        assert 0.9 < res["cosine_vs_fp32_min"][v] <= 1.0 + 1e-6, v
    # A second run with the same settings reuses the cached result.
    again = bench.main(argv)
    assert again["results"][0]["finished"] == res["finished"]


def _per_channel_graph(s: np.ndarray, z: np.ndarray) -> onnx.ModelProto:
    """x -> QuantizeLinear(axis=-1) -> Cast -> Sub(Cast z) -> Mul s, as export_onnx writes it."""
    c = len(s)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1, name="Q"),
        helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["z"], ["zf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["qf", "zf"], ["centered"]),
        helper.make_node("Mul", ["centered", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c])],
        [numpy_helper.from_array(s, "s"), numpy_helper.from_array(z, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_rewrite_is_the_quantizer_formula(bench: ModuleType, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    s = (rng.random(6) * 0.05 + 0.01).astype(np.float32)
    z = rng.integers(0, 256, 6).astype(np.uint8)
    src, dst = tmp_path / "pc.onnx", tmp_path / "rq" / "pc.onnx"
    onnx.save(_per_channel_graph(s, z), str(src))
    assert bench.rewrite_per_channel_quant(src, dst) == 1
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "QuantizeLinear" not in ops and ops.count("Round") == 1
    # Values far outside the grid on both sides, and exact ties (k + 0.5) * s.
    x = rng.normal(0, 8, (64, 6)).astype(np.float32)
    x[:8] = ((np.arange(-4, 4)[:, None] + 0.5) * s).astype(np.float32)
    want = np.clip(np.round(x / s), -z.astype(np.float32), 255 - z.astype(np.float32)) * s
    for path in (src, dst):
        got = bench.session(path, 1).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, want)
