"""D4C synthesis: PGSI, SCG and PAE, and the paper's ablations (method spec §2).

PGSI uses CLIP's zero-shot head as a teacher: each image is pulled towards a fixed random
prompt. SCG adds structure: a fixed square box per image is the foreground (cropped and
resized, pulled to the prompt) and the rest, plus noise, the background, which is a negative
for every foreground of the mini-batch, so the object and its surroundings must differ.
PAE perturbs whatever is pulled to the prompt (the crop, or the full image without SCG).
Fore- and background go through the image encoder as one concatenated batch: the encoder is
in eval mode, so this is exact, and it halves the kernel launches of two passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from d4c_core.calibration.pae import perturb
from d4c_core.calibration.prompts import GENERIC_NAMES, fill_template
from d4c_core.calibration.synthesis import (
    ProgressCallback,
    derived_seed,
    device_of,
    synthesize,
    to_encoder_layout,
)
from d4c_core.models import BUILTIN_ARCHS, LoadedModel
from d4c_core.recipe import CalibrationRecipe

# The reference's single template; more templates are ensembled per name (CLIP-style).
D4C_TEMPLATE = "a photo of a {c}."


def prompt_set(arch: str, recipe: CalibrationRecipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and templates D4C targets: the recipe's, else the model's generic set.

    Real CLIPs default to the project's generic names; the built-in tiny models to the
    concepts they were trained on outside every evaluation task. Both with the reference's
    one template ``"a photo of a {c}."`` (also for the tiny models, whose training captions
    include it, so a prompt is one learned concept rather than a template average).
    """
    names: Sequence[str] = recipe.classnames
    if not names:
        if arch in BUILTIN_ARCHS:
            from d4c_core.testbed.tasks import generic_prompts

            names = generic_prompts()
        else:
            names = GENERIC_NAMES
    return tuple(names), tuple(recipe.templates) or (D4C_TEMPLATE,)


@torch.no_grad()
def prompt_embeddings(
    loaded: LoadedModel, names: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """``U`` ``(K, D)``: unit text embedding per name, averaged over templates, fp32."""
    device = device_of(loaded.model)
    prompts = [fill_template(t, c) for c in names for t in templates]
    tokens = loaded.tokenizer(prompts).to(device)
    feats = F.normalize(loaded.model.encode_text(tokens).float(), dim=-1)
    feats = feats.view(len(names), len(templates), -1).mean(1)
    return F.normalize(feats, dim=-1)


def crop_boxes(num: int, size: int, area: tuple[float, float], gen: torch.Generator) -> Tensor:
    """``(num, 3)`` long ``(top, left, side)``: squares of a uniform ``area`` fraction."""
    r = torch.empty(num).uniform_(*area, generator=gen)
    side = (r * size * size).floor().sqrt().floor().long().clamp(1, size)
    top = (torch.rand(num, generator=gen) * (size - side + 1)).floor().long()
    left = (torch.rand(num, generator=gen) * (size - side + 1)).floor().long()
    return torch.stack([top, left, side], 1)


def crop_grid(boxes: Tensor, size: int) -> Tensor:
    """``grid_sample`` grid that equals cropping each box and bilinearly resizing to ``size``.

    Source coordinates follow ``F.interpolate(..., align_corners=False)`` and are clamped to
    the box, so nothing outside it leaks into the foreground (exact, not approximately).
    """
    top, left, side = boxes.double().unbind(1)
    j = torch.arange(size, dtype=torch.float64)
    rel = (j + 0.5).view(1, -1) * side.view(-1, 1) / size - 0.5
    rel = torch.minimum(rel.clamp(min=0), (side - 1).view(-1, 1))
    ys = (2 * (top.view(-1, 1) + rel) + 1) / size - 1  # (N, size) normalized rows
    xs = (2 * (left.view(-1, 1) + rel) + 1) / size - 1
    n = len(boxes)
    grid = torch.stack(
        [xs.view(n, 1, size).expand(n, size, size), ys.view(n, size, 1).expand(n, size, size)],
        -1,
    )
    return grid.float()


def box_masks(boxes: Tensor, size: int) -> Tensor:
    """``(N, 1, H, W)`` 1 outside the box, 0 inside (the background keep-mask)."""
    idx = torch.arange(size)
    top, left, side = (boxes[:, k].view(-1, 1) for k in range(3))
    rows = (idx >= top) & (idx < top + side)  # (N, H)
    cols = (idx >= left) & (idx < left + side)
    inside = rows.unsqueeze(2) & cols.unsqueeze(1)
    return (~inside).unsqueeze(1).float()


def pgsi_logits(a: Tensor, text: Tensor, temperature: float) -> Tensor:
    """``norm(f_I(x))·Uᵀ/τ``: zero-shot logits over the K prompts (rows of ``a`` are unit)."""
    return a @ text.T / temperature


def scg_logits(fg: Tensor, bg: Tensor, text: Tensor, temperature: float) -> Tensor:
    """``(B, K + B)``: each foreground vs the K prompts, then vs every background of the batch.

    Column ``K + i`` of row ``i`` is the image's own background: a negative like the others.
    """
    return torch.cat([fg @ text.T, fg @ bg.T], 1) / temperature


class D4CObjective:
    """The loss of one mini-batch for the components in ``recipe.synth.components``."""

    def __init__(self, loaded: LoadedModel, recipe: CalibrationRecipe, seed: int) -> None:
        syn = recipe.synth
        size = loaded.image_size
        device = device_of(loaded.model)
        self.encode = loaded.model.encode_image
        self.scg, self.pae = "scg" in syn.components, "pae" in syn.components
        self.tau, self.noise = syn.temperature, syn.bg_noise
        names, templates = prompt_set(loaded.spec.arch, recipe)
        self.text = prompt_embeddings(loaded, names, templates)
        gen = torch.Generator().manual_seed(derived_seed(seed, "d4c-targets"))
        self.labels = torch.randint(len(names), (recipe.num_images,), generator=gen).to(device)
        self.boxes = crop_boxes(recipe.num_images, size, (syn.crop_min, syn.crop_max), gen)
        self.grid = crop_grid(self.boxes, size).to(device)
        self.keep = box_masks(self.boxes, size).to(device)

    def features(self, x: Tensor) -> Tensor:
        return F.normalize(self.encode(to_encoder_layout(x)).float(), dim=-1)

    def __call__(self, x: Tensor, idx: slice, gen: torch.Generator) -> Tensor:
        y = self.labels[idx]
        if not self.scg:
            view = perturb(x, gen) if self.pae else x
            return F.cross_entropy(pgsi_logits(self.features(view), self.text, self.tau), y)
        fg = F.grid_sample(x, self.grid[idx], mode="bilinear", align_corners=False)
        if self.pae:
            fg = perturb(fg, gen)
        eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        bg = x * self.keep[idx] + self.noise * eps
        a, b = self.features(torch.cat([fg, bg])).split(len(x))
        return F.cross_entropy(scg_logits(a, b, self.text, self.tau), y)


def d4c_source(
    loaded: LoadedModel,
    recipe: CalibrationRecipe,
    *,
    seed: int,
    image_dir: Path | None = None,
    on_step: ProgressCallback | None = None,
) -> Tensor:
    """D4C calibration images (any CLIP: only the encoders' outputs are used)."""
    objective = D4CObjective(loaded, recipe, seed)
    return synthesize(
        loaded.model, recipe, loaded.image_size, objective, seed=seed, on_step=on_step
    )
