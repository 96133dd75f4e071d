"""Layer wrapping: FP equivalence with open_clip, the keep-FP list, bit widths and states."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from d4c_core.models import LoadedModel
from d4c_core.quant.grid import qparams
from d4c_core.quant.quantizers import ActQuantizer
from d4c_core.quant.wrap import (
    QuantAttentionPool2d,
    QuantLayer,
    QuantMultiheadAttention,
    act_quantizers,
    fp_mode,
    quant_layers,
    set_quant_state,
    wrap_for_quantization,
)
from d4c_core.recipe import QuantRecipe

ARCHS = ["d4c-tiny-vit", "d4c-tiny-rn"]
PROMPTS = ["a photo of a cat", "a diagram", "", "a very long prompt " * 3]
ATOL = 1e-5  # FP wrapped vs open_clip, on outputs of magnitude ~1


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def wrapped(lm: LoadedModel, **recipe: object) -> nn.Module:
    return wrap_for_quantization(copy.deepcopy(lm.model), QuantRecipe(**recipe))  # type: ignore[arg-type]


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    assert got.shape == want.shape
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol * scale)


# ----------------------------------------------------------------------------- FP equivalence


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_wrapped_model_is_fp_equal_to_open_clip(tiny: dict[str, LoadedModel], arch: str) -> None:
    lm = tiny[arch]
    q = wrapped(lm)
    assert len(quant_layers(q)) > 0
    x = images()
    tokens = lm.tokenizer(PROMPTS)
    ref_img, ref_txt = lm.model.encode_image(x), lm.model.encode_text(tokens)
    assert ref_img.abs().max() > 0.1 and ref_txt.abs().max() > 0.1  # not trivially zero
    assert_close(q.encode_image(x), ref_img)
    assert_close(q.encode_text(tokens), ref_txt)


def causal_masks(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    bool_mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)  # True = blocked
    float_mask = torch.zeros(n, n).masked_fill(bool_mask, float("-inf"))
    return float_mask, bool_mask


@torch.no_grad()
def test_residual_block_with_masks(tiny: dict[str, LoadedModel]) -> None:
    lm = tiny["d4c-tiny-vit"]
    q = wrapped(lm)
    blk_ref = lm.model.transformer.resblocks[1]
    blk_q = q.transformer.resblocks[1]
    assert isinstance(blk_ref, ResidualAttentionBlock)
    assert isinstance(blk_q.attn, QuantMultiheadAttention)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    float_mask, bool_mask = causal_masks(7)
    assert_close(blk_q(x), blk_ref(x))
    assert_close(blk_q(x, attn_mask=float_mask), blk_ref(x, attn_mask=float_mask))
    # The block casts a bool mask to the input dtype (an additive 0/1 mask): same on both.
    assert_close(blk_q(x, attn_mask=bool_mask), blk_ref(x, attn_mask=bool_mask))
    # Masking must matter, or the comparisons above prove nothing about it.
    assert not torch.allclose(blk_ref(x, attn_mask=float_mask), blk_ref(x), atol=1e-3)


@torch.no_grad()
def test_attention_module_mask_forms(tiny: dict[str, LoadedModel]) -> None:
    """nn.MultiheadAttention's own mask conventions: bool (True = blocked), 3-D, padding."""
    lm = tiny["d4c-tiny-vit"]
    mha = lm.model.transformer.resblocks[0].attn
    assert isinstance(mha, nn.MultiheadAttention) and mha.batch_first
    qmha = QuantMultiheadAttention(copy.deepcopy(mha), 4, 8)
    g = torch.Generator().manual_seed(2)
    b, n, h = 2, 6, mha.num_heads
    x = torch.randn(b, n, 64, generator=g)
    float_mask, bool_mask = causal_masks(n)
    mask3 = torch.randn(b * h, n, n, generator=g)
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[0, -2:] = True
    cases: list[dict[str, torch.Tensor]] = [
        {},
        {"attn_mask": float_mask},
        {"attn_mask": bool_mask},
        {"attn_mask": mask3},
        {"key_padding_mask": kpm},
        {"attn_mask": bool_mask, "key_padding_mask": kpm},
    ]
    for kw in cases:
        want = mha(x, x, x, need_weights=False, **kw)[0]
        got, weights = qmha(x, x, x, need_weights=False, **kw)
        assert weights is None
        assert_close(got, want)


