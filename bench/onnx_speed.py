"""ONNX Runtime speed and file size of our QDQ export vs FP32 vs ORT's static quantization.

    HF_HUB_OFFLINE=1 python bench/onnx_speed.py [--models ViT-B-32,RN50,d4c-tiny-vit,d4c-tiny-rn]
        [--threads 2] [--reps 5] [--json PATH] [--fresh]

For each model (open_clip archs with random weights at their default 224 px; the built-in
tiny models with their shipped weights), in one process:

* ``fp32``: ``export_onnx`` of the unquantized model.
* ``ours_w8a8`` / ``ours_w4a8``: ``d4c_core.api.quantize`` with a tiny budget (no
  reconstruction iterations; speed does not depend on calibration quality), then
  ``export_onnx``. ``--quantizer ranges`` skips the job machinery (wrap + range init only:
  the same layers and the same graph, used by the test to stay fast). ``export_onnx`` writes
  per-channel activation quantizers (q/k/v and MLP fc1 inputs) as float arithmetic
  (``Div, Round, Max/Min`` or ``Clip``, ``Mul``), not as per-axis QuantizeLinear, so ONNX
  Runtime runs those layers' activation quantization as elementwise float ops.
* ``ort_static_w8a8``: ``onnxruntime.quantization.quantize_static`` of the FP32 image graph
  (after ``quant_pre_process``): QDQ, per-channel int8 weights, uint8 activations, MinMax on
  ``--calib-images`` random normalized images.
* ``whatif_w8a8_pt`` (experiment, ``--no-what-if`` skips it): ``ours_w8a8`` with every
  per-channel activation quantizer (q/k/v and MLP fc1 inputs) replaced by one per-tensor
  quantizer covering the union of its channel ranges. NOT our model's numbers: it shows what
  ONNX Runtime runs once those inputs are per tensor.

Every session goes through ``d4c_core.onnx_export.ort_session`` (its settings kept; the
intra-op thread count set to ``--threads``, inter-op 1). Throughput is images/s of the image
encoder at batch 1 and 32: warm-up runs, then ``--reps`` (batch 32) or ``--reps1`` (batch 1)
timed rounds in which every variant runs once, in rotating order, so a load change on the
machine hits all variants alike; the median of each variant's runs is reported. The kernels
are counted from an ORT profile (``enable_profiling``) of batch-1 runs: distinct executed
nodes per op type and the share of kernel time per op type.

Per-model results are cached in ``--cache-dir`` (default ``bench/results/onnx_speed/``); a
rerun with the same settings skips finished models unless ``--fresh``. Prints markdown
tables; ``--json PATH`` writes everything with the machine info.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from d4c_core.api import load_model, quantize
from d4c_core.models import BUILTIN_ARCHS, LoadedModel, ModelSpec
from d4c_core.onnx_export import export_onnx, ort_session
from d4c_core.quant.quantizers import ActQuantizer
from d4c_core.quant.range_init import init_ranges
from d4c_core.quant.wrap import wrap_for_quantization
from d4c_core.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("ViT-B-32", "RN50", "d4c-tiny-vit", "d4c-tiny-rn")
DEFAULT_CACHE = ROOT / "bench" / "results" / "onnx_speed"
BATCHES = (1, 32)
VARIANTS = (
    "fp32",
    "ours_w8a8",
    "ours_w4a8",
    "ort_static_w8a8",
    "whatif_w8a8_pt",
)
LABELS = {
    "fp32": "FP32",
    "ours_w8a8": "ours W8A8",
    "ours_w4a8": "ours W4A8",
    "ort_static_w8a8": "ORT static W8A8",
    "whatif_w8a8_pt": "what-if: ours W8A8, per-tensor acts",
}
# Op types that do the matmul/conv work, integer or float, in the order the table shows them.
COMPUTE_OPS = (
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearConv",
    "ConvInteger",
    "MatMulNBits",
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "Conv",
    "FusedConv",
    "QAttention",
    "Attention",
    "MultiHeadAttention",
)
INTEGER_OPS = frozenset(
    {
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QLinearConv",
        "ConvInteger",
        "QAttention",
    }
)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# ------------------------------------------------------------------------------ sessions


@contextlib.contextmanager
def _patched_session_options(**settings: Any) -> Iterator[None]:
    """Let ``ort_session`` build its own SessionOptions, then add ``settings`` to them.

    ``ort_session`` takes no options; wrapping ``InferenceSession`` for the duration of the
    call keeps every setting it makes (today the MatMulNBits accuracy level) and adds ours.
    """
    real = ort.InferenceSession

    def make(path: str, opts: Any = None, *args: Any, **kwargs: Any) -> Any:
        opts = opts or ort.SessionOptions()
        for key, value in settings.items():
            setattr(opts, key, value)
        return real(path, opts, *args, **kwargs)

    ort.InferenceSession = make  # type: ignore[misc]
    try:
        yield
    finally:
        ort.InferenceSession = real  # type: ignore[misc]


def session(path: Path, threads: int, **settings: Any) -> Any:
    """``ort_session(path)`` with ``threads`` intra-op threads (inter-op 1) and ``settings``."""
    with _patched_session_options(intra_op_num_threads=threads, inter_op_num_threads=1, **settings):
        return ort_session(path)


def _feed(sess: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    return {sess.get_inputs()[0].name: x}


def time_sessions(
    sessions: dict[str, Any], x: np.ndarray, warmup: int, reps: int
) -> dict[str, dict[str, Any]]:
    """Median seconds per run of each session on ``x``, in interleaved rotating rounds."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, _feed(sess, x))
    names = list(sessions)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            sess = sessions[n]
            feed = _feed(sess, x)
            t0 = time.perf_counter()
            sess.run(None, feed)
            runs[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        med = statistics.median(runs[n])
        out[n] = {
            "median_s": med,
            "images_per_s": len(x) / med,
            "runs_s": [round(t, 6) for t in runs[n]],
        }
    return out


def kernel_profile(path: Path, threads: int, x: np.ndarray, runs: int, tmp: Path) -> dict:
    """Executed op types of one graph: distinct nodes per op type and kernel-time shares.

    A profiled session (the same options plus ``enable_profiling``) runs ``x`` once to warm
    up and ``runs`` more times; the shares count only the later runs.
    """
    prefix = str(tmp / f"prof_{path.parent.name}_")
    sess = session(path, threads, enable_profiling=True, profile_file_prefix=prefix)
    for _ in range(1 + runs):
        sess.run(None, _feed(sess, x))
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else -1
    nodes: dict[str, set[str]] = {}
    dur: Counter[str] = Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"]["op_name"]
        nodes.setdefault(op, set()).add(e["name"].removesuffix("_kernel_time"))
        if e["ts"] > warm_end:
            dur[op] += e["dur"]
    total = sum(dur.values()) or 1
    return {
        "nodes": dict(sorted(((op, len(v)) for op, v in nodes.items()), key=lambda t: -t[1])),
        "time_share": {op: round(d / total, 4) for op, d in dur.most_common()},
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float((num / np.maximum(den, 1e-30)).min())


# ------------------------------------------------------------------------------ variants


def load(arch: str) -> LoadedModel:
    """The built-in tiny models with their weights; any other arch with random weights."""
    if arch in BUILTIN_ARCHS:
        return load_model(arch)
    return load_model(ModelSpec(arch))


def fast_recipe(bits: str, n: int, candidates: int = 4) -> Recipe:
    """A tiny-budget recipe: what the export needs (every quantizer set), not accuracy."""
    return Recipe.preset(
        bits,
        recon_iters=0,
        recon_batch=n,
        mse_candidates=candidates,
        mse_zero_points=1,
        mse_max_samples=64,
        range_init_images=n,
        range_init_prompts=n,
    ).replace(calibration={"num_images": n, "num_prompts": n})


def _prompts(n: int) -> list[str]:
    things = ("dog", "red car", "mountain lake", "bowl of soup", "city street", "old clock")
    return [f"a photo of a {things[i % len(things)]}" for i in range(n)]


def quantized_model(loaded: LoadedModel, bits: str, args: argparse.Namespace) -> Any:
    """Quantized CLIP: ``api`` through ``d4c_core.api.quantize``; ``ranges`` wrap + range init."""
    n = args.calib_images
    recipe = fast_recipe(bits, n, args.mse_candidates)
    how, seed = args.quantizer, args.seed
    if how == "api":
        return quantize(loaded, recipe).model
    model = copy.deepcopy(loaded.model)
    wrap_for_quantization(model, recipe.quant)
    gen = torch.Generator().manual_seed(seed)
    size = loaded.image_size
    images = torch.randn(n, 3, size, size, generator=gen)
    init_ranges(model, images, loaded.tokenizer(_prompts(n)), recipe.quant)
    return model.eval()


def per_tensor_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy whose per-channel activation quantizers are per tensor (the what-if variant).

    Each gets one scale/zero point on the same b-bit grid covering the union of its channels'
    ranges ``[(qmin - z_c) s_c, (qmax - z_c) s_c]``. Returns the copy and how many changed.
    """
    model = copy.deepcopy(model)
    changed = 0
    for mod in model.modules():
        if not isinstance(mod, ActQuantizer) or not mod.channels:
            continue
        s = mod.scale.detach().double()
        z = mod.zero_point.detach().double()
        lo = float(((mod.qmin - z) * s).min().clamp(max=0.0))
        hi = float(((mod.qmax - z) * s).max().clamp(min=0.0))
        step = max(hi - lo, 1e-8) / (mod.qmax - mod.qmin)
        zp = min(max(round(mod.qmin - lo / step), mod.qmin), mod.qmax)
        mod.channels = None
        mod.scale = torch.nn.Parameter(torch.tensor([step], dtype=torch.float32), False)
        mod.zero_point = torch.tensor([float(zp)])
        changed += 1
    return model, changed


class _Reader:
    """A CalibrationDataReader over a fixed list of single-image batches."""

    def __init__(self, name: str, images: np.ndarray) -> None:
        self.items = iter([{name: img[None]} for img in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def ort_static(fp32_image: Path, out: Path, images: np.ndarray) -> dict[str, Any]:
    """ORT's own static QDQ quantization of the FP32 image graph (pre-processed first)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader_cls = type("Reader", (_Reader, CalibrationDataReader), {})
    out.mkdir(parents=True)
    pre = out / "pre.onnx"
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    # Symbolic shape inference asserts on the exporter's dynamic Reshapes of some graphs;
    # then ONNX shape inference + ORT's basic optimization (which folds the weight
    # Transposes into initializers, so quantize_static sees the weights) still run.
    src, tried = fp32_image, []
    for kwargs in ({}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(fp32_image), str(pre), **kwargs)
        except Exception as e:  # record why, try the next way
            tried.append(f"{kwargs or 'default'} failed ({type(e).__name__}: {e})")
            continue
        src = pre
        tried.append(f"quant_pre_process({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
        break
    else:
        tried.append("raw graph")
    info["pre_process"] = "; ".join(tried)
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    dst = out / "image_encoder.onnx"
    quantize_static(
        str(src),
        str(dst),
        reader_cls(name, images),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    pre.unlink(missing_ok=True)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["settings"] = (
        "QDQ, per_channel=True, weights QInt8, activations QUInt8, MinMax, "
        f"{len(images)} random images, default op types"
    )
    return {"image": dst, "info": info}


# ------------------------------------------------------------------------------ one model


def bench_model(arch: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    loaded = load(arch)
    size = loaded.image_size
    steps: dict[str, float] = {}
    paths: dict[str, dict[str, Path]] = {}

    def step(name: str, t0: float) -> None:
        steps[name] = round(time.perf_counter() - t0, 1)
        print(f"  {arch}: {name} {steps[name]} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    # torch's nn.MultiheadAttention fast path (eval + no_grad) traces to
    # aten::_native_multi_head_attention, which the ONNX exporter cannot write: the FP32
    # export of ViT-B-32 fails with it on. The slow path computes the same attention.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        paths["fp32"] = export_onnx(loaded, work / "fp32")
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    step("export fp32", t0)
    what_if_layers = 0
    for bits in ("w8a8", "w4a8"):
        t0 = time.perf_counter()
        model = quantized_model(loaded, bits, args)
        step(f"quantize {bits} ({args.quantizer})", t0)
        t0 = time.perf_counter()
        paths[f"ours_{bits}"] = export_onnx(model, work / f"ours_{bits}")
        step(f"export {bits}", t0)
        if bits == "w8a8" and args.what_if:
            t0 = time.perf_counter()
            pt, what_if_layers = per_tensor_copy(model)
            paths["whatif_w8a8_pt"] = export_onnx(pt, work / "whatif_w8a8_pt")
            step("export what-if", t0)
            del pt
        del model
    rng = np.random.default_rng(args.seed)
    calib = rng.standard_normal((args.calib_images, 3, size, size)).astype(np.float32)
    t0 = time.perf_counter()
    static = ort_static(paths["fp32"]["image"], work / "ort_static_w8a8", calib)
    paths["ort_static_w8a8"] = {"image": static["image"]}
    step("ort quantize_static", t0)
    variants = [v for v in VARIANTS if v in paths]

    fp_sizes = {t: p.stat().st_size for t, p in paths["fp32"].items()}
    sizes = {}
    for v in variants:
        sizes[v] = {}
        for tower in ("image", "text"):
            p = paths[v].get(tower)
            if p is not None:
                b = p.stat().st_size
                sizes[v][tower] = {"bytes": b, "vs_fp32": round(b / fp_sizes[tower], 4)}

    sessions = {v: session(paths[v]["image"], args.threads) for v in variants}
    throughput: dict[str, dict[str, Any]] = {}
    cos: dict[str, float] = {}
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        reps = args.reps1 if batch == 1 else args.reps
        t0 = time.perf_counter()
        throughput[str(batch)] = time_sessions(sessions, x, args.warmup, reps)
        step(f"timing batch {batch}", t0)
        if batch == max(args.batches):
            outs = {v: s.run(None, _feed(s, x))[0] for v, s in sessions.items()}
            cos = {v: round(_cosines(outs[v], outs["fp32"]), 6) for v in variants}
            if "whatif_w8a8_pt" in outs:
                cos["whatif_w8a8_pt_vs_ours_w8a8"] = round(
                    _cosines(outs["whatif_w8a8_pt"], outs["ours_w8a8"]), 6
                )
    del sessions
    x1 = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    t0 = time.perf_counter()
    kernels = {
        v: kernel_profile(paths[v]["image"], args.threads, x1, args.profile_runs, work)
        for v in variants
    }
    step("kernel profiles", t0)
    ratios = {}
    for batch, res in throughput.items():
        fp = res["fp32"]["images_per_s"]
        r = {f"{v}_vs_fp32": round(res[v]["images_per_s"] / fp, 4) for v in variants}
        r["ours_w8a8_vs_ort_static"] = round(
            res["ours_w8a8"]["images_per_s"] / res["ort_static_w8a8"]["images_per_s"], 4
        )
        if "whatif_w8a8_pt" in res:
            r["whatif_vs_ort_static"] = round(
                res["whatif_w8a8_pt"]["images_per_s"] / res["ort_static_w8a8"]["images_per_s"],
                4,
            )
        ratios[batch] = r
    return {
        "model": arch,
        "image_size": size,
        "weights": "built-in" if arch in BUILTIN_ARCHS else "random init",
        "config": config_key(args),
        "variants": variants,
        "sizes": sizes,
        "throughput": throughput,
        "ratios": ratios,
        "cosine_vs_fp32_min": cos,
        "kernels": kernels,
        "ort_static": static["info"],
        "what_if_layers": what_if_layers,
        "steps_s": steps,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - t_start, 1),
        "finished": _now(),
    }


# ------------------------------------------------------------------------------ report


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def machine_info(threads: int) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": commit,
        "date": _now(),
    }


def config_key(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a cached result must match to be reused."""
    return {
        "threads": args.threads,
        "batches": list(args.batches),
        "reps": args.reps,
        "reps1": args.reps1,
        "warmup": args.warmup,
        "quantizer": args.quantizer,
        "calib_images": args.calib_images,
        "mse_candidates": args.mse_candidates,
        "what_if": args.what_if,
        "ort": ort.__version__,
    }


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f}"


def markdown(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores; ORT {machine['onnxruntime']}, "
        f"intra-op threads {machine['threads']}; {machine['date']}; git {machine['git']}.",
        "",
        "File size (MB) and ratio to the FP32 export:",
        "",
        "| model | graph | FP32 | ours W8A8 | ours W4A8 | ORT static W8A8 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["sizes"]
        for tower in ("image", "text"):
            cells = []
            for v in ("fp32", "ours_w8a8", "ours_w4a8", "ort_static_w8a8"):
                e = s.get(v, {}).get(tower)
                if e is None:
                    cells.append("—")
                elif v == "fp32":
                    cells.append(_mb(e["bytes"]))
                else:
                    cells.append(f"{_mb(e['bytes'])} ({e['vs_fp32']:.3f}x)")
            lines.append(f"| {r['model']} | {tower} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Image-encoder throughput, images/s (median), and ratio to FP32; the last columns "
        "divide by ORT static W8A8 (what-if: per-tensor, not exact):",
        "",
        "| model | batch | FP32 | ours W8A8 | ours W4A8 | ORT static W8A8 "
        "| what-if PT W8A8 | ours/ORT | what-if/ORT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shown = ("fp32", "ours_w8a8", "ours_w4a8", "ort_static_w8a8", "whatif_w8a8_pt")
    for r in results:
        for batch, res in r["throughput"].items():
            ratio = r["ratios"][batch]
            cells = []
            for v in shown:
                if v not in res:
                    cells.append("—")
                    continue
                ips = res[v]["images_per_s"]
                cells.append(
                    f"{ips:.1f}" if v == "fp32" else f"{ips:.1f} ({ratio[f'{v}_vs_fp32']:.2f}x)"
                )
            cells.append(f"**{ratio['ours_w8a8_vs_ort_static']:.2f}x**")
            key = "whatif_vs_ort_static"
            cells.append("—" if key not in ratio else f"{ratio[key]:.2f}x")
            lines.append(f"| {r['model']} | {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Executed image-graph nodes per op type (ORT profile, batch 1; `int` = integer "
        "kernels among them) and the top kernel-time shares:",
        "",
        "| model | variant | matmul/conv nodes | Q / DQ nodes | top kernel time |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for v in r["variants"]:
            k = r["kernels"][v]
            nodes = k["nodes"]
            comp = ", ".join(
                f"{op} {nodes[op]}" + (" (int)" if op in INTEGER_OPS else "")
                for op in COMPUTE_OPS
                if op in nodes
            )
            qdq = " / ".join(str(nodes.get(op, 0)) for op in QDQ_OPS)
            top = ", ".join(f"{op} {share:.0%}" for op, share in list(k["time_share"].items())[:3])
            lines.append(f"| {r['model']} | {LABELS[v]} | {comp} | {qdq} | {top} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated archs")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--reps", type=int, default=5, help="timed rounds at batch 32")
    p.add_argument("--reps1", type=int, default=20, help="timed rounds at batch 1")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs per session and batch")
    p.add_argument("--profile-runs", type=int, default=3, help="profiled batch-1 runs")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--calib-images", type=int, default=8, help="images (and prompts)")
    p.add_argument("--mse-candidates", type=int, default=4, help="range-search candidates")
    p.add_argument("--quantizer", choices=("api", "ranges"), default="api")
    p.add_argument("--no-what-if", dest="what_if", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--work", type=Path, help="keep the ONNX files here (default: a temp dir)")
    p.add_argument("--fresh", action="store_true", help="ignore cached per-model results")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = machine_info(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for arch in args.models:
        cached = args.cache_dir / f"{arch}.json"
        if cached.exists() and not args.fresh:
            prev = json.loads(cached.read_text())
            if prev.get("config") == config_key(args):
                print(f"{arch}: cached ({cached})", file=sys.stderr)
                results.append(prev)
                continue
        print(f"{arch}: running", file=sys.stderr, flush=True)
        with contextlib.ExitStack() as stack:
            if args.work is not None:
                work = args.work / arch
                if work.exists():
                    raise SystemExit(f"{work}: already exists")
            else:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory())) / arch
            work.mkdir(parents=True)
            res = bench_model(arch, args, work)
        res["machine"] = machine
        tmp = cached.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.rename(cached)
        results.append(res)
    report = {"machine": machine, "results": results}
    print(markdown(results, machine))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
