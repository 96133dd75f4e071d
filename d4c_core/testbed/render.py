"""Batched rendering of testbed scenes: one object, maybe occluded, on a textured background.

Everything is a tensor op over the whole batch (grouped by background kind at most), drawn
from one ``torch.Generator`` in a fixed order, so the same generator state gives the same
bytes. The object is an atlas silhouette (``shapes.py``) warped by a per-image affine grid
at 2x resolution and box-filtered down; backgrounds are procedural textures mixing two
random colors kept far from the object's color, so the object always reads as foreground.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from d4c_core.testbed.shapes import atlas

IMAGE_SIZE = 32
SUPERSAMPLE = 2

# Named object colors (RGB in [0, 1]); saturated so a color word means one clear hue.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.08, 0.62, 0.12),
    "blue": (0.08, 0.2, 0.88),
    "yellow": (0.96, 0.88, 0.08),
    "orange": (0.98, 0.52, 0.04),
    "purple": (0.52, 0.12, 0.72),
    "pink": (0.98, 0.52, 0.74),
    "cyan": (0.06, 0.84, 0.9),
    "white": (0.97, 0.97, 0.97),
    "black": (0.04, 0.04, 0.04),
    "brown": (0.5, 0.28, 0.08),
    "gray": (0.5, 0.5, 0.5),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
COLOR_RGB = torch.tensor(list(COLORS.values()), dtype=torch.float32)

BACKGROUNDS: tuple[str, ...] = (
    "plain", "gradient", "stripes", "checkerboard", "dots", "grass", "waves", "clutter",
)  # fmt: skip

# Half-size of the object in image units ([-1, 1] across): with the shapes' +-0.95 extent,
# "small" spans ~45-58 % of the image and "large" ~63-80 %, big enough to learn shape.
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RANGE = torch.tensor([[0.47, 0.61], [0.66, 0.84]])
MAX_ROTATION_DEG = 15.0
ASPECT_JITTER = 0.1
OCCLUSION_P = 0.45
OCCLUSION_MAX = 0.3  # largest share of the object an occluder may hide
OCCLUSION_MIN = 0.05  # below this it would not be a visible occlusion
MIN_COLOR_DIST = 0.42  # RGB distance kept between the object and every other color near it


@dataclass(frozen=True)
class Scene:
    """What to draw, per image: indices into KINDS, COLOR_NAMES, SIZES and BACKGROUNDS."""

    kind: Tensor
    color: Tensor
    size: Tensor
    background: Tensor

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def __getitem__(self, idx: slice | Tensor) -> Scene:
        return Scene(self.kind[idx], self.color[idx], self.size[idx], self.background[idx])

    @staticmethod
    def cat(scenes: list[Scene]) -> Scene:
        return Scene(
            torch.cat([s.kind for s in scenes]),
            torch.cat([s.color for s in scenes]),
            torch.cat([s.size for s in scenes]),
            torch.cat([s.background for s in scenes]),
        )


def _u(gen: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _grid(n: int, res: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """Pixel-center coordinates in [-1, 1] (x right, y down), each ``(n, 1, res, res)``."""
    c = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2.0 - 1.0
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x.expand(n, 1, res, res), y.expand(n, 1, res, res)


def _coverage(sdf: Tensor, res: int = IMAGE_SIZE) -> Tensor:
    """Anti-aliased coverage from an SDF in image units (one pixel = 2 / res)."""
    return (0.5 - sdf * (res / 2.0)).clamp(0.0, 1.0)


def _far_colors(avoid: Tensor, proposals: Tensor) -> Tensor:
    """Per row, the first of K proposed colors far from ``avoid``; inverse color if none is.

    ``avoid`` (n, 3), ``proposals`` (n, K, 3). Choosing among pre-drawn proposals keeps the
    number of generator draws fixed, so determinism does not depend on the data.
    """
    ok = (proposals - avoid[:, None]).norm(dim=-1) > MIN_COLOR_DIST
    first = ok.float().argmax(dim=1)
    pick = proposals[torch.arange(len(avoid)), first]
    fallback = torch.where(avoid.mean(-1, keepdim=True) > 0.5, 0.12, 0.88).expand_as(avoid)
    return torch.where(ok.any(dim=1, keepdim=True), pick, fallback)


def _muted(gen: torch.Generator, n: int, k: int) -> Tensor:
    """Random colors pulled toward gray: backgrounds are mostly less saturated than objects."""
    c = torch.rand(n, k, 3, generator=gen)
    gray = c.mean(-1, keepdim=True)
    return gray + (c - gray) * _u(gen, n, k, 1, lo=0.2, hi=0.9)


def _object_mask(scene: Scene, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Coverage ``(n, 1, 32, 32)``, centers ``(n, 2)`` (image coords) and half-sizes ``(n,)``."""
    n = len(scene)
    lo, hi = SIZE_RANGE[scene.size].unbind(-1)
    s = lo + (hi - lo) * _u(gen, n)
    sxy = s[:, None] * (1.0 + ASPECT_JITTER * _u(gen, n, 2, lo=-1.0, hi=1.0))
    theta = torch.deg2rad(_u(gen, n, lo=-MAX_ROTATION_DEG, hi=MAX_ROTATION_DEG))
    room = (1.0 - 0.95 * sxy.max(dim=1).values).clamp(min=0.0)[:, None]
    center = _u(gen, n, 2, lo=-1.0, hi=1.0) * room  # image coords (y down)
    # Output pixel q (y down) -> local p (y up): p = S^-1 R(-theta) F (q - c); the atlas is
    # stored y-down again, so the sampling coordinate is F p with F = diag(1, -1).
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack((torch.stack((cos, sin), -1), torch.stack((-sin, cos), -1)), -2)
    flip = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    a = flip @ (rot / sxy[:, :, None]) @ flip
    b = -(a @ center[:, :, None])
    warp = torch.cat((a, b), dim=2)
    res = IMAGE_SIZE * SUPERSAMPLE
    grid = F.affine_grid(warp, [n, 1, res, res], align_corners=False)
    tex = atlas()[scene.kind][:, None]
    mask = F.grid_sample(tex, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(mask, SUPERSAMPLE), center, s


def _occluder(
    gen: torch.Generator, mask: Tensor, center: Tensor, s: Tensor
) -> tuple[Tensor, Tensor]:
    """A bar or blob over the object's edge; dropped where it would hide too much or too little.

    Returns occluder coverage ``(n, 1, 32, 32)`` and whether it was kept ``(n,)``.
    """
    n = mask.shape[0]
    x, y = _grid(n)
    want = _u(gen, n) < OCCLUSION_P
    is_bar = _u(gen, n) < 0.5
    phi = _u(gen, n, hi=2 * math.pi)
    reach = s * _u(gen, n, lo=0.5, hi=1.0)
    ax = (center[:, 0] + reach * torch.cos(phi)).view(n, 1, 1, 1)
    ay = (center[:, 1] + reach * torch.sin(phi)).view(n, 1, 1, 1)
    radius = (s * _u(gen, n, lo=0.25, hi=0.45)).view(n, 1, 1, 1)
    psi = _u(gen, n, hi=math.pi).view(n, 1, 1, 1)
    half_width = (s * _u(gen, n, lo=0.08, hi=0.16)).view(n, 1, 1, 1)
    blob = torch.hypot(x - ax, y - ay) - radius
    bar = ((x - ax) * torch.sin(psi) - (y - ay) * torch.cos(psi)).abs() - half_width
    occ = _coverage(torch.where(is_bar.view(n, 1, 1, 1), bar, blob))
    hidden = (mask * occ).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1e-6)
    keep = want & (hidden >= OCCLUSION_MIN) & (hidden <= OCCLUSION_MAX)
    return occ * keep.view(n, 1, 1, 1), keep


