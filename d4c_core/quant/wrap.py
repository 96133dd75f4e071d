"""Swap a CLIP's layers for quantized twins: ``wrap_for_quantization(model, recipe)``.

open_clip's ``nn.MultiheadAttention`` and ModifiedResNet's attention pool call
``F.multi_head_attention_forward`` with their weights directly, so hooks on their Linear
children never fire and nothing inside could be quantized. They are replaced by explicit
q/k/v/out projections with quantizers on q, k, v and on the softmax output. With every
quantizer disabled the wrapped model computes what open_clip computes (tested to 1e-5), so
the same wrapped model serves as the FP reference during reconstruction.

Left in full precision (reference keep-FP list): ResNet stem, BatchNorms, downsample branch,
residual adds; ViT patch embedding, class/positional embeddings, LayerNorms, projections;
text projection. The token-embedding table is stored per row on an integer grid
(``QuantEmbedding``) unless the recipe keeps it FP: it is most of a small CLIP's bytes, and
a lookup has no activation, so it costs no arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from d4c_core.errors import SpecError
from d4c_core.quant.quantizers import ActQuantizer, RoundMode, RowQuantizer, WeightQuantizer
from d4c_core.recipe import QuantRecipe


class QuantLayer(nn.Module):
    """A Linear or Conv2d whose input activation and weight are fake-quantized."""

    def __init__(
        self, layer: nn.Linear | nn.Conv2d, w_bits: int, a_bits: int, per_channel_input: bool
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = (
            None
            if layer.bias is None
            else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        )
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            assert isinstance(layer, nn.Conv2d)
            self.conv_args = dict(
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
            )
        channels = layer.in_features if per_channel_input and isinstance(layer, nn.Linear) else None
        self.act_quant = ActQuantizer(a_bits, channels=channels, learnable=True)
        self.weight_quant = WeightQuantizer(self.weight, w_bits)
        self.quant_weight = False

    def effective_weight(self) -> Tensor:
        return self.weight_quant(self.weight) if self.quant_weight else self.weight

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_quant(x)
        w = self.effective_weight()
        if self.is_conv:
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"w{self.weight_quant.bits}a{self.act_quant.bits}, shape={tuple(self.weight.shape)}"


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` whose table is fake-quantized per row (nearest rounding, no AdaRound:
    no reconstruction unit learns it). Only the looked-up rows are quantized, so a forward
    costs what the lookup costs, not a pass over the whole table."""

    def __init__(self, emb: nn.Embedding, bits: int) -> None:
        super().__init__()
        if emb.padding_idx is not None or emb.max_norm is not None:
            raise SpecError("token embeddings with padding_idx/max_norm are not supported")
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        self.weight_quant = RowQuantizer(self.weight, bits)
        self.quant_weight = False

    def forward(self, ids: Tensor) -> Tensor:
        if not self.quant_weight:
            return F.embedding(ids, self.weight)
        return self.weight_quant.rows(self.weight, ids)

    def extra_repr(self) -> str:
        return f"w{self.weight_quant.bits} per row, shape={tuple(self.weight.shape)}"


def _split_in_proj(mha: nn.MultiheadAttention) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    e = mha.embed_dim
    w = mha.in_proj_weight.detach()
    b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
    out = []
    for i in range(3):
        lin = nn.Linear(e, e, bias=b is not None)
        lin.weight.data.copy_(w[i * e : (i + 1) * e])
        if b is not None:
            lin.bias.data.copy_(b[i * e : (i + 1) * e])
        out.append(lin)
    return out[0], out[1], out[2]


