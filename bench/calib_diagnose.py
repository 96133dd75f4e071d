"""Why one calibration source quantizes better than another: what the images do to the model.

    python bench/calib_diagnose.py [--model d4c-tiny-rn] [--methods real,noise,bns,d4c]

For each source, at the accuracy benchmark's budget (128 images, 200 synthesis outer
iterations, seed 0), it measures the two things post-training quantization takes from its
calibration set, against the same numbers on real images:

- **activation ranges**: for every quantized layer input of the image tower (Conv2d and
  Linear), the 99.9th percentile of ``|x|``; reported as the median and worst ``|log2|`` of
  its ratio to real data's (1.0 = a factor of two off). Range init and LSQ start from these.
- **BatchNorm statistics** (ResNet towers): the BNS loss of the images (mean over BN layers
  of the squared distance of per-channel batch mean and variance to the running ones), the
  quantity BNS minimizes and the training data satisfies.
- **prompt agreement** (synthesized sources): the share of images whose zero-shot top-1
  among the generic prompts is the prompt they were steered to (D4C) — semantics, not
  statistics.

Contact sheets of the first 32 images go to ``bench/results/calib-diag/``; the markdown
table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def layer_stats(visual: nn.Module, images: torch.Tensor) -> tuple[dict[str, float], float | None]:
    """p99.9 of |input| per Conv2d/Linear of the tower, and the BNS loss (None: no BN)."""
    p999: dict[str, float] = {}
    bn_terms: list[float] = []
    hooks = []
    for name, m in visual.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):

            def pre(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = args[0].detach().abs().flatten().float()
                k = max(1, int(0.999 * x.numel()))
                p999[name] = float(x.kthvalue(k).values)

            hooks.append(m.register_forward_pre_hook(pre))
        elif isinstance(m, nn.BatchNorm2d):

            def bn(m: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].detach().float()
                mean = x.mean(dim=(0, 2, 3))
                var = x.var(dim=(0, 2, 3), unbiased=False)
                assert m.running_mean is not None and m.running_var is not None
                loss = (mean - m.running_mean).pow(2).mean() + (var - m.running_var).pow(2).mean()
                bn_terms.append(float(loss))

            hooks.append(m.register_forward_pre_hook(bn))
    try:
        visual(images)
    finally:
        for h in hooks:
            h.remove()
    return p999, (sum(bn_terms) if bn_terms else None)


@torch.no_grad()
def prompt_agreement(
    loaded: Any, images: torch.Tensor, recipe: Any, seed: int
) -> tuple[float, float] | None:
    """Shares of D4C images whose zero-shot top-1 is their target prompt, for the full image
    and for its foreground crop (SCG steers only the crop); None for unsteered sources."""
    import torch.nn.functional as F

    from d4c_core.calibration.d4c import D4CObjective

    if recipe.method != "d4c":
        return None
    obj = D4CObjective(loaded, recipe, seed)
    full = obj.features(images) @ obj.text.T
    crops = F.grid_sample(images, obj.grid, mode="bilinear", align_corners=False)
    crop = obj.features(crops) @ obj.text.T
    return (
        float((full.argmax(-1) == obj.labels).float().mean()),
        float((crop.argmax(-1) == obj.labels).float().mean()),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="d4c-tiny-rn")
    p.add_argument("--methods", default="real,noise,bns,d4c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "calib-diag")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import accuracy as acc  # bench/ is on sys.path when this runs as a script

    from d4c_core.calibration import make_calibration, save_contact_sheet
    from d4c_core.models import BUILTIN_TAG, ModelSpec, load_clip
    from d4c_core.recipe import CalibrationRecipe

    budget = acc.Budget()
    loaded = load_clip(ModelSpec(args.model, pretrained=BUILTIN_TAG))
    visual = loaded.model.visual
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, tuple[dict[str, float], float | None, tuple[float, float] | None]] = {}
    for method in args.methods.split(","):
        recipe = CalibrationRecipe.from_dict(acc.calib_fields(method, budget))
        image_dir = acc.real_pool(ROOT / "bench" / ".cache") if method == "real" else None
        images = make_calibration(loaded, recipe, seed=args.seed, image_dir=image_dir)
        safe = method.replace(":", "-").replace("/", "-").replace("+", "-")
        save_contact_sheet(images[:32], args.out_dir / f"{args.model}-{safe}.png")  # 2 rows
        p999, bns = layer_stats(visual, images)
        stats[method] = (p999, bns, prompt_agreement(loaded, images, recipe, args.seed))
        print(f"done {method}", file=sys.stderr, flush=True)

    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(
        f"`python bench/calib_diagnose.py {' '.join(argv or sys.argv[1:])}` — "
        f"{datetime.date.today()}, git {rev}, {args.model}, seed {args.seed}, "
        f"{budget.images} images, {budget.synth_iters} synthesis outer iterations.\n"
    )
    print(
        "| source | range vs real: median \\|log2\\| | worst \\|log2\\| (layer) | BNS loss | "
        "prompt agreement (full image / crop) |"
    )
    print("|---|---|---|---|---|")
    ref = stats.get("real", (None,))[0]
    for method, (p999, bns, agree) in stats.items():
        if ref is not None:
            logs = {n: abs(torch.log2(torch.tensor(p999[n] / ref[n])).item()) for n in ref}
            worst = max(logs, key=lambda n: logs[n])
            med = f"{statistics.median(logs.values()):.2f}"
            wst = f"{logs[worst]:.2f} ({worst})"
        else:
            med = wst = "—"
        b = f"{bns:.3g}" if bns is not None else "—"
        a = f"{100 * agree[0]:.0f} % / {100 * agree[1]:.0f} %" if agree is not None else "—"
        print(f"| {method} | {med} | {wst} | {b} | {a} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
