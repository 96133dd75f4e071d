"""Boundary capture: the same unit data as the prefix capture, in linear time, spilled
exactly when over budget."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from d4c_core.models import LoadedModel
from d4c_core.quant.capture import BoundaryCapture, chain, prefix_data
from d4c_core.quant.range_init import init_ranges
from d4c_core.quant.reconstruct import Unit, reconstruct_unit, unit_mse, unit_seed, units
from d4c_core.quant.wrap import wrap_for_quantization
from d4c_core.recipe import QuantRecipe

FAST = {"mse_candidates": 20, "range_init_images": 16, "range_init_prompts": 16}
ARCHS = ("d4c-tiny-vit", "d4c-tiny-rn")


def _prepared(lm: LoadedModel, n: int = 24) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    recipe = QuantRecipe(**(FAST | {"weight_bits": 4, "act_bits": 4}))  # type: ignore[arg-type]
    model = wrap_for_quantization(copy.deepcopy(lm.model), recipe)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, lm.image_size, lm.image_size, generator=g)
    words = ("cat", "dog", "car", "tree", "red star", "blue circle")
    tokens = lm.tokenizer([f"a photo of a {w}." for w in words] * (n // len(words)))
    init_ranges(model, images, tokens, recipe)
    return model, images, tokens


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """1e-6 relative to the tensor's scale (elementwise rtol fails on values near zero)."""
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * want.abs().max().item(), err


@pytest.mark.parametrize("arch", ARCHS)
def test_every_unit_gets_the_prefix_captures_data(tiny: dict[str, LoadedModel], arch: str) -> None:
    """Through a whole reconstruction (weights change unit by unit, so a stale boundary would
    show), each unit's input and target equal a fresh prefix capture of the same state."""
    model, images, tokens = _prepared(tiny[arch])
    recipe = QuantRecipe(**(FAST | {"weight_bits": 4, "act_bits": 4, "recon_iters": 3}))  # type: ignore[arg-type]
    todo = units(model)
    data = BoundaryCapture(model, [u.module for u in todo], images, tokens, batch=8)
    prev: tuple[Unit, torch.Tensor, torch.Tensor] | None = None
    measured = 0
    try:
        for u in todo:
            done = None if prev is None else (prev[0].module, prev[2])
            inputs, targets, after = data.data(u.module, u.tower, done)
            ref_in, ref_out = prefix_data(model, u.module, u.tower, images, tokens, batch=8)
            _close(inputs, ref_in)
            _close(targets, ref_out)
            if prev is not None and after is not None:
                # The previous unit's final error, from the replay: what unit_mse computes.
                assert after == pytest.approx(unit_mse(prev[0].module, prev[1], prev[2]), rel=1e-5)
                measured += 1
            reconstruct_unit(u, inputs, targets, recipe, unit_seed(0, u.index))
            prev = (u, inputs, targets)
    finally:
        data.close()
    towers = {u.tower for u in todo}
    assert measured == len(todo) - len(towers)  # all but each tower's last unit


@pytest.mark.parametrize("arch", ARCHS)
def test_every_unit_lies_in_a_chain_block(tiny: dict[str, LoadedModel], arch: str) -> None:
    """No supported tower falls back to the quadratic prefix capture."""
    model, *_ = _prepared(tiny[arch], n=6)
    for u in units(model):
        blocks = chain(model, u.tower)
        assert any(u.module is b or any(u.module is m for m in b.modules()) for b in blocks)


def test_over_budget_boundaries_spill_exactly_and_are_removed(
    tiny: dict[str, LoadedModel], tmp_path: Path
) -> None:
    model, images, tokens = _prepared(tiny["d4c-tiny-vit"], n=12)
    todo = units(model)
    mods = [u.module for u in todo]
    held = BoundaryCapture(model, mods, images, tokens, batch=4)
    spilt = BoundaryCapture(
        model, mods, images, tokens, batch=4, budget_bytes=0, spill_dir=tmp_path
    )
    try:
        for u in todo[:14]:  # two image blocks and into the third
            a, b = held.data(u.module, u.tower)[:2], spilt.data(u.module, u.tower)[:2]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert held.spilled == 0 and spilt.spilled >= 2
        assert any(tmp_path.iterdir())
    finally:
        held.close()
        spilt.close()
    assert not any(tmp_path.iterdir())  # boundaries are dropped with their files
