"""Range initialization: MSE search for every activation and weight quantizer (spec §4).

As in the reference (QDrop), activation ranges are observed with the whole model in full
precision, so each quantizer sees the distribution its FP layer would see; weights are then
searched per output channel and AdaRound variables start at the fractional part.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from d4c_core.artifacts.codec import finalize_scales_
from d4c_core.finite import require_finite
from d4c_core.quant.quantizers import RoundMode
from d4c_core.quant.wrap import (
    act_quantizers,
    coded_weights,
    quant_layers,
    set_quant_state,
    set_round_mode,
)
from d4c_core.recipe import QuantRecipe


def search_args(recipe: QuantRecipe) -> dict[str, float]:
    return {
        "p": recipe.mse_p,
        "candidates": recipe.mse_candidates,
        "zero_points": recipe.mse_zero_points,
        "max_samples": recipe.mse_max_samples,
    }


@torch.no_grad()
def init_ranges(model: nn.Module, images: Tensor, tokens: Tensor, recipe: QuantRecipe) -> None:
    """Set scales/zero points of all quantizers, then switch fake quantization on.

    Uses the first ``range_init_images`` images and ``range_init_prompts`` prompts. Weight
    scales are rounded to fp16 (the artifact's precision) before AdaRound starts, so the
    integer decisions made later hold for the exported scales too.
    """
    search = search_args(recipe)
    set_quant_state(model, weights=False, acts=False)
    quantizers = list(act_quantizers(model))
    memo: dict = {}
    for _, aq in quantizers:
        aq.search = search
        aq.memo = memo
        aq.observing = True
        aq._seen = 0
    try:
        # The FP embeddings too: an overflow after the last quantized layer shows only there.
        if recipe.quantize_image:
            out = model.encode_image(images[: recipe.range_init_images])
            require_finite("in the image embeddings during range initialization", out)
        if recipe.quantize_text:
            out = model.encode_text(tokens[: recipe.range_init_prompts])
            require_finite("in the text embeddings during range initialization", out)
    finally:
        for _, aq in quantizers:
            aq.observing = False
            aq.memo = None
    for _, mod in coded_weights(model):
        mod.weight_quant.init_range(mod.weight, **search)
    finalize_scales_(model)
    for info in quant_layers(model):
        info.module.weight_quant.init_alpha(info.module.weight)
    set_round_mode(model, RoundMode.NEAREST)
    set_quant_state(model, weights=True, acts=True)


def range_state(model: nn.Module) -> dict[str, Tensor]:
    """Every quantizer's state (ranges, zero points, rounding variables): what range init set,
    so a checkpoint of it restores the model without the search."""
    return {k: v for k, v in model.state_dict().items() if "_quant." in k}


def init_ranges_from_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore a range-init checkpoint and switch quantization on, as ``init_ranges`` ends."""
    missing = set(range_state(model)) - set(state)
    if missing:
        raise RuntimeError(f"range-init checkpoint lacks {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False)
    set_round_mode(model, RoundMode.NEAREST)
    set_quant_state(model, weights=True, acts=True)