@torch.no_grad()
def test_attention_pool_equals_open_clip(tiny: dict[str, LoadedModel]) -> None:
    pool = tiny["d4c-tiny-rn"].model.visual.attnpool
    assert isinstance(pool, AttentionPool2d)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, pool.k_proj.in_features, 1, 1, generator=g)
    assert_close(QuantAttentionPool2d(copy.deepcopy(pool), 4, 8)(x), pool(x))
    # A pool with a real spatial grid (3x3 tokens + mean token) and a different output dim.
    torch.manual_seed(0)
    big = AttentionPool2d(spacial_dim=3, embed_dim=32, num_heads=4, output_dim=24).eval()
    x = torch.randn(2, 32, 3, 3, generator=g)
    got = QuantAttentionPool2d(copy.deepcopy(big), 4, 8)(x)
    assert got.shape == (2, 24)
    assert_close(got, big(x))


# ----------------------------------------------------------------------------- structure


def test_vit_keep_fp_list_and_bits(tiny: dict[str, LoadedModel]) -> None:
    lm = tiny["d4c-tiny-vit"]
    before = copy.deepcopy(lm.model)
    norms = {n: m for n, m in before.named_modules() if isinstance(m, nn.LayerNorm)}
    q = wrap_for_quantization(before, QuantRecipe(weight_bits=4, act_bits=8))
    assert type(q.visual.conv1) is nn.Conv2d
    assert type(q.token_embedding).__name__ == "QuantEmbedding"  # the table is coded
    after = {n: m for n, m in q.named_modules() if isinstance(m, nn.LayerNorm)}
    assert after.keys() == norms.keys() and all(after[n] is norms[n] for n in norms)
    assert len(norms) > 0
    # Every Linear inside the transformers is now a QuantLayer; none is left behind.
    for tower in (q.visual.transformer, q.transformer):
        assert not any(type(m) is nn.Linear for m in tower.modules())
        assert not any(isinstance(m, nn.MultiheadAttention) for m in tower.modules())
    for blk in q.visual.transformer.resblocks:
        for layer in (blk.attn.q_proj, blk.mlp.c_fc, blk.mlp.c_proj, blk.attn.out_proj):
            assert (layer.weight_quant.bits, layer.act_quant.bits) == (4, 8)


@pytest.mark.parametrize(("w", "a"), [(4, 8), (2, 3)])
def test_text_mlp_stays_8_bit_and_quantizer_granularity(
    tiny: dict[str, LoadedModel], w: int, a: int
) -> None:
    q = wrapped(tiny["d4c-tiny-vit"], weight_bits=w, act_bits=a)
    for tower, mlp_bits in ((q.transformer, 8), (q.visual.transformer, w)):
        for blk in tower.resblocks:
            attn = blk.attn
            assert isinstance(attn, QuantMultiheadAttention)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                assert (lin.weight_quant.bits, lin.act_quant.bits) == (w, a)
            for aq in (attn.q_quant, attn.k_quant, attn.v_quant, attn.softmax_quant):
                assert aq.bits == a and aq.channels is None and not aq.learnable
            mlp_a = 8 if tower is q.transformer else a
            for lin in (blk.mlp.c_fc, blk.mlp.c_proj):
                assert (lin.weight_quant.bits, lin.act_quant.bits) == (mlp_bits, mlp_a)
            # Per-channel input quantizers over the hidden dim for q/k/v and c_fc.
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, blk.mlp.c_fc):
                assert lin.act_quant.channels == lin.weight.shape[1]
                assert lin.act_quant.scale.shape == (lin.weight.shape[1],)
            for lin in (attn.out_proj, blk.mlp.c_proj):
                assert lin.act_quant.channels is None
            # Weight quantizers are per output channel.
            assert blk.mlp.c_fc.weight_quant.scale.shape == (blk.mlp.c_fc.weight.shape[0], 1)


