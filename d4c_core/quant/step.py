"""One reconstruction iteration as a step a GPU can replay: no host work between iterations.

On a GPU a unit's iteration is ~40 small kernels (~2.2 ms on an H100 whatever the unit's
size), so the loop is launch-bound. Here nothing an iteration does depends on the host: the
mini-batch rows, AdaRound's exponent and the step sizes' lr are precomputed as tensors on the
data's device (``Schedule``) and read through a counter the step itself advances; the batch is
gathered into fixed buffers; Adam keeps its lr as a float64 tensor (bit-identical to a float
lr) and, on a GPU, is capturable. So the very step the CPU runs eagerly can be captured once
per unit and phase and replayed as a CUDA graph: one launch per iteration.

The two phases (warm-up without the rounding regularizer, then annealing) are two steps,
chosen by the host's own loop counter. CUDA graphs are used when ``D4C_CUDA_GRAPHS=1`` (off by
default until the GPU check in ``tests/core/test_step.py`` has run on a device; any capture
error falls back to eager steps).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from d4c_core.recipe import QuantRecipe

log = logging.getLogger("d4c.reconstruct")

EAGER_BEFORE_CAPTURE = 3  # real iterations of a phase run eagerly before it is captured


def b_schedule(it: int, iters: int, recipe: QuantRecipe) -> float | None:
    """AdaRound's annealed exponent b, or None during warm-up (no rounding loss yet)."""
    warm = int(recipe.adaround_warmup * iters)
    if it < warm:
        return None
    t = (it - warm) / max(1, iters - warm)
    return recipe.adaround_b_end + (recipe.adaround_b_start - recipe.adaround_b_end) * max(
        0.0, 1 - t
    )


@dataclass(frozen=True)
class Schedule:
    """Everything that changes between iterations, one row per iteration, on the device."""

    batches: Tensor  # (iters, batch) rows of the cached data
    bm1: Tensor  # (iters,) b - 1, rounded from the double as a float b would be
    m2b: Tensor  # (iters,) -2 b
    lr_act: Tensor  # (iters,) float64: the step sizes' lr (cosine to zero)
    warm: int  # iterations before the regularizer starts
    b_is_one: bool  # b = 1 throughout: |u|^0 = 1, no exponent to read

    @property
    def iters(self) -> int:
        return len(self.batches)


def make_schedule(
    recipe: QuantRecipe, rows: int, lr_act: float, seed: int, device: torch.device
) -> Schedule:
    """The loop's schedule. Batches come from one CPU generator drawn at once (the same
    stream as one draw per iteration), moved once."""
    iters = recipe.recon_iters
    gen = torch.Generator().manual_seed(seed)
    batches = torch.randint(0, rows, (iters, recipe.recon_batch), generator=gen)
    bs = [b_schedule(it, iters, recipe) for it in range(iters)]
    b = torch.tensor([recipe.adaround_b_start if v is None else v for v in bs], dtype=torch.float64)
    # CosineAnnealingLR(T_max=iters, eta_min=0), the value used at each iteration.
    lr = [
        0.5 * lr_act * (1 + math.cos(math.pi * it / iters)) if it else lr_act for it in range(iters)
    ]
    return Schedule(
        batches=batches.to(device),
        bm1=(b - 1).float().to(device),
        m2b=(-2 * b).float().to(device),
        lr_act=torch.tensor(lr, dtype=torch.float64, device=device),
        warm=int(recipe.adaround_warmup * iters),
        b_is_one=recipe.adaround_b_start == recipe.adaround_b_end == 1,
    )


def act_lr(recipe: QuantRecipe, tower: str) -> float:
    """The input steps' initial lr: the towers' activations differ in scale."""
    return recipe.lr_act_image if tower == "image" else recipe.lr_act_text


def unit_optimizer(
    alphas: list[Tensor], steps: list[Tensor], recipe: QuantRecipe, tower: str
) -> torch.optim.Adam:
    """One fused Adam with two groups, rounding variables then input steps (whose lr the
    schedule anneals, hence a tensor): the update is one kernel call per iteration."""
    lr_act = act_lr(recipe, tower)
    device = alphas[0].device
    return torch.optim.Adam(
        [
            {"params": alphas, "lr": recipe.lr_alpha},
            {"params": steps, "lr": torch.tensor(lr_act, dtype=torch.float64, device=device)},
        ],
        fused=True,
        capturable=device.type == "cuda",
    )


class Step:
    """``step(reg)``: one iteration at the counter's position, then the counter advances."""

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        round_loss: Callable[[tuple[Tensor, Tensor] | None], Tensor],
        inputs: Tensor,
        targets: Tensor,
        sched: Schedule,
        opt: torch.optim.Adam,
        lam: float,
    ) -> None:
        self.forward, self.loss_fn, self.round_loss = forward, loss_fn, round_loss
        self.inputs, self.targets, self.sched, self.opt, self.lam = (
            inputs,
            targets,
            sched,
            opt,
            lam,
        )
        batch = sched.batches.shape[1]
        self.x = inputs.new_empty((batch, *inputs.shape[1:]))
        self.y = targets.new_empty((batch, *targets.shape[1:]))
        self.it = torch.zeros(1, dtype=torch.long, device=inputs.device)
        self.lr: Tensor = opt.param_groups[1]["lr"]

    def __call__(self, reg: bool) -> None:
        s = self.sched
        idx = s.batches.index_select(0, self.it).view(-1)
        # index_select: a few times faster than advanced indexing on CPU.
        torch.index_select(self.inputs, 0, idx, out=self.x)
        torch.index_select(self.targets, 0, idx, out=self.y)
        loss = self.loss_fn(self.forward(self.x), self.y)
        if reg:
            exps = (
                None
                if s.b_is_one
                else (s.bm1.index_select(0, self.it), s.m2b.index_select(0, self.it))
            )
            loss = loss + self.lam * self.round_loss(exps)
        self.lr.copy_(s.lr_act.index_select(0, self.it).view(()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.it.add_(1)


def cuda_graphs_enabled() -> bool:
    return os.environ.get("D4C_CUDA_GRAPHS", "0") == "1"


def run_steps(step: Step, graphed: bool) -> None:
    """All iterations: eagerly, or per phase a few eager ones (on a side stream, as capture
    needs) then one captured graph replayed for the rest (the counter lives on the device, so
    replays advance it)."""
    iters, warm = step.sched.iters, step.sched.warm
    for reg, start, stop in ((False, 0, min(warm, iters)), (True, min(warm, iters), iters)):
        if not graphed or stop - start <= EAGER_BEFORE_CAPTURE:
            for _ in range(stop - start):
                step(reg)
            continue
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(EAGER_BEFORE_CAPTURE):
                step(reg)
        torch.cuda.current_stream().wait_stream(side)
        left = stop - start - EAGER_BEFORE_CAPTURE
        graph = _capture(step, reg)
        for _ in range(left):
            if graph is None:  # capture refused: finish the phase eagerly
                step(reg)
            else:
                graph.replay()


def _capture(step: Step, reg: bool) -> torch.cuda.CUDAGraph | None:
    """One iteration recorded (not run) as a CUDA graph; None if capture is refused."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step(reg)
    except RuntimeError as exc:  # an op that cannot be captured: stay correct, run eager
        log.warning("CUDA graph capture failed; eager steps", extra={"error": str(exc)[:200]})
        return None
    return graph
