"""The integer grid and the search for its range: ``(lo, hi)`` → scale and zero point,
nearest-rounding quantization, and the MSE range search range init runs.

Plain tensor functions, no modules and no autograd tricks: the quantizer modules
(``quantizers``) and range init build on them. Conventions: unsigned integer grid
``[0, 2^b - 1]``; ``x_hat = (clamp(round(x/s) + z) - z) * s``.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8


def qrange(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def quantize_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as float) of nearest rounding, no gradient path."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def quantize_dq(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """Nearest-rounding quantize-dequantize without autograd tricks (for searches)."""
    return (quantize_int(x, scale, zp, qmin, qmax) - zp) * scale


def qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point of a range, widened to contain 0 (so 0 is exact)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=EPS)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zp


def _lp(xq: Tensor, x: Tensor, p: float) -> Tensor:
    return (xq - x).abs().pow(p).mean(dim=-1)


def _subsample(rows: Tensor, max_samples: int) -> Tensor:
    """Evenly spaced order statistics of each row: keeps the distribution's shape and extremes."""
    if max_samples <= 0 or rows.shape[1] <= max_samples:
        return rows
    return rows.sort(dim=1).values[:, order_stat_index(rows.shape[1], max_samples, rows.device)]


def order_stat_index(n: int, k: int, device: torch.device | None = None) -> Tensor:
    """``k`` evenly spaced indices into ``0..n-1``, both ends included.

    In float64: float32 counts exactly only to 2^24, and one RN50 activation at range init
    has more elements than that (the last index rounded up, past the end).
    """
    return torch.linspace(0, n - 1, k, dtype=torch.float64, device=device).round().long()


# (error, lo, hi) of the best range so far, per row.
_Best = tuple[Tensor, Tensor, Tensor]


def _keep_better(best: _Best, err: Tensor, lo: Tensor, hi: Tensor) -> _Best:
    better = err < best[0]
    return (
        torch.where(better, err, best[0]),
        torch.where(better, lo, best[1]),
        torch.where(better, hi, best[2]),
    )


def _search_one_sided(
    x: Tensor, xmin: Tensor, xmax: Tensor, pos: bool, bits: int, p: float, candidates: int
) -> _Best:
    """1-D search over ``candidates`` thresholds, the other bound pinned at 0."""
    qmin, qmax = qrange(bits)
    best: _Best = (torch.full_like(xmin, float("inf")), xmin.clone(), xmax.clone())
    xr = torch.maximum(xmin.abs(), xmax)
    for i in range(1, candidates + 1):
        t = xr * i / candidates
        lo, hi = (torch.zeros_like(t), t) if pos else (-t, torch.zeros_like(t))
        s, z = qparams(lo, hi, qmin, qmax)
        err = _lp(quantize_dq(x, s[:, None], z[:, None], qmin, qmax), x, p)
        best = _keep_better(best, err, lo, hi)
    return best


def _search_two_sided(
    x: Tensor, xmin: Tensor, xmax: Tensor, bits: int, p: float, candidates: int, zero_points: int
) -> _Best:
    """2-D search: range widths times window positions (integer zero points)."""
    qmin, qmax = qrange(bits)
    best: _Best = (torch.full_like(xmin, float("inf")), xmin.clone(), xmax.clone())
    levels = float(qmax - qmin)
    xr = xmax - xmin  # two-sided: xmin < 0 < xmax
    if zero_points <= 0:  # the reference's exhaustive integer grid
        zgrid = torch.arange(qmin, qmax + 1, device=x.device, dtype=x.dtype)
    else:
        pos = torch.linspace(0, 1, zero_points, device=x.device, dtype=x.dtype)
    for i in range(1, candidates + 1):
        width = xr * i / candidates
        delta = torch.clamp(width / levels, min=EPS)  # (R,)
        if zero_points > 0:
            # Slide the window from touching the data's min to touching its max.
            lo_try = xmin[:, None] + pos[None, :] * (xr - width)[:, None]
            z = torch.clamp(qmin - torch.round(lo_try / delta[:, None]), qmin, qmax)
        else:
            z = zgrid.expand(len(delta), -1)
        s = delta[:, None]
        xq = quantize_dq(x[:, None, :], s[:, :, None], z[:, :, None], qmin, qmax)
        err = _lp(xq, x[:, None, :], p)  # (R, Z)
        e, j = err.min(dim=1)
        zbest = z.gather(1, j[:, None])[:, 0]
        best = _keep_better(best, e, -zbest * delta, (levels - zbest) * delta)
    return best


def mse_range(
    rows: Tensor,
    bits: int,
    p: float = 2.4,
    candidates: int = 100,
    zero_points: int = 9,
    max_samples: int = 512,
) -> tuple[Tensor, Tensor]:
    """Per-row (lo, hi) minimizing the Lp quantization error (QDrop's MSE observer).

    One-sided data (all >= 0 or all <= 0): 1-D search over ``candidates`` thresholds.
    Two-sided: 2-D search, range ``r_i = (max - min) * i / candidates`` times ``zero_points``
    window positions sliding from the data's min to its max (each rounded to an integer zero
    point); ``zero_points=0`` tries every integer zero point as the reference does. The
    winner is finally compared on the full rows with plain min-max, so the search is never
    worse than min-max even though it scores on a subsample.
    """
    rows = rows.detach().float()
    qmin, qmax = qrange(bits)
    x = _subsample(rows, max_samples)
    xmin, xmax = rows.min(dim=1).values, rows.max(dim=1).values
    if bool((rows >= 0).all() or (rows <= 0).all()):
        pos = bool((rows >= 0).all())
        _, best_lo, best_hi = _search_one_sided(x, xmin, xmax, pos, bits, p, candidates)
    else:
        _, best_lo, best_hi = _search_two_sided(x, xmin, xmax, bits, p, candidates, zero_points)
    # Exact final check against min-max on the full rows.
    s_b, z_b = qparams(best_lo, best_hi, qmin, qmax)
    s_m, z_m = qparams(xmin, xmax, qmin, qmax)
    e_b = _lp(quantize_dq(rows, s_b[:, None], z_b[:, None], qmin, qmax), rows, p)
    e_m = _lp(quantize_dq(rows, s_m[:, None], z_m[:, None], qmin, qmax), rows, p)
    keep = e_b <= e_m
    return torch.where(keep, best_lo, xmin), torch.where(keep, best_hi, xmax)
