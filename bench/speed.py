"""Speed benchmark: per-stage wall time, artifact size ratios, reconstruction cost ratio,
D4C synthesis cost.

    python bench/speed.py [--recon-iters 1000] [--ratio-iters 300] [--synth-ratio-reps 100]
    python bench/speed.py --sections synth,synth-real,recon --device cuda --synth-real-iters 3

Prints a markdown section for BENCHMARKS.md. The reconstruction ratio is the time of one
AdaRound+LSQ iteration of a unit divided by one bare FP forward+backward of the same unit on
the same batch (weights requiring grad; and again with the input requiring grad too), all
measured in this process, one after the other; its floor is the second of those plus one
Adam update of the unit's rounding variables, the least any implementation of the recipe
computes per iteration.
The synthesis ratio is the time of one full D4C step (batch 16 of 128 images: crop, PAE,
background, encoder, loss, TV, backward, Adam) divided by one bare image-encoder
forward+backward to the pixels of the same fore- and background views, interleaved.
``--synth-real`` times whole D4C outer iterations of RN50 and ViT-B/32 (random init) and
projects the reference budget (3000 outer x 128 images); rows print as they finish.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d4c_core.artifacts import weight_bytes
from d4c_core.calibration.d4c import D4CObjective
from d4c_core.calibration.synthesis import (
    PixelOptimizer,
    autocast,
    frozen,
    to_encoder_layout,
)
from d4c_core.models import ModelSpec, load_clip
from d4c_core.pipeline import JobSpec, run
from d4c_core.quant.capture import prefix_data
from d4c_core.quant.range_init import init_ranges
from d4c_core.quant.reconstruct import (
    Unit,
    optimize_unit,
    unit_loss,
    units,
)
from d4c_core.quant.step import unit_optimizer
from d4c_core.quant.wrap import QuantLayer, fp_mode, wrap_for_quantization
from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe, SynthRecipe
from d4c_core.vocabulary import STAGES

ARCHS = ("d4c-tiny-vit", "d4c-tiny-rn")
# Reference README, one RTX A6000, 128 images, 3000 outer iterations x batch 16.
REFERENCE_SYNTH_S = {"RN50": 1623.0, "ViT-B-32": 1434.0}


def stage_times(recon_iters: int, root: Path) -> list[str]:
    rows = ["| model | " + " | ".join(STAGES) + " | total |", "|---" * (len(STAGES) + 2) + "|"]
    for arch in ARCHS:
        recipe = Recipe.preset("w4a8", recon_iters=recon_iters)
        t0 = time.perf_counter()
        rep = run(JobSpec(ModelSpec(arch), recipe), root / f"w-{arch}", root / f"o-{arch}")
        total = time.perf_counter() - t0
        t = rep["timings"]
        rows.append(
            f"| {arch} | " + " | ".join(f"{t[s]:.1f}" for s in STAGES) + f" | {total:.1f} |"
        )
    return rows


def size_ratios(root: Path) -> list[str]:
    rows = [
        "| model | bits | text MLP bits | quantized bytes | FP32 bytes | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        for bits, mlp in (("w4a8", 4), ("w4a8", 8), ("w8a8", 8)):
            recipe = Recipe.preset(bits, recon_iters=0, text_mlp_bits=mlp, mse_candidates=10)
            out = root / f"s-{arch}-{bits}-{mlp}"
            run(JobSpec(ModelSpec(arch), recipe), root / f"ws-{arch}-{bits}-{mlp}", out)
            wb = weight_bytes(out)
            ratio = wb["quantized_bytes"] / wb["fp32_bytes"]
            rows.append(
                f"| {arch} | {bits} | {mlp} | {wb['quantized_bytes']:,} | {wb['fp32_bytes']:,} "
                f"| {ratio:.3f} |"
            )
    return rows


def _time(fn: Callable[[], None], n: int) -> float:
    for _ in range(5):
        fn()
    _sync_all()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync_all()
    return (time.perf_counter() - t0) / n


def _sync_all() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _big_unit(device: str) -> tuple[Unit, torch.Tensor, torch.Tensor]:
    """A ViT-B/32-sized first MLP layer (768 -> 3072, 50 tokens): where real jobs spend time."""
    lin = nn.Linear(768, 3072).to(device)
    layer = QuantLayer(lin, 4, 8, per_channel_input=True).to(device)
    x = torch.randn(128, 50, 768, device=device)
    with torch.no_grad():
        y = lin(x)
    layer.act_quant.observe(x[:32])
    layer.weight_quant.init_range(layer.weight, candidates=20)
    layer.act_quant.enabled = layer.quant_weight = True
    return Unit(0, "vit-b-32-size mlp.c_fc", "image", layer, [layer]), x, y


Case = tuple[str, Unit, torch.Tensor, torch.Tensor, int]  # name, unit, inputs, targets, iters

# Units timed per architecture, by name: ViT/text Linears, ResNet blocks, attention pool.
TINY_UNITS = {
    "d4c-tiny-vit": (
        "visual.transformer.resblocks.0.attn.q_proj",
        "visual.transformer.resblocks.0.attn.out_proj",
        "visual.transformer.resblocks.0.mlp.c_fc",
        "visual.transformer.resblocks.0.mlp.c_proj",
    ),
    "d4c-tiny-rn": ("visual.layer1.0", "visual.layer4.1", "visual.attnpool.q_proj"),
}
REAL_UNITS = {
    "ViT-B-32": (
        "visual.transformer.resblocks.0.attn.q_proj",
        "visual.transformer.resblocks.0.attn.out_proj",
        "visual.transformer.resblocks.0.mlp.c_fc",
        "visual.transformer.resblocks.0.mlp.c_proj",
        "transformer.resblocks.0.attn.q_proj",
        "transformer.resblocks.0.mlp.c_fc",
    ),
    "RN50": ("visual.layer1.0", "visual.layer3.0", "visual.layer4.2", "visual.attnpool.q_proj"),
}


def _unit_cases(
    picks: dict[str, tuple[str, ...]], n_images: int, iters: int, device: str
) -> list[Case]:
    """The named units of each architecture (default weights: cost does not depend on them),
    range-initialized on ``n_images`` random images and 64 prompts, inputs cached."""
    cases: list[Case] = []
    for arch, names in picks.items():
        lm = load_clip(ModelSpec(arch), device)
        recipe = QuantRecipe(mse_candidates=20)
        model = wrap_for_quantization(lm.model, recipe)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(n_images, 3, lm.image_size, lm.image_size, generator=g).to(device)
        tokens = lm.tokenizer(["a photo of a cat."] * 64).to(device)
        init_ranges(model, images, tokens, recipe)
        by_name = {u.name: u for u in units(model)}
        for name in names:
            unit = by_name[name]
            x, y = prefix_data(model, unit.module, unit.tower, images, tokens, 32)
            cases.append((f"{arch} {name}", by_name[name], x, y, iters))
    return cases


def _recon_cases(iters: int, device: str) -> list[Case]:
    """Units of both tiny models plus a ViT-B/32-size layer."""
    unit, x, y = _big_unit(device)
    big = ("ViT-B/32-size mlp.c_fc (768→3072)", unit, x, y, max(10, iters // 5))
    return [*_unit_cases(TINY_UNITS, 128, iters, device), big]


def _optimize_ms(unit: Unit, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    """ms per iteration of ``optimize_unit``: a run of ``n + 1`` iterations less a run of one
    (after a 5-iteration warm-up that also triggers any compilation).

    The difference leaves out the per-unit set-up (soft-rounding buffers, Adam's state),
    which a real run spreads over thousands of iterations but a timing of a few real-size
    iterations would charge to each."""
    optimize_unit(unit, x, y, QuantRecipe(recon_iters=5), 0)
    elapsed = []
    for iters in (n + 1, 1):
        _sync(x.device)
        t0 = time.perf_counter()
        optimize_unit(unit, x, y, QuantRecipe(recon_iters=iters), 0)
        _sync(x.device)
        elapsed.append(time.perf_counter() - t0)
    return (elapsed[0] - elapsed[1]) / n * 1e3


def recon_compiled(iters: int, device: str = "cpu") -> list[str]:
    """The same units with ``torch.compile`` on the unit's forward (AdaRound soft weights and
    LSQ fused by inductor; the regularizer and Adam stay eager): what a fused step would buy,
    and what its compilation costs per unit shape."""
    rows = [
        "| unit | eager ms/iter | compiled ms/iter | speed-up | compile s (first call) |",
        "|---|---|---|---|---|",
    ]
    torch._dynamo.reset()
    for name, unit, x, y, n in _recon_cases(iters, device):
        t_eager = _optimize_ms(unit, x, y, n)
        compiled = Unit(unit.index, unit.name, unit.tower, torch.compile(unit.module), unit.layers)
        t0 = time.perf_counter()
        optimize_unit(compiled, x, y, QuantRecipe(recon_iters=2), 0)
        t_compile = time.perf_counter() - t0
        t_comp = _optimize_ms(compiled, x, y, n)
        rows.append(
            f"| {name} | {t_eager:.2f} | {t_comp:.2f} | {t_eager / t_comp:.2f} | {t_compile:.1f} |"
        )
    return rows


# Reconstruction ratios: step and baselines timed in turn this many times, medians reported.
RATIO_REPS = 5


def _ratio_rows(cases: list[Case], reps: int = RATIO_REPS) -> list[str]:
    """AdaRound+LSQ ms per iteration vs two bare FP forward+backward passes of the unit:
    weight gradients only, and weight plus input gradients (what the unit costs inside a
    network's backward pass).

    The last two columns are a floor no implementation of the recipe with these kernels goes
    below: the bare step with the input gradient (LSQ's step gradient is built from it, so a
    step computes every one of its products) plus the fused Adam update of the unit's rounding
    variables and steps (every weight's alpha moves each iteration). A floor ratio above 1.5
    means the 1.5x target is out of reach for that unit whatever the element-wise code does;
    the step's own ratio to the floor is the last column (issue 17's targets: <= 1.15x for
    matmul-bound units, <= 2x for the attention-pool projections).

    The four are timed in turn ``reps`` times (each over ``iters / reps`` iterations) and
    each column is a median: on a shared box a burst of other load then hits one repetition
    of all four instead of one whole column."""
    rows = [
        "| unit | input shape | AdaRound+LSQ ms/iter | bare fwd+bwd ms (W grad) | ratio "
        "| bare ms (W + input grad) | ratio | Adam ms | floor ratio | step / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    batch = QuantRecipe().recon_batch
    for name, unit, x, y, n in cases:
        bare = copy.deepcopy(unit.module)
        gen = torch.Generator().manual_seed(0)
        per = max(2, n // reps)
        t_opt: list[float] = []
        t_w: list[float] = []
        t_wx: list[float] = []
        t_adam: list[float] = []
        adam_step = _adam_update(unit)
        with fp_mode(bare):
            for m in bare.modules():
                if isinstance(m, QuantLayer):
                    m.weight.requires_grad_(True)

            def step(
                input_grad: bool,
                bare: nn.Module = bare,
                x: torch.Tensor = x,
                y: torch.Tensor = y,
                gen: torch.Generator = gen,
            ) -> None:
                idx = torch.randint(0, len(x), (batch,), generator=gen)
                xb = x.index_select(0, idx).requires_grad_(input_grad)
                unit_loss(bare(xb), y.index_select(0, idx)).backward()

            for _ in range(reps):
                t_opt.append(_optimize_ms(unit, x, y, per) / 1e3)
                t_w.append(_time(lambda: step(False), per))
                t_wx.append(_time(lambda: step(True), per))
                t_adam.append(_time(adam_step, per))
        m_opt, m_w, m_wx, m_adam = (statistics.median(t) for t in (t_opt, t_w, t_wx, t_adam))
        rows.append(
            f"| {name} | {tuple(x.shape[1:])} | {m_opt * 1e3:.2f} | {m_w * 1e3:.2f} "
            f"| {m_opt / m_w:.2f} | {m_wx * 1e3:.2f} | {m_opt / m_wx:.2f} "
            f"| {m_adam * 1e3:.2f} | {(m_wx + m_adam) / m_w:.2f} "
            f"| **{m_opt / (m_wx + m_adam):.2f}** |"
        )
    return rows


def _adam_update(unit: Unit) -> Callable[[], None]:
    """One step of the optimizer ``optimize_unit`` uses, on copies of the unit's parameters
    with fixed gradients."""
    alphas = [layer.weight_quant.alpha.detach().clone() for layer in unit.layers]
    steps = [layer.act_quant.scale.detach().clone() for layer in unit.layers]
    for p in alphas + steps:
        p.grad = torch.randn_like(p) * 1e-3
    return unit_optimizer(alphas, steps, QuantRecipe(), unit.tower).step


def recon_ratio(iters: int, device: str = "cpu") -> list[str]:
    return _ratio_rows(_recon_cases(iters, device))


def recon_real(iters: int, device: str = "cpu") -> list[str]:
    return _ratio_rows(_unit_cases(REAL_UNITS, 64, iters, device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _d4c_case(arch: str, device: str, pretrained: str | None) -> tuple[PixelOptimizer, Any]:
    lm = load_clip(ModelSpec(arch, pretrained=pretrained), device)
    recipe = CalibrationRecipe(method="d4c", num_images=128, synth=SynthRecipe(batch=16))
    objective = D4CObjective(lm, recipe, seed=0)
    return PixelOptimizer(lm.model, recipe, lm.image_size, objective, seed=0), lm


def _bare_views(opt: PixelOptimizer) -> torch.Tensor:
    """The fore- and background views one D4C step encodes, as a fresh leaf tensor."""
    obj: D4CObjective = opt.objective  # type: ignore[assignment]
    x, sl = opt.params[0][opt.slices[0]].detach(), opt.slices[0]
    fg = torch.nn.functional.grid_sample(x, obj.grid[sl], align_corners=False)
    bg = x * obj.keep[sl]
    return torch.cat([fg, bg]).requires_grad_(True)


def synth_step_ratio(
    arch: str, reps: int, device: str = "cpu", pretrained: str | None = None
) -> tuple[float, float]:
    """(D4C step ms, bare encoder fwd+bwd ms), measured alternately, medians of ``reps``."""
    opt, lm = _d4c_case(arch, device, pretrained)
    dev = opt.device
    views = _bare_views(opt)
    encode = lm.model.encode_image

    def bare() -> None:
        with autocast(dev):
            feats = encode(to_encoder_layout(views))
        feats.float().sum().backward()
        views.grad = None

    t_step, t_bare = [], []
    n = len(opt.slices)
    with frozen(lm.model):
        for i in range(reps + 5):
            for fn, acc in ((lambda i=i: opt.step(i % n), t_step), (bare, t_bare)):
                _sync(dev)
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                if i >= 5:
                    acc.append(time.perf_counter() - t0)
    return statistics.median(t_step) * 1e3, statistics.median(t_bare) * 1e3


def synth_ratio(reps: int, device: str = "cpu") -> None:
    """Print the step/bare table of both tiny models, one row as each is measured."""
    print("| model | D4C step ms | bare encoder fwd+bwd ms (fg+bg) | ratio |", flush=True)
    print("|---|---|---|---|", flush=True)
    for arch in ARCHS:
        step, bare = synth_step_ratio(arch, reps, device, pretrained="builtin")
        print(f"| {arch} | {step:.2f} | {bare:.2f} | {step / bare:.2f} |", flush=True)


def synth_real(iters: int, device: str, images: int) -> None:
    """Time D4C outer iterations on real-size towers; print one row per model as it ends."""
    print(
        "| model | device | outer iters x images | s | image-steps/s | projected 3000x128 s "
        "| reference A6000 s | step/bare ratio |",
        flush=True,
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for arch in REFERENCE_SYNTH_S:
        try:
            lm = load_clip(ModelSpec(arch), device)
            recipe = CalibrationRecipe(method="d4c", num_images=images, synth=SynthRecipe(batch=16))
            opt = PixelOptimizer(lm.model, recipe, lm.image_size, D4CObjective(lm, recipe, 0), 0)
            n = len(opt.slices)
            with frozen(lm.model):
                opt.step(0)  # warm-up (cuDNN autotuning, allocator)
                _sync(opt.device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    for k in range(n):
                        opt.step(k)
                _sync(opt.device)
            dt = time.perf_counter() - t0
            rate = iters * images / dt
            step, bare = synth_step_ratio(arch, max(3, min(20, iters * n)), device)
            print(
                f"| {arch} | {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} "
                f"| {iters} x {images} | {dt:.1f} | {rate:.1f} | {3000 * 128 / rate:,.0f} "
                f"| {REFERENCE_SYNTH_S[arch]:,.0f} | {step / bare:.2f} |",
                flush=True,
            )
        except Exception as e:  # report and go on: a GPU run is one short, precious script
            print(f"| {arch} | {device} | failed: {type(e).__name__}: {e} |", flush=True)
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


SECTIONS = (
    "stages",
    "sizes",
    "recon",
    "recon-real",
    "recon-compiled",
    "synth",
    "synth-real",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--sections",
        default="stages,sizes,recon,synth",
        help=f"comma list of {', '.join(SECTIONS)} (synth-real: RN50 / ViT-B-32 synthesis)",
    )
    ap.add_argument("--recon-iters", type=int, default=1000)
    ap.add_argument("--ratio-iters", type=int, default=300)
    ap.add_argument("--real-ratio-iters", type=int, default=10)
    ap.add_argument("--synth-ratio-reps", type=int, default=100)
    ap.add_argument("--synth-real-iters", type=int, default=3, help="outer iterations timed")
    ap.add_argument("--synth-real-images", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; use {', '.join(SECTIONS)}")
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cmd = "python bench/speed.py " + " ".join(sys.argv[1:])
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"### Speed (`{cmd.strip()}`)\n")
    print(
        f"{datetime.date.today()}, git {rev}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"device {args.device} ({dev}).\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if "stages" in sections:
            print(
                f"Per-stage wall time (s), W4A8, noise calibration, {args.recon_iters} "
                "reconstruction iterations per unit:\n"
            )
            print("\n".join(stage_times(args.recon_iters, root)) + "\n", flush=True)
        if "sizes" in sections:
            print(
                "Artifact size of the quantized linear/conv weights (codes + fp16 scales + "
                "uint8 zero points) vs their FP32 bytes:\n"
            )
            print("\n".join(size_ratios(root)) + "\n", flush=True)
    if "recon" in sections:
        print(
            f"Reconstruction cost per iteration ({args.ratio_iters} iterations in {RATIO_REPS} "
            f"interleaved repetitions, medians, batch 32, {args.device}):\n"
        )
        print("\n".join(recon_ratio(args.ratio_iters, args.device)) + "\n", flush=True)
    if "recon-real" in sections:
        print(
            f"Reconstruction cost per iteration on real-size units (random init, "
            f"{args.real_ratio_iters} iterations in {RATIO_REPS} interleaved repetitions, medians, "
            f"batch 32, {args.device}):\n"
        )
        print("\n".join(recon_real(args.real_ratio_iters, args.device)) + "\n", flush=True)
    if "recon-compiled" in sections:
        print(
            f"Reconstruction per iteration, eager vs torch.compile of the unit's forward "
            f"({args.ratio_iters} iterations, batch 32, {args.device}):\n"
        )
        print("\n".join(recon_compiled(args.ratio_iters, args.device)) + "\n", flush=True)
    if "synth" in sections:
        print(
            f"D4C synthesis step vs bare image-encoder forward+backward ({args.device}, batch 16 "
            f"of 128, full D4C, medians of {args.synth_ratio_reps} interleaved repetitions):\n",
            flush=True,
        )
        synth_ratio(args.synth_ratio_reps, args.device)
    if "synth-real" in sections:
        print(
            f"\nD4C synthesis on real-size towers (random init, {args.device}, "
            f"{'bf16 autocast, channels_last, ' if args.device == 'cuda' else ''}"
            f"batch 16, {args.synth_real_iters} outer iterations timed after one warm-up "
            "step):\n",
            flush=True,
        )
        synth_real(args.synth_real_iters, args.device, args.synth_real_images)


if __name__ == "__main__":
    main()
