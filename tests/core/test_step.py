"""The replayable reconstruction step: the same updates as a plain eager loop, bit for bit on
a CPU; on a GPU, captured CUDA graphs give the eager step's updates."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from d4c_core.models import LoadedModel
from d4c_core.quant.capture import prefix_data
from d4c_core.quant.range_init import init_ranges
from d4c_core.quant.reconstruct import Unit, optimize_unit, unit_loss, unit_seed, units
from d4c_core.quant.step import act_lr, b_schedule, make_schedule
from d4c_core.quant.wrap import wrap_for_quantization
from d4c_core.recipe import QuantRecipe

FAST = {"mse_candidates": 20, "range_init_images": 16, "range_init_prompts": 16}


def _reference_loop(
    unit: Unit, inputs: torch.Tensor, targets: torch.Tensor, recipe: QuantRecipe, seed: int
) -> None:
    """The loop as it was written before the step: Python-float b and lr, per-iteration
    indexing, a fresh (non-capturable, float-lr) fused Adam."""
    iters = recipe.recon_iters
    wqs = [layer.weight_quant for layer in unit.layers]
    alphas = [wq.alpha for wq in wqs]
    steps = [layer.act_quant.scale for layer in unit.layers]
    for layer in unit.layers:
        layer.weight_quant.begin_soft(layer.weight)
    for p in alphas + steps:
        p.requires_grad_(True)
    lr_act = act_lr(recipe, unit.tower)
    opt = torch.optim.Adam(
        [{"params": alphas, "lr": recipe.lr_alpha}, {"params": steps, "lr": lr_act}], fused=True
    )
    gen = torch.Generator().manual_seed(seed)
    batches = torch.randint(0, len(inputs), (iters, recipe.recon_batch), generator=gen)
    with torch.enable_grad():
        for it in range(iters):
            idx = batches[it]
            x, y = inputs.index_select(0, idx), targets.index_select(0, idx)
            loss = unit_loss(unit.module(x), y)
            b = b_schedule(it, iters, recipe)
            if b is not None:
                loss = loss + recipe.adaround_lambda * sum(wq.round_loss(b) for wq in wqs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            opt.param_groups[1]["lr"] = 0.5 * lr_act * (1 + math.cos(math.pi * (it + 1) / iters))
    for p in alphas + steps:
        p.requires_grad_(False)
        p.grad = None
    for wq in wqs:
        wq.end_soft()


def _two_copies(lm: LoadedModel, pick: int, device: str, **quant: object):
    recipe = QuantRecipe(**(FAST | {"weight_bits": 4, "act_bits": 4} | quant))  # type: ignore[arg-type]
    model = wrap_for_quantization(copy.deepcopy(lm.model), recipe).to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, lm.image_size, lm.image_size, generator=g).to(device)
    tokens = lm.tokenizer(["a photo of a cat.", "a red star.", "a blue circle."] * 8).to(device)
    init_ranges(model, images, tokens, recipe)
    twin = copy.deepcopy(model)
    out = []
    for m in (model, twin):
        u = units(m)[pick]
        x, y = prefix_data(m, u.module, u.tower, images, tokens, batch=8)
        out.append((u, x, y))
    return recipe, out


def _learned(u: Unit) -> list[torch.Tensor]:
    return [t for layer in u.layers for t in (layer.weight_quant.alpha, layer.act_quant.scale)]


@pytest.mark.parametrize(("arch", "pick"), [("d4c-tiny-vit", 5), ("d4c-tiny-rn", 3)])
def test_step_updates_equal_the_eager_loop_bit_for_bit(
    tiny: dict[str, LoadedModel], arch: str, pick: int
) -> None:
    """Both phases (warm-up, then the annealed regularizer) and the lr schedule."""
    recipe, ((u, x, y), (ref, rx, ry)) = _two_copies(tiny[arch], pick, "cpu", recon_iters=25)
    seed = unit_seed(0, u.index)
    optimize_unit(u, x, y, recipe, seed)
    _reference_loop(ref, rx, ry, recipe, seed)
    for got, want in zip(_learned(u), _learned(ref), strict=True):
        assert torch.equal(got, want)
    fresh = _two_copies(tiny[arch], pick, "cpu", recon_iters=25)[1][0][0]
    assert not torch.equal(_learned(u)[0], _learned(fresh)[0])  # the step did learn


def test_schedule_matches_the_loops_formulas() -> None:
    recipe = QuantRecipe(recon_iters=40, recon_batch=4)
    s = make_schedule(recipe, rows=10, lr_act=4e-5, seed=7, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(s.batches, torch.randint(0, 10, (40, 4), generator=gen))
    assert s.warm == 8 and not s.b_is_one
    for it in range(8, 40):
        b = b_schedule(it, 40, recipe)
        assert b is not None
        assert s.bm1[it].item() == torch.tensor(b - 1, dtype=torch.float32).item()
        assert s.m2b[it].item() == torch.tensor(-2 * b, dtype=torch.float32).item()
    want = [4e-5] + [0.5 * 4e-5 * (1 + math.cos(math.pi * it / 40)) for it in range(1, 40)]
    assert s.lr_act.dtype == torch.float64 and s.lr_act.tolist() == want
    flat = QuantRecipe(recon_iters=5, adaround_b_start=1.0, adaround_b_end=1.0)
    assert make_schedule(flat, 3, 1e-5, 0, torch.device("cpu")).b_is_one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_give_the_eager_updates(
    tiny: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, ((u, x, y), (ref, rx, ry)) = _two_copies(
        tiny["d4c-tiny-vit"], 5, "cuda", recon_iters=40
    )
    seed = unit_seed(0, u.index)
    monkeypatch.setenv("D4C_CUDA_GRAPHS", "1")
    optimize_unit(u, x, y, recipe, seed)
    monkeypatch.setenv("D4C_CUDA_GRAPHS", "0")
    optimize_unit(ref, rx, ry, recipe, seed)
    for got, want in zip(_learned(u), _learned(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
