"""Real-size job: RN50 and ViT-B-32 through the whole pipeline, per-stage time, peak RSS, the
reconstruction capture ratio, and the reference budget projected from timed unit iterations.

    python bench/real_size.py [--models RN50,ViT-B-32] [--images 32] [--recon-iters 1]
        [--prefix-images 8] [--checkpoint ARCH=FILE.safetensors] [--device cpu]

Each model runs in its own process (peak RSS is per process): calibration (noise) → range
init → reconstruction → evaluation → export of a W4A8 job with ``--recon-iters`` iterations
per unit, then, on the finished model:

- the capture ratio: the reconstruction stage's time over one FP forward plus one
  fake-quantized forward of the whole model (both towers) over the same calibration set;
- capture alone, boundary (today) vs prefix (before the boundary capture: each unit's data
  captured by running the tower from its input), over ``--prefix-images`` images, each over
  the two forwards on those images — the prefix capture is quadratic in depth, hence fewer
  images;
- per unit, the time of one reconstruction iteration (median of ``--step-reps`` after one
  warm-up), summed into the reference budget's reconstruction time (20,000 iterations/unit).

Rows print as markdown; ``--json FILE`` also writes the measurements.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from d4c_core.api import export
from d4c_core.checkpoints import Checkpoints
from d4c_core.models import ModelSpec, load_clip
from d4c_core.quant.capture import BoundaryCapture, prefix_data
from d4c_core.quant.reconstruct import optimize_unit, units
from d4c_core.quant.wrap import fp_mode
from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe
from d4c_core.stages import Progress, run_stages

REFERENCE_ITERS = 20_000  # AdaRound iterations per unit in the reference (QDrop) recipe
STAGES = ("calibration", "range_init", "reconstruction", "evaluation", "export")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _forwards(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """One forward of both towers over the set, in the capture's chunks (64)."""

    def go() -> None:
        with torch.no_grad():
            for x in images.split(64):
                model.encode_image(x)
            for t in tokens.split(64):
                model.encode_text(t)

    return _timed(go)


