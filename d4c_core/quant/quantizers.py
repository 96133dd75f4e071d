"""Uniform asymmetric fake quantization, AdaRound weights, LSQ activations.

The grid itself (scale/zero point of a range, nearest rounding) and the MSE range search
live in ``grid``; this module adds the straight-through and learnable parts.

Math functions take tensors and return tensors; the modules hold the state one quantizer
needs (scale, zero point, rounding variables) and a mode that says how to apply it.
Conventions: unsigned integer grid ``[0, 2^b - 1]``; ``x_hat = (clamp(round(x/s) + z) - z) * s``.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch
from torch import Tensor, nn

from d4c_core.finite import require_finite
from d4c_core.quant.grid import mse_range, qparams, qrange, quantize_int

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
ZETA, GAMMA = 1.1, -0.1


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def grad_scale(t: Tensor, g: float) -> Tensor:
    """Value of ``t``, gradient multiplied by ``g`` (LSQ's step-size gradient scaling)."""
    return (t - t * g).detach() + t * g


def clamp_ste(q: Tensor, qmin: int, qmax: int) -> Tensor:
    """Clamp whose gradient passes on the closed interval ``[qmin, qmax]``.

    ``torch.clamp`` with scalar bounds gives a zero gradient *at* the bounds, which would cut
    the gradient of every value that rounds to the first or last code (after ``round_ste``
    those sit exactly on the bound).
    """
    inside = (q >= qmin) & (q <= qmax)
    return torch.where(inside, q, q.detach().clamp(qmin, qmax))


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize with a straight-through rounding; scale/zero point broadcast."""
    q = clamp_ste(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class _LSQ(torch.autograd.Function):
    """LSQ fake quantization with hand-written backward (Esser et al. 2020).

    ``y = clamp(round(x/s), lo, hi) * s`` with ``lo = qmin - z``, ``hi = qmax - z``.
    Gradients: x gets the STE mask ``lo <= round(x/s) <= hi``; s gets
    ``g * sum(dy * (round(x/s) - x/s))`` inside the grid and ``g * sum(dy * bound)`` outside.
    Same math as ``fake_quant`` + ``grad_scale`` at a fraction of its cost on a CPU, where it
    is a large part of a small unit's reconstruction step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, g: float) -> Tensor:  # type: ignore[override]
        # Six passes over the activation, three buffers: on a CPU each fresh activation-sized
        # tensor is an allocation and a pass over cold memory, so buffers are reused in place.
        xs = x / scale
        r = torch.round(xs)
        q = torch.clamp(r, lo, hi)
        # 1.0 where rounding stayed inside the grid, else 0.0, written over r.
        inside = torch.eq(r, q, out=r)
        # d y / d s per element: round(x/s) - x/s inside the grid, the bound outside.
        dyds = torch.addcmul(q, xs, inside, value=-1, out=xs)
        ctx.save_for_backward(inside, dyds)
        ctx.g = g
        ctx.scale_shape = scale.shape
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        inside, dyds = ctx.saved_tensors
        # The saved buffers are consumed in place: one backward per forward (a second one
        # would fail autograd's version check rather than read them).
        if ctx.scale_shape.numel() > 1:
            ds = dyds.mul_(dy).flatten(0, -2).sum(0)
        else:
            ds = torch.dot(dy.reshape(-1), dyds.reshape(-1)).reshape(ctx.scale_shape)
        # A unit's cached input needs no gradient: skip the activation-sized multiply.
        dx = inside.mul_(dy) if ctx.needs_input_grad[0] else None
        return dx, ds * ctx.g, None, None, None


class _RectifiedSigmoid(torch.autograd.Function):
    """AdaRound's ``h(alpha) = clamp(sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)``.

    Forward keeps ``dh/dalpha`` (zero where the clamp is active), so the backward is one
    multiply; autograd's version re-derives it through sigmoid, affine and clamp masks over
    every weight element, which on a CPU costs more than a small unit's matmuls. The clamp
    mask is a float 0/1 from ``eq(..., out=float)``: boolean kernels (``!=``,
    ``masked_fill_``) took ~20x a multiply's time on 262k weights here.
    """

    @staticmethod
    def forward(ctx, alpha: Tensor) -> Tensor:  # type: ignore[override]
        sig = torch.sigmoid(alpha)
        raw = torch.mul(sig, ZETA - GAMMA).add_(GAMMA)
        h = raw.clamp(0, 1)
        slope = torch.addcmul(sig, sig, sig, value=-1).mul_(ZETA - GAMMA)  # sig (1 - sig) k
        ctx.save_for_backward(slope.mul_(torch.eq(raw, h, out=raw)))
        return h

    @staticmethod
    def backward(ctx, dh: Tensor) -> Tensor:  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return dh * slope


class _RoundLoss(torch.autograd.Function):
    """AdaRound's regularizer ``sum(1 - |2h - 1|^b)`` with a one-multiply backward.

    ``d/dh = -2 b |2h - 1|^(b-1) sign(2h - 1)``: the forward computes ``|2h - 1|^(b-1)`` once
    and reuses it for both, as ``exp((b-1) log t)`` in place (``pow`` with a fractional
    exponent took twice as long here). ``b >= 1`` (the recipe checks it); at ``t = 0`` the
    log is -inf and the power 0, except ``b = 1``, where it is 1.
    """

    @staticmethod
    def forward(ctx, h: Tensor, bm1: float | Tensor, m2b: float | Tensor) -> Tensor:  # type: ignore[override]
        # bm1 = b - 1 and m2b = -2 b: a float, or a tensor the caller rounded from the same
        # double (a CUDA graph reads b from the device); bm1 == 0 (b = 1) is |u|^0 = 1.
        u = torch.mul(h, 2).sub_(1)
        t = u.abs()
        p = torch.ones_like(t) if _is_zero(bm1) else torch.log(t).mul_(bm1).exp_()
        # n - dot, without a host-to-device copy of n (not allowed in a CUDA graph).
        loss = torch.dot(p.reshape(-1), t.reshape(-1)).neg_().add_(float(h.numel()))
        ctx.save_for_backward(p.mul_(u.sign_()).mul_(m2b))
        return loss

    @staticmethod
    def backward(ctx, dloss: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return dloss * grad, None, None


def _is_zero(v: float | Tensor) -> bool:
    """A float zero; a tensor never is (b = 1 throughout is decided once, as a float)."""
    return not isinstance(v, Tensor) and v == 0


def lsq_fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, g: float
) -> Tensor:
    """Fake quantization whose step ``scale`` (per tensor, or per last-dim channel) learns."""
    return _LSQ.apply(x, scale, qmin - zero_point, qmax - zero_point, g)


class RoundMode(StrEnum):
    NEAREST = "nearest"  # fake-quant with round-to-nearest (range init, baselines)
    SOFT = "soft"  # AdaRound's continuous relaxation, during reconstruction
    HARD = "hard"  # AdaRound decisions fixed: floor + (alpha >= 0)


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric weight quantizer with AdaRound rounding variables."""

    def __init__(self, weight: Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = qrange(bits)
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.alpha = nn.Parameter(torch.zeros_like(weight), requires_grad=False)
        self.mode = RoundMode.NEAREST
        # SOFT mode: weight = base + h * span (see begin_soft); h of the last forward.
        self._base: Tensor | None = None
        self._span: Tensor | None = None
        self._h: Tensor | None = None

    def init_range(self, weight: Tensor, **search: float) -> None:
        lo, hi = mse_range(weight.reshape(weight.shape[0], -1), self.bits, **search)  # type: ignore[arg-type]
        s, z = qparams(lo, hi, self.qmin, self.qmax)
        self.scale.copy_(s.view_as(self.scale))
        self.zero_point.copy_(z.view_as(self.zero_point))
        self.init_alpha(weight)

    def init_alpha(self, weight: Tensor) -> None:
        """alpha such that h(alpha) equals the fractional part of W/s (soft == FP weight)."""
        w = weight / self.scale
        frac = (w - torch.floor(w)).clamp(1e-6, 1 - 1e-6)
        self.alpha.data = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)

    def begin_soft(self, weight: Tensor) -> None:
        """Enter SOFT mode, caching what stays fixed while only alpha learns.

        The soft weight ``clamp(floor(W/s) + h, lo, hi) * s`` (``lo``/``hi`` the code range
        less the zero point) is ``(base + h * span) * s`` with ``base = clamp(floor, lo, hi)``
        and ``span = 1`` where ``lo <= floor < hi``, else 0: ``floor`` and the bounds are
        integers and ``0 <= h <= 1``, so a floor outside that range is clamped whatever h is.
        One fused multiply-add per step instead of add, clamp, multiply and clamp's masks.
        """
        self.mode = RoundMode.SOFT
        floor = torch.floor(weight / self.scale)
        lo, hi = self.qmin - self.zero_point, self.qmax - self.zero_point
        self._base = torch.minimum(torch.maximum(floor, lo), hi) * self.scale
        self._span = ((floor >= lo) & (floor < hi)).to(weight.dtype) * self.scale
        self._h = None

    def end_soft(self) -> None:
        self.mode = RoundMode.HARD
        self._base = self._span = self._h = None

    def h(self) -> Tensor:
        """Rectified sigmoid of alpha: the soft rounding offset in [0, 1]."""
        return _RectifiedSigmoid.apply(self.alpha)

    def round_loss(self, b: float, exponents: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """AdaRound's regularizer ``sum(1 - |2h - 1|^b)`` on the h of the SOFT forward just run
        (one sigmoid per step, one backward through it), or on a fresh h. The forward's h is
        used once: an optimizer step in between would make it stale (fused Adam does not bump
        versions). ``exponents``: ``(b - 1, -2 b)`` as tensors, read on the device instead of
        ``b``."""
        h, self._h = (self._h if self._h is not None else self.h()), None
        if exponents is None:
            return _RoundLoss.apply(h, b - 1, -2 * b)
        return _RoundLoss.apply(h, *exponents)

    def int_weight(self, weight: Tensor) -> Tensor:
        """Integer codes of the current decision (hard AdaRound, or nearest)."""
        if self.mode == RoundMode.NEAREST:
            return quantize_int(weight, self.scale, self.zero_point, self.qmin, self.qmax)
        up = (self.alpha >= 0).to(weight.dtype)
        return torch.clamp(
            torch.floor(weight / self.scale) + up + self.zero_point, self.qmin, self.qmax
        )

    def forward(self, weight: Tensor) -> Tensor:
        if self.mode == RoundMode.NEAREST:
            return fake_quant(weight, self.scale, self.zero_point, self.qmin, self.qmax)
        if self.mode == RoundMode.SOFT:
            if self._base is None or self._span is None:
                self.begin_soft(weight)
                assert self._base is not None and self._span is not None
            h = self.h()
            self._h = h
            return torch.addcmul(self._base, h, self._span)
        return (self.int_weight(weight) - self.zero_point) * self.scale


class ActQuantizer(nn.Module):
    """Activation fake-quantizer: per tensor, or per channel over the last (hidden) dim.

    ``learnable`` quantizers train their step with LSQ during reconstruction; static ones
    (q/k/v outputs, softmax) keep the range-init scale. Before ``observe`` has run, or while
    disabled, the quantizer is the identity.
    """

    def __init__(self, bits: int, channels: int | None = None, learnable: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = qrange(bits)
        self.channels = channels
        n = channels or 1
        self.scale = nn.Parameter(torch.ones(n), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(n))
        self.learnable = learnable
        self.enabled = False
        self.observing = False
        self.search: dict[str, float] = {}
        self.memo: dict[tuple, tuple[Tensor, tuple[Tensor, Tensor]]] | None = None
        self._seen = 0

    def _rows(self, x: Tensor) -> Tensor:
        if self.channels:
            return x.reshape(-1, self.channels).t()
        return x.reshape(1, -1)

    def observe(self, x: Tensor) -> None:
        """MSE range search on ``x``; repeated calls average the ranges (QDrop's AvgMSE).

        ``memo`` (shared by the quantizers of one range-init pass) reuses a search on the
        very same tensor: q, k and v projections all quantize one LayerNorm output.
        """
        key = (x.data_ptr(), tuple(x.shape), x._version, self.bits, self.channels)
        hit = self.memo.get(key) if self.memo is not None else None
        # The memo keeps x alive, so its address cannot be reused by another tensor.
        found = hit[1] if hit is not None and hit[0] is x else None
        if found is None:
            # Once per layer and batch: a NaN/Inf range would make every later stage garbage.
            require_finite("in a layer's input during range initialization", x)
            found = mse_range(self._rows(x), self.bits, **self.search)  # type: ignore[arg-type]
            if self.memo is not None:
                self.memo[key] = (x, found)
        lo, hi = found
        s, z = qparams(lo, hi, self.qmin, self.qmax)
        if self._seen:
            old_lo = -self.zero_point * self.scale.data
            old_hi = old_lo + self.scale.data * (self.qmax - self.qmin)
            k = self._seen
            s, z = qparams(
                (old_lo * k + lo) / (k + 1), (old_hi * k + hi) / (k + 1), self.qmin, self.qmax
            )
        self.scale.data.copy_(s)
        self.zero_point.copy_(z)
        self._seen += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        s, z = self.scale, self.zero_point
        if self.learnable and s.requires_grad:
            g = 1.0 / math.sqrt(x.numel() / s.numel() * self.qmax)
            return lsq_fake_quant(x, s, z, self.qmin, self.qmax, g)
        s = s.detach()
        return torch.clamp(torch.round(x / s), self.qmin - z, self.qmax - z) * s


class RowQuantizer(WeightQuantizer):
    """Per-row quantizer of a lookup table: nearest rounding only.

    A table is not reconstructed (no AdaRound), so it has no rounding variables: for
    ViT-B-32's 25M-entry token table they would be 100 MB of state for nothing.
    """

    def __init__(self, weight: Tensor, bits: int) -> None:
        super().__init__(weight[:1], bits)  # no full-size alpha
        del self.alpha
        self.register_buffer("scale", torch.ones(weight.shape[0], 1))
        self.register_buffer("zero_point", torch.zeros(weight.shape[0], 1))
        # The range needs only the table: set it now, so no wrapped model has a table
        # quantizer without one (range init sets it again, the same way).
        with torch.no_grad():
            self.init_range(weight)

    def init_range(self, weight: Tensor, **search: float) -> None:
        """Each row's min..max (widened to hold 0): no MSE search. The search costs ~2 min on a
        tiny model's 49k-row table and ~15 min on ViT-B-32's at the default 100 candidates,
        for an 8-bit grid whose step is already 1/255 of the row's range."""
        rows = weight.reshape(weight.shape[0], -1)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        s, z = qparams(lo, hi, self.qmin, self.qmax)
        self.scale.copy_(s.view_as(self.scale))
        self.zero_point.copy_(z.view_as(self.zero_point))

    def init_alpha(self, weight: Tensor) -> None:
        """Nothing to initialize: rounding is always to the nearest code."""

    def int_weight(self, weight: Tensor) -> Tensor:
        return quantize_int(weight, self.scale, self.zero_point, self.qmin, self.qmax)

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quant(weight, self.scale, self.zero_point, self.qmin, self.qmax)

    def rows(self, weight: Tensor, ids: Tensor) -> Tensor:
        """``forward(weight)[ids]``, computing only the rows looked up."""
        s, z = self.scale[ids], self.zero_point[ids]
        return fake_quant(weight[ids], s, z, self.qmin, self.qmax)
