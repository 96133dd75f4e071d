"""Total variation: the smoothness prior every synthesis method adds (method spec §2).

Without it, pixel-space optimization of a classifier's loss produces high-frequency noise
that activates the network but looks nothing like images; the squared-difference form and
its normalization follow the reference so the 0.1 weight means the same thing.
"""

from __future__ import annotations

from torch import Tensor


def total_variation(x: Tensor) -> Tensor:
    """``mean_i[Σ(Δ_w x_i)²/(C·H·(W−1)) + Σ(Δ_h x_i)²/(C·(H−1)·W)]`` of ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    dw = (x[..., 1:] - x[..., :-1]).square().sum() / (c * h * (w - 1))
    dh = (x[..., 1:, :] - x[..., :-1, :]).square().sum() / (c * (h - 1) * w)
    return (dw + dh) / b