def _pattern(kind: int, gen: torch.Generator, n: int) -> Tensor:
    """Mixing weight ``(n, 1, 32, 32)`` in [0, 1] between a background's two colors."""
    x, y = _grid(n)
    ang = _u(gen, n, 1, 1, 1, hi=math.pi)
    along = x * torch.cos(ang) + y * torch.sin(ang)
    across = -x * torch.sin(ang) + y * torch.cos(ang)
    freq = _u(gen, n, 1, 1, 1, lo=2.0, hi=5.0)  # cycles across the image
    phase = _u(gen, n, 1, 1, 1, hi=2 * math.pi)
    name = BACKGROUNDS[kind]
    if name == "plain":
        return torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    if name == "gradient":
        return (0.5 + 0.5 * along).clamp(0.0, 1.0)
    if name == "stripes":
        return 0.5 + 0.5 * torch.tanh(3.0 * torch.sin(math.pi * freq * along + phase))
    if name == "checkerboard":
        w = torch.sin(math.pi * freq * along + phase) * torch.sin(math.pi * freq * across)
        return 0.5 + 0.5 * torch.tanh(6.0 * w)
    if name == "dots":
        spacing = 2.0 / (freq * 1.5)
        fa = along / spacing + phase
        fb = across / spacing
        d = torch.hypot(fa - fa.round(), fb - fb.round()) * spacing
        return _coverage(d - spacing * _u(gen, n, 1, 1, 1, lo=0.2, hi=0.35))
    if name == "grass":
        # vertical blades: noise stretched along y, plus coarse patches
        blades = F.interpolate(
            torch.rand(n, 1, 6, 32, generator=gen), size=IMAGE_SIZE, mode="bilinear"
        )
        patches = F.interpolate(
            torch.rand(n, 1, 4, 4, generator=gen), size=IMAGE_SIZE, mode="bilinear"
        )
        return (0.65 * blades + 0.35 * patches).clamp(0.0, 1.0)
    if name == "waves":
        wobble = 0.6 * torch.sin(math.pi * freq * 0.7 * across + phase)
        return 0.5 + 0.5 * torch.sin(math.pi * freq * along + 3.0 * wobble)
    if name == "clutter":
        k = 7  # soft blobs of varying strength: distractors without shape semantics
        cx = _u(gen, n, k, 1, 1, lo=-1.1, hi=1.1)
        cy = _u(gen, n, k, 1, 1, lo=-1.1, hi=1.1)
        r = _u(gen, n, k, 1, 1, lo=0.08, hi=0.28)
        alpha = _u(gen, n, k, 1, 1, lo=0.4, hi=1.0)
        ex = _u(gen, n, k, 1, 1, lo=0.6, hi=1.6)
        d = torch.hypot((x - cx) * ex, (y - cy) / ex) - r
        return (_coverage(d) * alpha).amax(dim=1, keepdim=True)
    raise AssertionError(name)


