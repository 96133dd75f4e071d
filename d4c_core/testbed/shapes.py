"""The object kinds of the testbed world: silhouettes defined by signed distance functions.

Each kind is an SDF in a local frame (y up, extent about [-0.95, 0.95]) so every silhouette
is a few lines of geometry that a reader can check. The SDFs are rasterized once into an
anti-aliased atlas; rendering then only warps atlas entries (``render.py``), which keeps
per-image cost independent of how intricate a shape is.

Kinds were chosen to stay distinguishable at 32 px under the world's +-15 degree rotation
and +-10 % aspect jitter: no two kinds are the same silhouette rotated or stretched by that
much (plus vs. X, square vs. rhombus are avoided or made different in aspect/thickness).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import cache

import torch
from torch import Tensor

Sdf = Callable[[Tensor], Tensor]

# Resolution of one atlas entry; objects cover at most ~27 px, so 64 texels oversample them.
ATLAS_RES = 64


# --- primitives: p is (..., 2) in the local frame, result (...) signed distance --------------


def circle(p: Tensor, r: float, c: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    return torch.hypot(p[..., 0] - c[0], p[..., 1] - c[1]) - r


def box(p: Tensor, hx: float, hy: float, c: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    """Exact axis-aligned box SDF (half sizes hx, hy)."""
    qx = (p[..., 0] - c[0]).abs() - hx
    qy = (p[..., 1] - c[1]).abs() - hy
    outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
    return outside + torch.maximum(qx, qy).clamp(max=0)


def ellipse(p: Tensor, a: float, b: float) -> Tensor:
    """Approximate ellipse SDF: exact on the boundary, which is all anti-aliasing needs."""
    k = torch.hypot(p[..., 0] / a, p[..., 1] / b)
    return (k - 1.0) * min(a, b)


def segment(p: Tensor, a: tuple[float, float], b: tuple[float, float], r: float) -> Tensor:
    """Capsule (stroke of half-width r) from a to b: the building block of letters."""
    ax, ay = a
    ex, ey = b[0] - ax, b[1] - ay
    wx, wy = p[..., 0] - ax, p[..., 1] - ay
    h = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
    return torch.hypot(wx - ex * h, wy - ey * h) - r


def polyline(p: Tensor, pts: Sequence[tuple[float, float]], r: float) -> Tensor:
    return union(*(segment(p, a, b, r) for a, b in itertools.pairwise(pts)))


def polygon(p: Tensor, verts: Sequence[tuple[float, float]]) -> Tensor:
    """Exact SDF of a simple (possibly concave) polygon; sign by the crossing rule."""
    v = torch.tensor(verts, dtype=p.dtype)
    d = ((p - v[0]) ** 2).sum(-1)
    sign = torch.ones_like(d)
    n = len(verts)
    for i in range(n):
        vi, vj = v[i], v[i - 1]
        e = vj - vi
        w = p - vi
        t = ((w * e).sum(-1) / (e * e).sum()).clamp(0.0, 1.0)
        b = w - e * t[..., None]
        d = torch.minimum(d, (b * b).sum(-1))
        c1 = p[..., 1] >= vi[1]
        c2 = p[..., 1] < vj[1]
        c3 = e[0] * w[..., 1] > e[1] * w[..., 0]
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        sign = torch.where(flip, -sign, sign)
    return sign * d.sqrt()


def regular(
    n: int, r: float, phase: float = math.pi / 2, dy: float = 0.0
) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon of circumradius r (first vertex up), shifted by dy."""
    return [
        (r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n) + dy)
        for k in range(n)
    ]


def star_verts(points: int, outer: float, inner: float) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else inner
        a = math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def heart_verts(m: int = 96) -> list[tuple[float, float]]:
    """The classic parametric heart curve, scaled to the unit frame."""
    out = []
    for k in range(m):
        t = 2 * math.pi * k / m
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 17.5, (y + 2.5) / 16.0))
    return out


def union(*ds: Tensor) -> Tensor:
    out = ds[0]
    for d in ds[1:]:
        out = torch.minimum(out, d)
    return out


def subtract(a: Tensor, b: Tensor) -> Tensor:
    return torch.maximum(a, -b)


