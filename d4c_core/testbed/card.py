"""The model card written next to trained built-in weights: what was trained, on what, how,
where, and how well it does, so the shipped file explains itself.

One function per section keeps each piece readable; ``model_card`` joins them with blank
lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch

from d4c_core.models import CONFIG_DIR
from d4c_core.testbed.render import BACKGROUNDS, COLOR_NAMES, OCCLUSION_P, SIZES
from d4c_core.testbed.shapes import KINDS
from d4c_core.testbed.tasks import tasks
from d4c_core.testbed.world import CAPTION_TEMPLATES, caption

if TYPE_CHECKING:
    from d4c_core.testbed.train import TrainConfig


def _example_caption() -> str:
    kind, color, bg = KINDS.index("star"), COLOR_NAMES.index("red"), BACKGROUNDS.index("grass")
    return caption(0, kind, color, 0, bg)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intro(cfg: TrainConfig) -> str:
    return f"""# {cfg.arch}: built-in testbed weights

Trained from scratch by `d4c_core.testbed.train` on the synthetic testbed world
(`d4c_core/testbed`), the project's offline stand-in for "CLIP + CIFAR". It is not a
natural-image model: it knows {len(KINDS)} object kinds, colors, sizes and backgrounds.
"""


def _architecture(cfg: TrainConfig, summary: dict[str, Any]) -> str:
    config = json.loads((CONFIG_DIR / f"{cfg.arch}.json").read_text())
    n_params = sum(p.numel() for p in summary["model"].parameters())
    return f"""## Architecture

open_clip config `d4c_core/model_configs/{cfg.arch}.json`, {n_params:,} parameters:

```json
{json.dumps(config, indent=2)}
```
"""


def _data(cfg: TrainConfig) -> str:
    return f"""## Data

- Images: 32x32 RGB, one object per image on a textured background, rendered on the fly.
  {len(KINDS)} kinds, {len(COLOR_NAMES)} colors ({", ".join(COLOR_NAMES)}), sizes
  {"/".join(SIZES)} (~45-80 % of the image), +-15 degree rotation, +-10 % aspect jitter,
  occlusion attempted with p={OCCLUSION_P} (hides 5-30 % of the object), backgrounds
  {", ".join(BACKGROUNDS)}, random muted colors kept away from the object's color,
  lighting, contrast and sensor noise.
- Captions: {len(CAPTION_TEMPLATES)} templates naming kind plus a subset of color, size and
  background (e.g. "{_example_caption()}"). Pairs whose caption is also true of
  the other image are masked out of the contrastive loss.
- Stream: a fresh batch every step from seed stream `train-{cfg.seed}`; evaluation splits
  come from separate `task/...` streams, so no test image is ever trained on.
"""


def _reproduce(cfg: TrainConfig, summary: dict[str, Any]) -> str:
    """The command that redoes the run step for step (a --minutes run as its step count)."""
    return (
        f"python -m d4c_core.testbed.train --arch {cfg.arch} --steps {summary['steps']} "
        f"--seed {cfg.seed} --batch {cfg.batch} --lr {cfg.lr} --warmup {summary['warmup']} "
        f"--weight-decay {cfg.weight_decay} --dtype {cfg.dtype} --out {shlex.quote(str(cfg.out))}"
    )


def _training(cfg: TrainConfig, summary: dict[str, Any], command: str) -> str:
    return f"""## Training

- Command: `{command}`
- Reproduce step for step: `{_reproduce(cfg, summary)}`
- Steps: {summary["steps"]} x batch {cfg.batch} = {summary["steps"] * cfg.batch:,} images;
  AdamW (betas 0.9/0.98, eps 1e-6, weight decay {cfg.weight_decay} on weight matrices only),
  lr {cfg.lr} with {summary["warmup"]} warmup steps then cosine to 0; logit scale clamped
  at 100; seed {cfg.seed}.
- Wall time: {summary["wall_s"] / 60:.1f} min ({summary["img_per_s"]:.0f} images/s);
  final training loss {summary["final_loss"]:.3f}.
- Machine: {platform.platform()}, {platform.processor() or platform.machine()},
  {os.cpu_count()} CPUs visible, torch {torch.__version__} with {cfg.threads} threads
  (OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "unset")}), open_clip
  {open_clip.__version__}. The machine may have been shared: wall time is an upper bound.
"""


def _accuracy(results: dict[str, dict[str, Any]]) -> str:
    tk = tasks()
    rows = "\n".join(
        f"| {name} | {len(tk[name].classnames)} | {len(tk[name].templates)} | {r['n']} "
        f"| {r['top1']:.2f} | {r['top5']:.2f} |"
        for name, r in results.items()
    )
    return f"""## Zero-shot accuracy (FP32 model loaded from this file)

Full test splits, `d4c_core.evaluate.zero_shot` with each task's templates.

| task | classes | templates | images | top-1 % | top-5 % |
|---|---|---|---|---|---|
{rows}
"""


def _file(cfg: TrainConfig) -> str:
    size = cfg.out.stat().st_size
    return f"""## File

`{cfg.out.name}`: {size:,} bytes, float tensors stored as {cfg.dtype}, sha256
`{_sha256(cfg.out)}`.
"""


def model_card(
    cfg: TrainConfig, summary: dict[str, Any], results: dict[str, dict[str, Any]], command: str
) -> str:
    """Markdown describing what was trained, on what, how, where, and how well it does."""
    sections = (
        _intro(cfg),
        _architecture(cfg, summary),
        _data(cfg),
        _training(cfg, summary, command),
        _accuracy(results),
        _file(cfg),
    )
    return "\n".join(sections)