class QuantAttention(nn.Module):
    """Multi-head attention with explicit projections and quantized q, k, v and softmax."""

    def __init__(
        self,
        q: nn.Linear,
        k: nn.Linear,
        v: nn.Linear,
        out: nn.Linear,
        heads: int,
        w_bits: int,
        a_bits: int,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = QuantLayer(q, w_bits, a_bits, per_channel_input=True)
        self.k_proj = QuantLayer(k, w_bits, a_bits, per_channel_input=True)
        self.v_proj = QuantLayer(v, w_bits, a_bits, per_channel_input=True)
        self.out_proj = QuantLayer(out, w_bits, a_bits, per_channel_input=False)
        self.q_quant = ActQuantizer(a_bits, learnable=False)
        self.k_quant = ActQuantizer(a_bits, learnable=False)
        self.v_quant = ActQuantizer(a_bits, learnable=False)
        self.softmax_quant = ActQuantizer(a_bits, learnable=False)

    def attend(self, x_q: Tensor, x_kv: Tensor, mask: Tensor | None) -> Tensor:
        """Batch-first ``(B, L, E)`` attention; ``mask`` additive, broadcastable to (B,H,L,S)."""
        b, lq, e = x_q.shape
        d = e // self.heads
        q = self.q_quant(self.q_proj(x_q)).view(b, lq, self.heads, d).transpose(1, 2)
        k = self.k_quant(self.k_proj(x_kv)).view(b, -1, self.heads, d).transpose(1, 2)
        v = self.v_quant(self.v_proj(x_kv)).view(b, -1, self.heads, d).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        if mask is not None:
            logits = logits + mask
        attn = self.softmax_quant(logits.softmax(dim=-1))
        ctx = (attn @ v).transpose(1, 2).reshape(b, lq, e)
        return self.out_proj(ctx)


class QuantMultiheadAttention(QuantAttention):
    """Drop-in for ``nn.MultiheadAttention`` as open_clip's blocks call it."""

    def __init__(self, mha: nn.MultiheadAttention, w_bits: int, a_bits: int) -> None:
        if mha.dropout:
            raise SpecError("attention dropout is not supported for quantization")
        q, k, v = _split_in_proj(mha)
        out = nn.Linear(mha.embed_dim, mha.embed_dim, bias=mha.out_proj.bias is not None)
        out.load_state_dict(mha.out_proj.state_dict())
        super().__init__(q, k, v, out, mha.num_heads, w_bits, a_bits)
        self.batch_first = mha.batch_first

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        if (key is not query or value is not query) and not (
            torch.equal(key, query) and torch.equal(value, query)
        ):
            raise SpecError("cross-attention is not supported for quantization")
        x = query if self.batch_first else query.transpose(0, 1)
        b, lq, _ = x.shape
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=x.dtype).masked_fill(mask, float("-inf"))
            if mask.dim() == 3:  # (B*H, L, S)
                mask = mask.view(b, self.heads, lq, -1)
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if kpm.dtype == torch.bool:
                kpm = torch.zeros_like(kpm, dtype=x.dtype).masked_fill(kpm, float("-inf"))
            kpm = kpm[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        out = self.attend(x, x, mask)
        return (out if self.batch_first else out.transpose(0, 1)), None


class QuantAttentionPool2d(QuantAttention):
    """ModifiedResNet's QKV attention pool with explicit, quantized projections."""

    def __init__(self, pool: AttentionPool2d, w_bits: int, a_bits: int) -> None:
        super().__init__(
            pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj, pool.num_heads, w_bits, a_bits
        )
        self.positional_embedding = nn.Parameter(
            pool.positional_embedding.detach().clone(), requires_grad=False
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding[None].to(x.dtype)
        return self.attend(x[:, :1], x, None)[:, 0]


@dataclass(frozen=True)
class QuantizedLayerInfo:
    name: str
    tower: str  # "image" | "text"
    module: QuantLayer


def _replace_linear(
    parent: nn.Module, attr: str, w_bits: int, a_bits: int, per_channel_input: bool
) -> None:
    setattr(parent, attr, QuantLayer(getattr(parent, attr), w_bits, a_bits, per_channel_input))


def _wrap_transformer_blocks(
    blocks: nn.Module, w_bits: int, a_bits: int, mlp_bits: tuple[int, int]
) -> None:
    for blk in blocks.modules():
        if not isinstance(blk, ResidualAttentionBlock):
            continue
        if not isinstance(blk.attn, nn.MultiheadAttention):
            raise SpecError(f"unsupported attention module {type(blk.attn).__name__}")
        blk.attn = QuantMultiheadAttention(blk.attn, w_bits, a_bits)
        _replace_linear(blk.mlp, "c_fc", mlp_bits[0], mlp_bits[1], per_channel_input=True)
        _replace_linear(blk.mlp, "c_proj", mlp_bits[0], mlp_bits[1], per_channel_input=False)


def wrap_for_quantization(model: nn.Module, recipe: QuantRecipe) -> nn.Module:
    """Replace, in place, every layer the reference quantizes; return the model.

    Quantizers start disabled: the model computes FP until range init switches them on. Only
    the wrapping: ``d4c_core.quantize`` is the whole job (calibration, ranges, rounding).
    """
    w, a = recipe.weight_bits, recipe.act_bits
    # New modules (split projections, quantizer state) are built on the CPU.
    device = next(model.parameters()).device
    visual = model.visual
    if recipe.quantize_image:
        if isinstance(visual, VisionTransformer):
            _wrap_transformer_blocks(visual.transformer, w, a, (w, a))
        elif isinstance(visual, ModifiedResNet):
            for blk in visual.modules():
                if isinstance(blk, Bottleneck):
                    for name in ("conv1", "conv2", "conv3"):
                        _replace_linear(blk, name, w, a, per_channel_input=False)
            visual.attnpool = QuantAttentionPool2d(visual.attnpool, w, a)
        else:
            raise SpecError(f"unsupported image tower {type(visual).__name__}")
    if recipe.quantize_text:
        if not hasattr(model, "transformer"):
            raise SpecError(
                "unsupported text tower (expected open_clip CLIP with a text transformer)"
            )
        m = recipe.text_mlp_bits
        _wrap_transformer_blocks(model.transformer, w, a, (m, m))
    if recipe.embedding_bits:
        if not isinstance(getattr(model, "token_embedding", None), nn.Embedding):
            raise SpecError("unsupported text tower: no token_embedding table to quantize")
        model.token_embedding = QuantEmbedding(model.token_embedding, recipe.embedding_bits)
    return model.to(device)


def quant_layers(model: nn.Module) -> list[QuantizedLayerInfo]:
    """Quantized layers in model order (image tower first, then text)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            out.append(
                QuantizedLayerInfo(name, "image" if name.startswith("visual.") else "text", mod)
            )
    out.sort(key=lambda i: i.tower != "image")  # stable: keeps module order within a tower
    return out


# Modules whose weight the artifact stores as integer codes (+ per-row scale and zero point).
WeightCoded = QuantLayer | QuantEmbedding


def coded_weights(model: nn.Module) -> list[tuple[str, WeightCoded]]:
    """Every module stored as integer codes: the QuantLayers, then the token table if coded."""
    layers: list[tuple[str, WeightCoded]] = [(i.name, i.module) for i in quant_layers(model)]
    return layers + [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, QuantEmbedding)
    ]


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ActQuantizer):
            yield name, mod


def set_quant_state(model: nn.Module, weights: bool, acts: bool) -> None:
    """Switch fake quantization on or off everywhere (off == the FP model)."""
    for mod in model.modules():
        if isinstance(mod, WeightCoded):
            mod.quant_weight = weights
        elif isinstance(mod, ActQuantizer):
            mod.enabled = acts


class fp_mode:
    """Context: run the wrapped model in full precision, restoring the quant state after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[nn.Module, str, bool]] = []

    def __enter__(self) -> nn.Module:
        for mod in self.model.modules():
            attr = (
                "quant_weight"
                if isinstance(mod, WeightCoded)
                else "enabled"
                if isinstance(mod, ActQuantizer)
                else None
            )
            if attr:
                self.saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for mod, attr, val in self.saved:
            setattr(mod, attr, val)


def set_round_mode(model: nn.Module, mode: RoundMode) -> None:
    for mod in model.modules():
        if isinstance(mod, WeightQuantizer):
            mod.mode = mode
