"""Reconstruction: unit layout, AdaRound schedule, caching, and that it lowers unit error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from open_clip.modified_resnet import Bottleneck

from d4c_core.models import LoadedModel
from d4c_core.quant.capture import prefix_data
from d4c_core.quant.quantizers import RoundMode
from d4c_core.quant.range_init import init_ranges
from d4c_core.quant.reconstruct import (
    reconstruct_unit,
    unit_loss,
    unit_seed,
    units,
)
from d4c_core.quant.step import b_schedule
from d4c_core.quant.wrap import QuantLayer, fp_mode, wrap_for_quantization
from d4c_core.recipe import QuantRecipe

FAST = {"mse_candidates": 20, "range_init_images": 16, "range_init_prompts": 16}


def _prepared(
    lm: LoadedModel, **quant: object
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, QuantRecipe]:
    recipe = QuantRecipe(**(FAST | quant))  # type: ignore[arg-type]
    fp = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(1)
    for m in fp.modules():
        # open_clip zero-inits each Bottleneck's last BN: a random-init branch outputs 0.
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 1 + 0.1 * torch.randn(m.weight.shape, generator=g)
    model = wrap_for_quantization(fp, recipe)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, lm.image_size, lm.image_size, generator=g)
    tokens = lm.tokenizer([f"a photo of a {w}." for w in ("cat", "dog", "car", "tree")] * 8)
    init_ranges(model, images, tokens, recipe)
    return model, images, tokens, recipe


def test_units_vit_each_linear_in_order(tiny: dict[str, LoadedModel]) -> None:
    model, *_ = _prepared(tiny["d4c-tiny-vit"])
    us = units(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    assert all(len(u.layers) == 1 for u in us)
    assert sorted(u.name for u in us) == sorted(layers)
    towers = [u.tower for u in us]
    assert towers == sorted(towers, key=lambda t: t != "image")  # image tower first
    assert us[0].name.endswith("resblocks.0.attn.q_proj")
    assert [u.index for u in us] == list(range(len(us)))


def test_units_resnet_blocks_and_attnpool(tiny: dict[str, LoadedModel]) -> None:
    model, *_ = _prepared(tiny["d4c-tiny-rn"])
    image = [u for u in units(model) if u.tower == "image"]
    blocks = [u for u in image if isinstance(u.module, Bottleneck)]
    assert len(blocks) == 8  # layers [2, 2, 2, 2]
    assert all(len(u.layers) == 3 for u in blocks)  # conv1..3; downsample stays FP
    pool = [u.name.rsplit(".", 1)[-1] for u in image if "attnpool" in u.name]
    assert pool == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert image[: len(blocks)] == blocks


def test_b_schedule_warmup_then_linear_anneal() -> None:
    r = QuantRecipe(recon_iters=100)
    assert all(b_schedule(i, 100, r) is None for i in range(20))
    assert b_schedule(20, 100, r) == pytest.approx(20.0)
    assert b_schedule(60, 100, r) == pytest.approx(20 - 18 * 40 / 80)
    assert b_schedule(99, 100, r) == pytest.approx(2 + 18 / 80)


def test_prefix_data_caches_quantized_input_and_fp_target(tiny: dict[str, LoadedModel]) -> None:
    model, images, tokens, _ = _prepared(tiny["d4c-tiny-vit"])
    unit = units(model)[6]  # block 1 q_proj: its input depends on quantized block 0
    inputs, targets = prefix_data(model, unit.module, unit.tower, images, tokens, batch=8)
    seen: dict[str, torch.Tensor] = {}
    h = unit.module.register_forward_pre_hook(lambda _m, a: seen.__setitem__("q", a[0].clone()))
    with torch.no_grad():
        model.encode_image(images)
        h.remove()
        h = unit.module.register_forward_hook(lambda _m, _a, o: seen.__setitem__("fp", o.clone()))
        with fp_mode(model):
            model.encode_image(images)
        h.remove()
    torch.testing.assert_close(inputs, seen["q"], rtol=0, atol=0)
    torch.testing.assert_close(targets, seen["fp"], rtol=0, atol=0)
    with fp_mode(model), torch.no_grad():
        fp_in = []
        h = unit.module.register_forward_pre_hook(lambda _m, a: fp_in.append(a[0]))
        model.encode_image(images)
        h.remove()
    assert not torch.equal(inputs, fp_in[0])  # the prefix really was quantized


@pytest.mark.parametrize(
    "arch,picks", [("d4c-tiny-vit", (0, 4, 5, -1)), ("d4c-tiny-rn", (0, 4, 9, -1))]
)
def test_reconstruction_lowers_unit_error(
    tiny: dict[str, LoadedModel], arch: str, picks: tuple[int, ...]
) -> None:
    model, images, tokens, recipe = _prepared(
        tiny[arch], weight_bits=3, act_bits=4, recon_iters=150
    )
    us = units(model)
    for k in picks:
        u = us[k]
        inputs, targets = prefix_data(model, u.module, u.tower, images, tokens, batch=64)
        res = reconstruct_unit(u, inputs, targets, recipe, unit_seed(0, u.index))
        assert res.mse_final < res.mse_init, (u.name, res)
        assert all(layer.weight_quant.mode == RoundMode.HARD for layer in u.layers)
        assert not any(p.requires_grad for p in u.module.parameters())
        # Independent recomputation of the reported final error.
        with torch.no_grad():
            direct = unit_loss(u.module(inputs), targets).item()
        assert direct == pytest.approx(res.mse_final, rel=1e-4)


def test_reconstruction_is_deterministic_under_seed(tiny: dict[str, LoadedModel]) -> None:
    lm = tiny["d4c-tiny-vit"]
    alphas = []
    for _ in range(2):
        model, images, tokens, recipe = _prepared(lm, recon_iters=30)
        u = units(model)[0]
        inputs, targets = prefix_data(model, u.module, u.tower, images, tokens, batch=64)
        reconstruct_unit(u, inputs, targets, recipe, unit_seed(3, u.index))
        alphas.append(u.layers[0].weight_quant.alpha.clone())
    torch.testing.assert_close(alphas[0], alphas[1], rtol=0, atol=0)


def test_unit_loss_is_per_sample_squared_error_averaged_over_the_batch() -> None:
    """QDrop's lp_loss (p=2) against a float64 numpy reference, on 3-D token inputs."""
    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(5, 7, 3, generator=gen), torch.randn(5, 7, 3, generator=gen)
    o, t = out.double().numpy(), target.double().numpy()
    want = np.mean([((o[i] - t[i]) ** 2).sum() for i in range(5)])
    assert unit_loss(out, target).item() == pytest.approx(want, rel=1e-6)


def test_unit_loss_gradient_matches_float64_autograd() -> None:
    """The hand-written backward against autograd of the plain formula in float64, with a
    non-unit upstream gradient (the loss is scaled before backward in a real step)."""
    gen = torch.Generator().manual_seed(1)
    out, target = torch.randn(6, 9, 4, generator=gen), torch.randn(6, 9, 4, generator=gen)
    o = out.clone().requires_grad_(True)
    (unit_loss(o, target) * 0.37).backward()
    o64 = out.double().requires_grad_(True)
    (((o64 - target.double()) ** 2).sum() / 6 * 0.37).backward()
    assert o.grad is not None and o64.grad is not None
    torch.testing.assert_close(o.grad.double(), o64.grad, rtol=1e-6, atol=1e-7)
