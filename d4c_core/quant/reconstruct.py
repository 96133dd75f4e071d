"""Per-unit AdaRound + LSQ reconstruction (spec §4, QDrop machinery with dropping off).

Units in model order: ViT and text towers reconstruct each Linear alone; a ModifiedResNet
reconstructs each Bottleneck as one block and its attention-pool projections alone. Each unit
gets its input from the already-quantized prefix and its target from the FP model, both
cached over the calibration set; the optimization loop then touches only the unit, never the
whole model. Where that data comes from (block boundaries, linear in depth) is ``capture``'s
concern.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from open_clip.modified_resnet import Bottleneck, ModifiedResNet
from torch import Tensor, nn

from d4c_core.finite import require_finite
from d4c_core.quant.quantizers import RoundMode
from d4c_core.quant.step import (
    Step,
    act_lr,
    cuda_graphs_enabled,
    make_schedule,
    run_steps,
    unit_optimizer,
)
from d4c_core.quant.wrap import QuantAttentionPool2d, QuantLayer
from d4c_core.recipe import QuantRecipe


@dataclass
class Unit:
    """One reconstruction step: a module and the quantized layers it optimizes together."""

    index: int
    name: str
    tower: str
    module: nn.Module
    layers: list[QuantLayer] = field(default_factory=list)


def units(model: nn.Module) -> list[Unit]:
    """Reconstruction units in model order: image tower first, then text."""
    found: list[tuple[str, str, nn.Module]] = []
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        for name, mod in visual.named_modules():
            if isinstance(mod, Bottleneck) and any(
                isinstance(m, QuantLayer) for m in mod.modules()
            ):
                found.append((f"visual.{name}", "image", mod))
            elif isinstance(mod, QuantAttentionPool2d):
                for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    found.append((f"visual.{name}.{p}", "image", getattr(mod, p)))
    else:
        found += [
            (f"visual.{n}", "image", m)
            for n, m in visual.named_modules()
            if isinstance(m, QuantLayer)
        ]
    text = [
        (n, "text", m)
        for n, m in model.named_modules()
        if isinstance(m, QuantLayer) and not n.startswith("visual.")
    ]
    out = []
    for i, (name, tower, mod) in enumerate(found + text):
        layers = (
            [mod]
            if isinstance(mod, QuantLayer)
            else [m for m in mod.modules() if isinstance(m, QuantLayer)]
        )
        out.append(Unit(i, name, tower, mod, layers))
    return out


class _SquaredError(torch.autograd.Function):
    """``sum((out - target)^2) / B`` with a one-multiply backward.

    ``F.mse_loss(reduction="sum")`` on a CPU took 1.2-5.5x longer, forward and backward, on
    unit outputs (e.g. 2.06 vs 0.37 ms at 32 x 65 x 384): here the forward is one subtraction
    and one dot product, and the backward scales the saved difference in place.
    """

    @staticmethod
    def forward(ctx, out: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        diff = out - target
        ctx.save_for_backward(diff)
        flat = diff.reshape(-1)
        return torch.dot(flat, flat) / out.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        return diff.mul_(grad * (2.0 / diff.shape[0])), None


def unit_loss(out: Tensor, target: Tensor) -> Tensor:
    """‖ŷ − y‖² per sample, averaged over the batch (QDrop's lp_loss, p=2); the target is a
    cached FP output and gets no gradient."""
    return _SquaredError.apply(out, target)


@torch.no_grad()
def unit_mse(module: nn.Module, inputs: Tensor, targets: Tensor, batch: int = 256) -> float:
    total = sum(
        unit_loss(module(x), y).item() * len(x)
        for x, y in zip(inputs.split(batch), targets.split(batch), strict=True)
    )
    return total / len(inputs)


def _set_mode(layers: list[QuantLayer], mode: RoundMode) -> None:
    for layer in layers:
        layer.weight_quant.mode = mode


@dataclass
class UnitResult:
    index: int
    name: str
    tower: str
    mse_init: float
    mse_final: float
    seconds: float = 0.0


def optimize_unit(
    unit: Unit, inputs: Tensor, targets: Tensor, recipe: QuantRecipe, seed: int
) -> None:
    """AdaRound on the unit's weights and LSQ on its input steps (cosine-to-zero lr); ends
    in hard rounding. The iteration is ``step.Step``: the same on a CPU and, replayed as a
    CUDA graph, on a GPU."""
    wqs = [layer.weight_quant for layer in unit.layers]
    alphas = [wq.alpha for wq in wqs]
    steps = [layer.act_quant.scale for layer in unit.layers]
    for layer in unit.layers:
        layer.weight_quant.begin_soft(layer.weight)
    for p in alphas + steps:
        p.requires_grad_(True)
    try:
        if recipe.recon_iters:
            opt = unit_optimizer(alphas, steps, recipe, unit.tower)
            lr_act = act_lr(recipe, unit.tower)
            sched = make_schedule(recipe, len(inputs), lr_act, seed, inputs.device)

            def round_loss(exps: tuple[Tensor, Tensor] | None) -> Tensor:
                # b = 1.0 is read only when b = 1 throughout (then there are no exponents).
                total = wqs[0].round_loss(1.0, exps)
                for wq in wqs[1:]:
                    total = total + wq.round_loss(1.0, exps)
                return total

            step = Step(
                unit.module,
                unit_loss,
                round_loss,
                inputs,
                targets,
                sched,
                opt,
                recipe.adaround_lambda,
            )
            with torch.enable_grad():
                run_steps(step, graphed=inputs.is_cuda and cuda_graphs_enabled())
    finally:
        for p in alphas + steps:
            p.requires_grad_(False)
            p.grad = None
        for wq in wqs:
            wq.end_soft()


def learn_unit(
    unit: Unit, inputs: Tensor, targets: Tensor, recipe: QuantRecipe, seed: int
) -> float:
    """Reconstruct one unit in place from its cached data; return its output MSE before
    (nearest rounding). The MSE after is the caller's to measure: a linear-time capture gets
    it from the replay that follows."""
    _set_mode(unit.layers, RoundMode.NEAREST)
    before = unit_mse(unit.module, inputs, targets)
    require_finite(f"in reconstruction unit {unit.name} (before)", before)
    optimize_unit(unit, inputs, targets, recipe, seed)
    return before


def reconstruct_unit(
    unit: Unit, inputs: Tensor, targets: Tensor, recipe: QuantRecipe, seed: int
) -> UnitResult:
    """``learn_unit`` and the MSE after, measured on the cached data."""
    before = learn_unit(unit, inputs, targets, recipe, seed)
    after = unit_mse(unit.module, inputs, targets)
    require_finite(f"in reconstruction unit {unit.name}", after)
    return UnitResult(unit.index, unit.name, unit.tower, before, after)


def unit_state(unit: Unit) -> dict[str, Tensor]:
    """What a finished unit learned (rounding variables and steps), for checkpoints."""
    state: dict[str, Tensor] = {}
    for i, layer in enumerate(unit.layers):
        state[f"{i}.alpha"] = layer.weight_quant.alpha.detach().clone()
        state[f"{i}.act_scale"] = layer.act_quant.scale.detach().clone()
    return state


def load_unit_state(unit: Unit, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for i, layer in enumerate(unit.layers):
            layer.weight_quant.alpha.copy_(state[f"{i}.alpha"])
            layer.act_quant.scale.copy_(state[f"{i}.act_scale"])
    _set_mode(unit.layers, RoundMode.HARD)


def unit_seed(seed: int, index: int) -> int:
    """Independent, reproducible stream per unit so a resumed run draws the same batches."""
    return (seed * 1_000_003 + index * 7919) % (2**63 - 1)