def render(scene: Scene, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``scene``: uint8 images ``(n, 3, 32, 32)`` and which ones got occluded ``(n,)``."""
    n = len(scene)
    base = COLOR_RGB[scene.color]
    obj_rgb = (base + _u(gen, n, 3, lo=-0.05, hi=0.05)).clamp(0.0, 1.0)
    mask, center, s = _object_mask(scene, gen)
    occ, occluded = _occluder(gen, mask, center, s)

    # Two background colors and an occluder color, all far from the object's color.
    c1 = _far_colors(obj_rgb, _muted(gen, n, 6))
    c2 = _far_colors(obj_rgb, (c1[:, None] + _u(gen, n, 6, 3, lo=-0.4, hi=0.4)).clamp(0, 1))
    c3 = _far_colors(obj_rgb, torch.rand(n, 6, 3, generator=gen))
    t = torch.empty(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    for k in range(len(BACKGROUNDS)):
        idx = (scene.background == k).nonzero().flatten()
        if len(idx):
            t[idx] = _pattern(k, gen, len(idx))
    c1, c2, c3 = (c.view(n, 3, 1, 1) for c in (c1, c2, c3))
    img = c1 + t * (c2 - c1)

    # The object is lit from a random side so it is not a flat color decal.
    x, y = _grid(n)
    light = _u(gen, n, 2, lo=-0.2, hi=0.2).view(n, 2, 1, 1)
    shade = 1.0 + light[:, :1] * x + light[:, 1:] * y
    obj = (obj_rgb.view(n, 3, 1, 1) * shade).clamp(0.0, 1.0)
    img = img * (1.0 - mask) + obj * mask
    # Always a visible occluder, never a hole: a bite out of a circle would be a crescent.
    img = img * (1.0 - occ) + c3 * occ

    # Camera: mild global contrast/brightness change and sensor noise.
    contrast = _u(gen, n, lo=0.9, hi=1.1).view(n, 1, 1, 1)
    bright = _u(gen, n, lo=-0.04, hi=0.04).view(n, 1, 1, 1)
    sigma = _u(gen, n, lo=0.005, hi=0.03).view(n, 1, 1, 1)
    noise = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * sigma
    img = (img - 0.5) * contrast + 0.5 + bright + noise
    return (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8), occluded
