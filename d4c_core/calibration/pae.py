"""PAE, perturbation-aware enhancement: differentiable random augmentation (method spec §2).

The synthesized pixels are optimized *through* these perturbations, so an image only scores
well if its semantics survive flips, small affine moves, colour changes, blur and occlusion;
that robustness is what makes the images useful for calibration. Every draw comes from the
caller's generator in one call, and the whole batch is transformed at once (one
``affine_grid``/``grid_sample``, elementwise jitter, one depthwise blur, a mask for erasing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FLIP_P = 0.5
MAX_DEGREES = 15.0
SCALE_RANGE = 0.05  # scale ~ U(1 - r, 1 + r)
SHIFT_RANGE = 0.05  # shift ~ U(-r, r) in grid units
JITTER = 0.4  # contrast, brightness and saturation ~ U(1 - j, 1 + j)
BLUR_P = 0.3
ERASE_P = 0.3
ERASE_SIDE = 0.2  # side of the erased square, as a fraction of H
_N_DRAWS = 12


def _binomial_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=dtype, device=device)
    return (torch.outer(k1, k1) / 16).expand(channels, 1, 3, 3)


def perturb(img: Tensor, gen: torch.Generator) -> Tensor:
    """A fresh random perturbation of every image in ``img`` ``(B, C, H, W)``.

    Order and distributions are the reference's: flip, affine (bilinear, zero padding),
    contrast x brightness, saturation, 3x3 binomial blur, erase a square to 0.
    """
    b, c, h, w = img.shape
    side = int(ERASE_SIDE * h)
    u = torch.rand(b, _N_DRAWS, generator=gen, device=img.device, dtype=torch.float32)
    flip = u[:, 0] < FLIP_P
    theta = (u[:, 1] * 2 - 1) * math.radians(MAX_DEGREES)
    scale = 1 + (u[:, 2] * 2 - 1) * SCALE_RANGE
    tx, ty = (u[:, 3] * 2 - 1) * SHIFT_RANGE, (u[:, 4] * 2 - 1) * SHIFT_RANGE
    contrast, bright, sat = (1 + (u[:, 5:8] * 2 - 1) * JITTER).unbind(1)
    blur = u[:, 8] < BLUR_P
    erase = u[:, 9] < ERASE_P
    top = (u[:, 10] * h).floor() - side // 2
    left = (u[:, 11] * w).floor() - side // 2

    # Flip folded into the affine: sampling the flipped image at q is sampling img at (-qx, qy).
    cos, sin = torch.cos(theta) * scale, torch.sin(theta) * scale
    sign = torch.where(flip, -1.0, 1.0)
    mat = torch.stack(
        [torch.stack([sign * cos, -sign * sin, sign * tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )
    grid = F.affine_grid(mat.to(img.dtype), [b, c, h, w], align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    gain = (contrast * bright).to(img.dtype).view(b, 1, 1, 1)
    sat = sat.to(img.dtype).view(b, 1, 1, 1)
    out = out * (gain * sat) + out.mean(1, keepdim=True) * (gain * (1 - sat))

    blurred = F.conv2d(out, _binomial_kernel(c, out.dtype, out.device), padding=1, groups=c)
    out = torch.where(blur.view(b, 1, 1, 1), blurred, out)

    r0, c0 = top.clamp(min=0), left.clamp(min=0)
    rows = torch.arange(h, device=img.device).view(1, h, 1)
    cols = torch.arange(w, device=img.device).view(1, 1, w)
    inside = (
        (rows >= r0.view(b, 1, 1))
        & (rows < (r0 + side).view(b, 1, 1))
        & (cols >= c0.view(b, 1, 1))
        & (cols < (c0 + side).view(b, 1, 1))
    )
    keep = ~(inside & erase.view(b, 1, 1))
    return out * keep.unsqueeze(1).to(out.dtype)
