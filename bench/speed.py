"""Speed benchmark: per-stage wall time, artifact size ratios, reconstruction cost ratio.

    python bench/speed.py [--recon-iters 1000] [--ratio-iters 300]

Prints a markdown section for BENCHMARKS.md. The reconstruction ratio is the time of one
AdaRound+LSQ iteration of a unit divided by one bare FP forward+backward of the same unit on
the same batch (weights requiring grad), both measured in this process, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from d4c_core.artifacts import weight_bytes
from d4c_core.models import ModelSpec, load_clip
from d4c_core.pipeline import JobSpec, run
from d4c_core.quant.range_init import init_ranges
from d4c_core.quant.reconstruct import Unit, optimize_unit, unit_data, unit_loss, units
from d4c_core.quant.wrap import QuantLayer, fp_mode, quantize_
from d4c_core.recipe import QuantRecipe, Recipe

ARCHS = ("d4c-tiny-vit", "d4c-tiny-rn")
STAGES = ("load", "calibration", "range_init", "reconstruction", "evaluation", "export")


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
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _big_unit() -> tuple[Unit, torch.Tensor, torch.Tensor]:
    """A ViT-B/32-sized first MLP layer (768 -> 3072, 50 tokens): where real jobs spend time."""
    lin = nn.Linear(768, 3072)
    layer = QuantLayer(lin, 4, 8, per_channel_input=True)
    x = torch.randn(128, 50, 768)
    with torch.no_grad():
        y = lin(x)
    layer.act_quant.observe(x[:32])
    layer.weight_quant.init_range(layer.weight, candidates=20)
    layer.act_quant.enabled = layer.quant_weight = True
    return Unit(0, "vit-b-32-size mlp.c_fc", "image", layer, [layer]), x, y


def recon_ratio(iters: int) -> list[str]:
    rows = [
        "| unit | input shape | AdaRound+LSQ ms/iter | bare fwd+bwd ms | ratio |",
        "|---|---|---|---|---|",
    ]
    cases: list[tuple[str, Unit, torch.Tensor, torch.Tensor, int]] = []
    for arch, picks in (("d4c-tiny-vit", (0, 3, 4, 5)), ("d4c-tiny-rn", (0, 7, 8))):
        lm = load_clip(ModelSpec(arch))
        recipe = QuantRecipe(mse_candidates=20)
        model = quantize_(copy.deepcopy(lm.model), recipe)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(128, 3, lm.image_size, lm.image_size, generator=g)
        tokens = lm.tokenizer(["a photo of a cat."] * 64)
        init_ranges(model, images, tokens, recipe)
        us = units(model)
        for k in picks:
            x, y = unit_data(model, us[k], images, tokens, 64)
            cases.append((f"{arch} {us[k].name}", us[k], x, y, iters))
    unit, x, y = _big_unit()
    cases.append(("ViT-B/32-size mlp.c_fc (768→3072)", unit, x, y, max(10, iters // 5)))
    for name, unit, x, y, n in cases:
        recipe = QuantRecipe(recon_iters=n)
        t0 = time.perf_counter()
        optimize_unit(unit, x, y, recipe, 0)
        t_opt = (time.perf_counter() - t0) / n
        bare = copy.deepcopy(unit.module)
        gen = torch.Generator().manual_seed(0)
        with fp_mode(bare):
            for m in bare.modules():
                if isinstance(m, QuantLayer):
                    m.weight.requires_grad_(True)

            def step(
                bare: nn.Module = bare,
                x: torch.Tensor = x,
                y: torch.Tensor = y,
                batch: int = recipe.recon_batch,
                gen: torch.Generator = gen,
            ) -> None:
                idx = torch.randint(0, len(x), (batch,), generator=gen)
                unit_loss(bare(x[idx]), y[idx]).backward()

            t_bare = _time(step, n)
        rows.append(
            f"| {name} | {tuple(x.shape[1:])} | {t_opt * 1e3:.2f} | {t_bare * 1e3:.2f} "
            f"| {t_opt / t_bare:.2f} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recon-iters", type=int, default=1000)
    ap.add_argument("--ratio-iters", type=int, default=300)
    args = ap.parse_args()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cmd = f"python bench/speed.py --recon-iters {args.recon_iters} --ratio-iters {args.ratio_iters}"
    print(f"### Speed (`{cmd}`)\n")
    print(
        f"{datetime.date.today()}, git {rev}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only.\n"
    )
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        print(
            f"Per-stage wall time (s), W4A8, noise calibration, {args.recon_iters} "
            "reconstruction iterations per unit:\n"
        )
        print("\n".join(stage_times(args.recon_iters, root)) + "\n")
        print(
            "Artifact size of the quantized linear/conv weights (codes + fp16 scales + uint8 "
            "zero points) vs their FP32 bytes:\n"
        )
        print("\n".join(size_ratios(root)) + "\n")
    print(f"Reconstruction cost per iteration ({args.ratio_iters} iterations, batch 32):\n")
    print("\n".join(recon_ratio(args.ratio_iters)))


if __name__ == "__main__":
    main()
