"""Non-finite values (NaN, Inf) in the pipeline: the model's fault, reported as such.

A checkpoint of finite weights can still overflow float32 arithmetic (huge weights), and then
every later stage computes on NaN: range searches, reconstruction losses and the exported
model are garbage, or some op fails deep inside torch. The stages call ``require_finite`` on
tensors they have already computed, once per stage, layer or unit (never per element per
step), so a broken model stops with ``NonFiniteError`` at the first place it shows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from d4c_core.errors import NonFiniteError


def is_finite(value: Tensor | float) -> bool:
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def require_finite(where: str, *values: Tensor | float) -> None:
    """Raise ``NonFiniteError`` naming ``where`` if any value holds NaN or Inf."""
    if not all(is_finite(v) for v in values):
        raise NonFiniteError(
            f"the model produced non-finite values (NaN or Inf) {where}; its weights are "
            "likely too large for float32 arithmetic"
        )
