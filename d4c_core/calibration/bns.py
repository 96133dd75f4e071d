"""BNS, BatchNorm statistics matching: the classic data-free baseline for ResNets (§3).

Every BatchNorm2d stores the running mean and variance of the data the model was trained
on; pixels whose per-layer batch statistics match them imitate that data's activations.
Hooks read each BatchNorm's input in eval mode, so the model itself is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from d4c_core.calibration.synthesis import ProgressCallback, synthesize, to_encoder_layout
from d4c_core.calibration.towers import require_modules
from d4c_core.models import LoadedModel
from d4c_core.recipe import CalibrationRecipe


def bn_stat_loss(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """``mean_c(μ_c(x) − running_mean)² + mean_c(σ²_c(x) − running_var)²`` (biased var)."""
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    assert bn.running_mean is not None and bn.running_var is not None
    return (mean - bn.running_mean).square().mean() + (var - bn.running_var).square().mean()


class BNSObjective:
    """Sum of ``bn_stat_loss`` over every BatchNorm2d of the image tower."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.encode = loaded.model.encode_image
        self.bns = require_modules(loaded.model.visual, nn.BatchNorm2d, "bns", loaded.spec.arch)
        self.terms: list[Tensor] = []

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.terms.append(bn_stat_loss(args[0], module))  # type: ignore[arg-type]

    def __call__(self, x: Tensor, idx: slice, gen: torch.Generator) -> Tensor:
        self.terms.clear()
        handles = [bn.register_forward_pre_hook(self._hook) for bn in self.bns]
        try:
            self.encode(to_encoder_layout(x))
        finally:
            for h in handles:
                h.remove()
        return torch.stack(self.terms).sum()


def bns_source(
    loaded: LoadedModel,
    recipe: CalibrationRecipe,
    *,
    seed: int,
    image_dir: Path | None = None,
    on_step: ProgressCallback | None = None,
) -> Tensor:
    """BNS calibration images; a tower without BatchNorm is a ``CalibrationError``."""
    objective = BNSObjective(loaded)
    return synthesize(
        loaded.model, recipe, loaded.image_size, objective, seed=seed, on_step=on_step
    )