def _fp_plus_quant(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> float:
    quant = _forwards(model, images, tokens)
    with fp_mode(model):
        fp = _forwards(model, images, tokens)
    return quant + fp


def measure(arch: str, checkpoint: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    spec = ModelSpec(arch, checkpoint=checkpoint)
    recipe = Recipe(
        quant=QuantRecipe(weight_bits=4, act_bits=8, recon_iters=args.recon_iters),
        calibration=CalibrationRecipe(method="noise", num_images=args.images),
    )
    with tempfile.TemporaryDirectory(prefix="d4c-real-") as tmp:
        prog = Progress(None, None)
        with prog.timed("load"):
            loaded = load_clip(spec, args.device)
        store = Checkpoints(Path(tmp) / "work")
        store.open("units")
        q = run_stages(loaded, recipe, store, prog)
        with prog.timed("export"):
            export(q, Path(tmp) / "out")
    timings = dict(prog.timings)
    model, images, tokens = q.model, q.calibration_images, q.calibration_tokens
    assert images is not None and tokens is not None
    forwards = _fp_plus_quant(model, images, tokens)

    todo = units(model)
    mods = [u.module for u in todo]
    few_i, few_t = images[: args.prefix_images], tokens[: args.prefix_images]
    few_fw = _fp_plus_quant(model, few_i, few_t)
    boundary = BoundaryCapture(model, mods, few_i, few_t, batch=64)
    t_boundary = _timed(lambda: [boundary.data(u.module, u.tower) for u in todo])
    boundary.close()
    t_prefix = _timed(
        lambda: [prefix_data(model, u.module, u.tower, few_i, few_t, 64) for u in todo]
    )

    steps = _unit_steps(model, todo, images, tokens, recipe, args.step_reps)
    return {
        "model": arch,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "images": args.images,
        "prompts": len(tokens),
        "units": len(todo),
        "timings": timings,
        "fp_plus_quant_forward_s": forwards,
        "capture_ratio": timings["reconstruction"] / forwards,
        "capture_only": {
            "images": args.prefix_images,
            "forwards_s": few_fw,
            "boundary_s": t_boundary,
            "prefix_s": t_prefix,
        },
        "unit_step_s": steps,
        "projected_reconstruction_s": sum(steps.values()) * REFERENCE_ITERS,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _unit_steps(
    model: torch.nn.Module,
    todo: list[Any],
    images: torch.Tensor,
    tokens: torch.Tensor,
    recipe: Recipe,
    reps: int,
) -> dict[str, float]:
    """Median seconds of one reconstruction iteration per unit (each timed call runs
    ``reps`` iterations after a one-iteration warm-up)."""
    data = BoundaryCapture(model, [u.module for u in todo], images, tokens, batch=64)
    one = recipe.quant.model_copy(update={"recon_iters": 1})
    many = recipe.quant.model_copy(update={"recon_iters": reps})
    out: dict[str, float] = {}
    try:
        for u in todo:
            x, y, _ = data.data(u.module, u.tower)
            optimize_unit(u, x, y, one, 0)
            t_one = statistics.median(
                _timed(lambda: optimize_unit(u, x, y, one, 0))  # noqa: B023
                for _ in range(3)
            )
            t_many = _timed(lambda: optimize_unit(u, x, y, many, 0))  # noqa: B023
            out[u.name] = max(t_many - t_one, 0.0) / max(1, reps - 1)
    finally:
        data.close()
    return out


def rows(results: list[dict[str, Any]]) -> list[str]:
    head = "| model | images | " + " | ".join(STAGES) + " | total | peak RSS |"
    lines = [head, "|---" * (len(STAGES) + 4) + "|"]
    for r in results:
        t = r["timings"]
        total = sum(t.get(s, 0.0) for s in ("load", *STAGES))
        lines.append(
            f"| {r['model']} | {r['images']} | "
            + " | ".join(f"{t.get(s, 0.0):.1f} s" for s in STAGES)
            + f" | {total:.1f} s | {r['peak_rss_mib']:.0f} MiB |"
        )
    lines += [
        "",
        "| model | units | FP + fake-quant forward | reconstruction stage | capture ratio | "
        "capture only, boundary / prefix (images) | projected reconstruction at 20,000 it/unit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["capture_only"]
        lines.append(
            f"| {r['model']} | {r['units']} | {r['fp_plus_quant_forward_s']:.1f} s | "
            f"{r['timings']['reconstruction']:.1f} s | **{r['capture_ratio']:.2f}x** | "
            f"{c['boundary_s'] / c['forwards_s']:.2f}x / {c['prefix_s'] / c['forwards_s']:.2f}x "
            f"({c['images']}) | {r['projected_reconstruction_s'] / 3600:.1f} h |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="RN50,ViT-B-32")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--recon-iters", type=int, default=1)
    ap.add_argument("--prefix-images", type=int, default=8)
    ap.add_argument("--step-reps", type=int, default=5)
    ap.add_argument("--checkpoint", action="append", default=[], help="ARCH=FILE.safetensors")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: one model, JSON out
    args = ap.parse_args()
    ckpts = {k: Path(v) for k, _, v in (c.partition("=") for c in args.checkpoint)}
    if args.one:
        print(json.dumps(measure(args.one, ckpts.get(args.one), args)))
        return
    results = []
    for arch in args.models.split(","):
        child = [
            f"--images={args.images}",
            f"--recon-iters={args.recon_iters}",
            f"--prefix-images={args.prefix_images}",
            f"--step-reps={args.step_reps}",
            f"--device={args.device}",
            *(f"--checkpoint={c}" for c in args.checkpoint),
            f"--one={arch}",
        ]
        out = subprocess.run(
            [sys.executable, __file__, *child], check=True, stdout=subprocess.PIPE, text=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{arch} done", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    print(
        f"`python {' '.join(sys.argv)}` — {datetime.date.today()}, {cpu}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("\n".join(rows(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
