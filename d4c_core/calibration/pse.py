"""PSE, patch-similarity entropy: the data-free baseline for ViT towers (method spec §3).

Real images give a ViT diverse patches, so the pairwise similarities of its attention
contexts spread out; PSE maximizes the differential entropy of that similarity distribution,
estimated by a Gaussian KDE, in every attention block. The attention maps come from the
model's own ``nn.MultiheadAttention`` (hooks ask it for its head-averaged weights), so
nothing of the attention is re-implemented here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d4c_core.calibration.synthesis import ProgressCallback, synthesize, to_encoder_layout
from d4c_core.calibration.towers import require_modules
from d4c_core.models import LoadedModel
from d4c_core.recipe import CalibrationRecipe

# Added to the density before the log, as in the reference (keeps log finite where p ≈ 0).
DENSITY_EPS = 1e-4


def patch_similarities(weights: Tensor, value: Tensor) -> Tensor:
    """``(B, P·P)`` cosine similarities of the patches' contexts ``A @ V`` (CLS dropped).

    ``weights`` is the head-averaged attention ``(B, L, L)``; averaging ``A_h @ V`` over heads
    equals ``mean_h(A_h) @ V``.
    """
    ctx = F.normalize((weights.float() @ value.float())[:, 1:], dim=-1)
    return (ctx @ ctx.transpose(1, 2)).flatten(1)


def kde_entropy(samples: Tensor, bandwidth: float, points: int) -> Tensor:
    """Mean over rows of the differential entropy of a Gaussian KDE of each row's samples.

    The density is evaluated at ``points`` values evenly spaced over the batch's
    [min, max] (bounds not differentiated, like the reference) and ``-p log p`` integrated
    with the trapezoid rule.
    """
    lo, hi = samples.detach().min(), samples.detach().max()
    x = torch.linspace(0, 1, points, device=samples.device, dtype=samples.dtype) * (hi - lo) + lo
    z = (x.view(1, -1, 1) - samples.unsqueeze(1)) / bandwidth
    pdf = torch.exp(-0.5 * z.square()).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))
    p = pdf + DENSITY_EPS
    return torch.trapezoid(-p * torch.log(p), x, dim=-1).mean()


class PSEObjective:
    """``−Σ_blocks H(similarities)`` over the image tower's attention blocks."""

    def __init__(self, loaded: LoadedModel, recipe: CalibrationRecipe) -> None:
        self.encode = loaded.model.encode_image
        self.attns = require_modules(
            loaded.model.visual, nn.MultiheadAttention, "pse", loaded.spec.arch
        )
        self.bandwidth, self.points = recipe.synth.kde_bandwidth, recipe.synth.kde_points
        self.sims: list[Tensor] = []

    @staticmethod
    def _want_weights(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs | {"need_weights": True, "average_attn_weights": True}

    def _read(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        value = args[2] if len(args) > 2 else kwargs["value"]
        if not module.batch_first:  # type: ignore[union-attr]
            value = value.transpose(0, 1)
        self.sims.append(patch_similarities(out[1], value))

    def __call__(self, x: Tensor, idx: slice, gen: torch.Generator) -> Tensor:
        self.sims.clear()
        handles = []
        for m in self.attns:
            handles.append(m.register_forward_pre_hook(self._want_weights, with_kwargs=True))
            handles.append(m.register_forward_hook(self._read, with_kwargs=True))
        try:
            self.encode(to_encoder_layout(x))
        finally:
            for h in handles:
                h.remove()
        return -sum(kde_entropy(s, self.bandwidth, self.points) for s in self.sims)


def pse_source(
    loaded: LoadedModel,
    recipe: CalibrationRecipe,
    *,
    seed: int,
    image_dir: Path | None = None,
    on_step: ProgressCallback | None = None,
) -> Tensor:
    """PSE calibration images; a tower without attention blocks is a ``CalibrationError``."""
    objective = PSEObjective(loaded, recipe)
    return synthesize(
        loaded.model, recipe, loaded.image_size, objective, seed=seed, on_step=on_step
    )