def test_resnet_keep_fp_list(tiny: dict[str, LoadedModel]) -> None:
    q = wrapped(tiny["d4c-tiny-rn"], weight_bits=6, act_bits=6)
    v = q.visual
    assert isinstance(v, ModifiedResNet)
    for name in ("conv1", "conv2", "conv3"):
        assert type(getattr(v, name)) is nn.Conv2d
        assert type(getattr(v, name.replace("conv", "bn"))) is nn.BatchNorm2d
    blocks = [m for m in v.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 8
    n_down = 0
    for blk in blocks:
        for name in ("conv1", "conv2", "conv3"):
            layer = getattr(blk, name)
            assert isinstance(layer, QuantLayer) and layer.is_conv
            assert (layer.weight_quant.bits, layer.act_quant.bits) == (6, 6)
            assert layer.act_quant.channels is None  # convs: per-tensor input
            assert layer.weight_quant.scale.shape == (layer.weight.shape[0], 1, 1, 1)
        for name in ("bn1", "bn2", "bn3"):
            assert type(getattr(blk, name)) is nn.BatchNorm2d
        if blk.downsample is not None:
            n_down += 1
            assert not any(isinstance(m, QuantLayer) for m in blk.downsample.modules())
            assert any(type(m) is nn.Conv2d for m in blk.downsample.modules())
    assert n_down > 0
    assert isinstance(v.attnpool, QuantAttentionPool2d)
    pool_layers = [m for m in v.attnpool.modules() if isinstance(m, QuantLayer)]
    assert len(pool_layers) == 4
    assert [n for n, m in v.attnpool.named_children() if isinstance(m, QuantLayer)] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
    ]
    assert type(q.token_embedding).__name__ == "QuantEmbedding"


@pytest.mark.parametrize("arch", ARCHS)
def test_quant_layers_order(tiny: dict[str, LoadedModel], arch: str) -> None:
    q = wrapped(tiny[arch])
    infos = quant_layers(q)
    towers = [i.tower for i in infos]
    n_img = towers.count("image")
    assert n_img > 0 and towers.count("text") == 3 * 6  # 3 text blocks x (q, k, v, out, fc, proj)
    assert towers == ["image"] * n_img + ["text"] * (len(towers) - n_img)
    assert all(i.name.startswith("visual.") == (i.tower == "image") for i in infos)
    # Within a tower: model order, each layer once, and exactly the QuantLayers of the model.
    module_order = [n for n, m in q.named_modules() if isinstance(m, QuantLayer)]
    for tower in ("image", "text"):
        names = [i.name for i in infos if i.tower == tower]
        assert names == [n for n in module_order if n.startswith("visual.") == (tower == "image")]
    assert sorted(i.name for i in infos) == sorted(module_order)
    assert all(dict(q.named_modules())[i.name] is i.module for i in infos)
    expected_img = 4 * 6 if arch == "d4c-tiny-vit" else 8 * 3 + 4
    assert n_img == expected_img