def rotate(p: Tensor, deg: float) -> Tensor:
    """Coordinates of p in a frame rotated by ``deg`` (rotates the shape by +deg)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return torch.stack((c * p[..., 0] + s * p[..., 1], -s * p[..., 0] + c * p[..., 1]), -1)


def polar(p: Tensor) -> tuple[Tensor, Tensor]:
    return torch.hypot(p[..., 0], p[..., 1]), torch.atan2(p[..., 1], p[..., 0])


# --- the kinds ------------------------------------------------------------------------------


def _flower(p: Tensor) -> Tensor:
    petals = [
        circle(p, 0.34, (0.56 * math.cos(a), 0.56 * math.sin(a)))
        for a in (math.pi / 2 + 2 * math.pi * k / 5 for k in range(5))
    ]
    return union(circle(p, 0.42), *petals)


def _gear(p: Tensor) -> Tensor:
    r, a = polar(p)
    teeth = (torch.cos(8 * a) * 3).clamp(-1, 1) * 0.5 + 0.5
    return subtract((r - (0.68 + 0.24 * teeth)) * 0.8, r - 0.26)


def _leaf(p: Tensor) -> Tensor:
    q = rotate(p, 45.0)
    lens = torch.maximum(circle(q, 1.0, (0.0, 0.52)), circle(q, 1.0, (0.0, -0.52)))
    return union(lens, segment(p, (-0.45, -0.45), (-0.8, -0.8), 0.06))


def _letter(*strokes: tuple[tuple[float, float], tuple[float, float]]) -> Sdf:
    return lambda p: union(*(segment(p, a, b, 0.17) for a, b in strokes))


def _poly(verts: Sequence[tuple[float, float]]) -> Sdf:
    return lambda p: polygon(p, verts)


# Object kinds, in a fixed order: the index is the label stored in metadata.
SHAPES: dict[str, Sdf] = {
    "circle": lambda p: circle(p, 0.85),
    "square": lambda p: box(p, 0.72, 0.72),
    "triangle": _poly(regular(3, 1.0, dy=-0.22)),
    "star": _poly(star_verts(5, 0.98, 0.4)),
    "heart": _poly(heart_verts()),
    "ring": lambda p: (circle(p, 0.66)).abs() - 0.2,
    "cross": lambda p: union(box(p, 0.86, 0.24), box(p, 0.24, 0.86)),
    "arrow": _poly(
        [(-0.92, -0.2), (0.1, -0.2), (0.1, -0.6), (0.95, 0.0), (0.1, 0.6), (0.1, 0.2), (-0.92, 0.2)]
    ),
    "crescent": lambda p: subtract(circle(p, 0.85), circle(p, 0.7, (0.38, 0.2))),
    "diamond": _poly([(0.0, 0.96), (0.56, 0.0), (0.0, -0.96), (-0.56, 0.0)]),
    "oval": lambda p: ellipse(p, 0.93, 0.5),
    "rectangle": lambda p: box(p, 0.93, 0.44),
    "pentagon": _poly(regular(5, 0.92, dy=-0.06)),
    "hexagon": _poly(regular(6, 0.9)),
    "trapezoid": _poly([(-0.93, -0.55), (0.93, -0.55), (0.42, 0.55), (-0.42, 0.55)]),
    "parallelogram": _poly([(-0.95, -0.48), (0.4, -0.48), (0.95, 0.48), (-0.4, 0.48)]),
    "sparkle": _poly(star_verts(4, 0.98, 0.26)),
    "flower": _flower,
    "gear": _gear,
    "cloud": lambda p: union(
        circle(p, 0.38, (-0.5, -0.12)),
        circle(p, 0.5, (0.02, 0.14)),
        circle(p, 0.36, (0.55, -0.14)),
        box(p, 0.55, 0.2, (0.0, -0.3)),
    ),
    "drop": lambda p: union(
        circle(p, 0.55, (0.0, -0.36)), polygon(p, [(-0.5, -0.15), (0.5, -0.15), (0.0, 0.96)])
    ),
    "dome": lambda p: subtract(circle(p, 0.92, (0.0, -0.45)), p[..., 1] + 0.45),
    "frame": lambda p: subtract(box(p, 0.8, 0.8), box(p, 0.44, 0.44)),
    "hourglass": _poly(
        [(-0.7, 0.92), (0.7, 0.92), (0.12, 0.0), (0.7, -0.92), (-0.7, -0.92), (-0.12, 0.0)]
    ),
    "chevron": _poly(
        [(-0.92, -0.25), (0.0, 0.65), (0.92, -0.25), (0.6, -0.6), (0.0, 0.0), (-0.6, -0.6)]
    ),
    "bolt": _poly(
        [(0.3, 0.96), (-0.58, -0.08), (-0.06, -0.08), (-0.32, -0.96), (0.58, 0.12), (0.06, 0.12)]
    ),
    "dumbbell": lambda p: union(
        circle(p, 0.34, (-0.6, 0.0)), circle(p, 0.34, (0.6, 0.0)), box(p, 0.6, 0.11)
    ),
    "target": lambda p: union(circle(p, 0.72).abs() - 0.16, circle(p, 0.26)),
    "house": lambda p: subtract(
        union(box(p, 0.6, 0.45, (0.0, -0.42)), polygon(p, [(-0.88, 0.0), (0.88, 0.0), (0.0, 0.9)])),
        box(p, 0.15, 0.26, (0.0, -0.62)),
    ),
    "tree": lambda p: union(
        polygon(p, [(-0.72, -0.4), (0.72, -0.4), (0.0, 0.96)]), box(p, 0.14, 0.3, (0.0, -0.64))
    ),
    "mushroom": lambda p: union(
        subtract(circle(p, 0.88, (0.0, -0.05)), p[..., 1] + 0.05), box(p, 0.22, 0.45, (0.0, -0.48))
    ),
    "leaf": _leaf,
    "pie": lambda p: subtract(
        circle(p, 0.85, (-0.1, 0.0)), polygon(p, [(-0.1, 0.0), (1.2, 0.9), (1.2, -0.9)])
    ),
    "crown": _poly(
        [
            (-0.85, -0.6),
            (0.85, -0.6),
            (0.85, 0.65),
            (0.42, 0.05),
            (0.0, 0.78),
            (-0.42, 0.05),
            (-0.85, 0.65),
        ]
    ),
    "zigzag": lambda p: polyline(
        p, [(-0.85, -0.45), (-0.42, 0.45), (0.0, -0.45), (0.42, 0.45), (0.85, -0.45)], 0.15
    ),
    "letter T": _letter(((-0.72, 0.78), (0.72, 0.78)), ((0.0, 0.78), (0.0, -0.82))),
    "letter L": _letter(((-0.45, 0.82), (-0.45, -0.78)), ((-0.45, -0.78), (0.6, -0.78))),
    "letter H": _letter(
        ((-0.58, 0.82), (-0.58, -0.82)), ((0.58, 0.82), (0.58, -0.82)), ((-0.58, 0.0), (0.58, 0.0))
    ),
    "letter E": _letter(
        ((-0.5, 0.8), (-0.5, -0.8)),
        ((-0.5, 0.8), (0.58, 0.8)),
        ((-0.5, 0.0), (0.42, 0.0)),
        ((-0.5, -0.8), (0.58, -0.8)),
    ),
    "letter Z": _letter(
        ((-0.62, 0.78), (0.62, 0.78)),
        ((0.62, 0.78), (-0.62, -0.78)),
        ((-0.62, -0.78), (0.62, -0.78)),
    ),
    "letter Y": _letter(
        ((-0.65, 0.82), (0.0, 0.05)), ((0.65, 0.82), (0.0, 0.05)), ((0.0, 0.05), (0.0, -0.85))
    ),
}

KINDS: tuple[str, ...] = tuple(SHAPES)


@cache
def atlas(res: int = ATLAS_RES) -> Tensor:
    """``(len(KINDS), res, res)`` coverage in [0, 1], row 0 at local y = +1 (image top).

    Coverage is the SDF clamped over a one-texel ramp: a box-filtered edge, so warping and
    downsampling the atlas gives smooth borders without supersampling every image.
    """
    c = (torch.arange(res, dtype=torch.float64) + 0.5) / res * 2.0 - 1.0
    y, x = torch.meshgrid(-c, c, indexing="ij")
    p = torch.stack((x, y), -1)
    texel = 2.0 / res
    masks = [(0.5 - fn(p) / texel).clamp(0.0, 1.0) for fn in SHAPES.values()]
    return torch.stack(masks).float().contiguous()