class TextFirst(nn.Module):
    """A CLIP-like container whose text tower is registered before its image tower."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.transformer = clip.transformer
        self.visual = clip.visual


def test_quant_layers_puts_image_first_whatever_the_module_order(
    tiny: dict[str, LoadedModel],
) -> None:
    m = wrap_for_quantization(
        TextFirst(copy.deepcopy(tiny["d4c-tiny-vit"].model)), QuantRecipe(token_embedding_bits=0)
    )
    assert next(n for n, x in m.named_modules() if isinstance(x, QuantLayer)).startswith(
        "transformer."
    )
    towers = [i.tower for i in quant_layers(m)]
    assert towers == ["image"] * 24 + ["text"] * 18
    names = [i.name for i in quant_layers(m)]
    assert names[0] == "visual.transformer.resblocks.0.attn.q_proj"
    assert names[24] == "transformer.resblocks.0.attn.q_proj"


def test_quantize_image_false_leaves_visual_untouched(tiny: dict[str, LoadedModel]) -> None:
    lm = tiny["d4c-tiny-vit"]
    m = copy.deepcopy(lm.model)
    visual_modules = list(m.visual.modules())
    q = wrap_for_quantization(m, QuantRecipe(quantize_image=False))
    assert list(q.visual.modules()) == visual_modules  # same objects, same order
    assert all(i.tower == "text" for i in quant_layers(q)) and quant_layers(q)
    assert not any(n.startswith("visual.") for n, _ in act_quantizers(q))
    q2 = wrapped(lm, quantize_text=False)
    assert all(i.tower == "image" for i in quant_layers(q2))
    assert any(isinstance(x, nn.MultiheadAttention) for x in q2.transformer.modules())


# ----------------------------------------------------------------------------- quant state


def init_cheaply(model: nn.Module, x: torch.Tensor) -> None:
    """Min-max weight and activation ranges (one FP pass): enough to make quantization bite."""
    for info in quant_layers(model):
        wq, w = info.module.weight_quant, info.module.weight
        rows = w.reshape(w.shape[0], -1)
        s, z = qparams(rows.min(1).values, rows.max(1).values, wq.qmin, wq.qmax)
        wq.scale.copy_(s.view_as(wq.scale))
        wq.zero_point.copy_(z.view_as(wq.zero_point))

    def record(aq: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(aq, ActQuantizer)
        rows = args[0].reshape(-1, aq.channels).t() if aq.channels else args[0].reshape(1, -1)
        s, z = qparams(rows.min(1).values, rows.max(1).values, aq.qmin, aq.qmax)
        aq.scale.data.copy_(s)
        aq.zero_point.copy_(z)

    hooks = [aq.register_forward_pre_hook(record) for _, aq in act_quantizers(model)]
    with torch.no_grad():
        model.encode_image(x)
    for h in hooks:
        h.remove()


@torch.no_grad()
def test_set_quant_state_and_fp_mode_restore(tiny: dict[str, LoadedModel]) -> None:
    lm = tiny["d4c-tiny-vit"]
    q = wrapped(lm, weight_bits=2, act_bits=3)
    x = images(2, seed=5)
    fp = lm.model.encode_image(x)
    init_cheaply(q, x)
    assert_close(q.encode_image(x), fp)  # observed but still disabled: FP

    set_quant_state(q, weights=True, acts=True)
    quant = q.encode_image(x)
    assert (quant - fp).abs().max() > 1e-2
    with fp_mode(q) as m:
        assert m is q
        assert_close(q.encode_image(x), fp)
    torch.testing.assert_close(q.encode_image(x), quant, rtol=0, atol=0)

    set_quant_state(q, weights=True, acts=False)
    w_only = q.encode_image(x)
    assert (w_only - fp).abs().max() > 1e-2 and (w_only - quant).abs().max() > 1e-3
    assert all(i.module.quant_weight for i in quant_layers(q))
    assert not any(aq.enabled for _, aq in act_quantizers(q))

    # Mixed per-module state survives fp_mode, also when the body raises.
    layers = quant_layers(q)
    layers[0].module.quant_weight = False
    aqs = [aq for _, aq in act_quantizers(q)]
    aqs[1].enabled = True
    state = [i.module.quant_weight for i in layers], [aq.enabled for aq in aqs]
    with pytest.raises(RuntimeError, match="boom"), fp_mode(q):
        assert not any(i.module.quant_weight for i in layers)
        assert not any(aq.enabled for aq in aqs)
        raise RuntimeError("boom")
    assert ([i.module.quant_weight for i in layers], [aq.enabled for aq in aqs]) == state

    set_quant_state(q, weights=False, acts=False)
    assert_close(q.encode_image(x), fp)


def test_quant_layer_forward_matches_numpy_reference() -> None:
    """Enabled per-channel input + per-row weight fake quantization, then the affine map."""
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(6, 5)
    layer = QuantLayer(lin, w_bits=4, a_bits=5, per_channel_input=True)
    x = torch.randn(3, 7, 6, generator=g) * torch.linspace(0.2, 3.0, 6)
    layer.act_quant.observe(x)
    layer.weight_quant.init_range(layer.weight)
    layer.act_quant.enabled = True
    layer.quant_weight = True
    got = layer(x).double().numpy()

    def fq(v: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
        q = np.clip(np.round(v / s) + z, 0, 2**bits - 1)
        return (q - z) * s

    aq, wq = layer.act_quant, layer.weight_quant
    xs = fq(
        x.double().numpy(), aq.scale.detach().double().numpy(), aq.zero_point.double().numpy(), 5
    )
    ws = fq(
        lin.weight.detach().double().numpy(),
        wq.scale.double().numpy(),
        wq.zero_point.double().numpy(),
        4,
    )
    want = xs @ ws.T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - (x.double().numpy() @ lin.weight.detach().double().numpy().T)).max() > 1e-3
    assert isinstance(aq, ActQuantizer) and aq.channels == 6


# --------------------------------------------------------------------------- token table


def test_token_table_is_coded_per_row_against_float64(tiny: dict[str, LoadedModel]) -> None:
    """Each looked-up row is ``(clip(round(w/s) + z, 0, 2^b-1) - z) * s`` with its own min-max
    range (float64 reference), only the rows looked up are computed, and the error per entry
    stays within half a step."""
    from d4c_core.quant.range_init import search_args
    from d4c_core.quant.wrap import QuantEmbedding

    lm = tiny["d4c-tiny-vit"]
    for bits in (8, 4):
        m = wrapped(lm, token_embedding_bits=bits)
        emb = m.token_embedding
        assert isinstance(emb, QuantEmbedding) and emb.weight_quant.bits == bits
        emb.weight_quant.init_range(emb.weight, **search_args(QuantRecipe()))
        ids = lm.tokenizer(PROMPTS)
        emb.quant_weight = False
        assert torch.equal(emb(ids), lm.model.token_embedding(ids))  # off: the FP table
        emb.quant_weight = True
        got = emb(ids).double()
        w = emb.weight.double()[ids]
        lo = w.amin(-1, keepdim=True).clamp(max=0)
        hi = w.amax(-1, keepdim=True).clamp(min=0)
        s = emb.weight_quant.scale.double()[ids]
        assert torch.allclose(s, (hi - lo) / (2**bits - 1), rtol=1e-6)
        z = emb.weight_quant.zero_point.double()[ids]
        ref = (torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1) - z) * s
        assert torch.allclose(got, ref, rtol=0, atol=1e-6)
        assert ((got - w).abs() <= s / 2 + 1e-6).all()
        assert (got != w).any()
        full = emb.weight_quant(emb.weight)[ids]
        assert torch.equal(emb(ids), full)  # the row-only path is the whole table's rows


def test_token_table_bits_zero_or_no_text_tower_keeps_nn_embedding(
    tiny: dict[str, LoadedModel],
) -> None:
    from d4c_core.quant.wrap import QuantEmbedding, coded_weights

    assert isinstance(
        wrapped(tiny["d4c-tiny-vit"], token_embedding_bits=0).token_embedding, nn.Embedding
    )
    m = wrapped(tiny["d4c-tiny-vit"], quantize_text=False)
    assert type(m.token_embedding) is nn.Embedding
    m = wrapped(tiny["d4c-tiny-rn"])
    assert isinstance(m.token_embedding, QuantEmbedding)
    assert coded_weights(m)[-1] == ("token_embedding", m.token_embedding)
    set_quant_state(m, weights=True, acts=False)
    assert m.token_embedding.quant_weight
    with fp_mode(m):
        assert not m.token_embedding.quant_weight
    assert m.token_embedding.quant_weight
