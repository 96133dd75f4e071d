"""The testbed world: seeded scenes, their captions, and image-caption batches.

A stand-in for "web images with alt text" that fits on 2 CPU cores: every image shows one
object (kind, color, size) on a background, and its caption names some of those
attributes through one of several templates. Generation is chunked (``CHUNK`` images per
``torch.Generator``, each seeded from the caller's seed and the chunk index), so the same
seed gives the same bytes and the first ``k * CHUNK`` images of a longer draw are the same
as a shorter one's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from d4c_core.testbed.render import BACKGROUNDS, COLOR_NAMES, SIZES, Scene, render
from d4c_core.testbed.shapes import KINDS

CHUNK = 1000

# How a caption names each background.
BACKGROUND_PHRASES: dict[str, str] = {
    "plain": "a plain background",
    "gradient": "a gradient",
    "stripes": "stripes",
    "checkerboard": "a checkerboard",
    "dots": "dots",
    "grass": "grass",
    "waves": "waves",
    "clutter": "clutter",
}

# Caption templates and the attributes each one states. The attribute sets decide which
# other images a caption is also true of (``caption_fits``): those pairs are not negatives.
CAPTION_TEMPLATES: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (t, frozenset(a.split()))
    for t, a in (
        ("a photo of a {size} {color} {kind} on {bg}.", "size color kind bg"),
        ("a {color} {kind}.", "color kind"),
        ("a picture of a {kind}.", "kind"),
        ("a {size} {kind} in front of {bg}.", "size kind bg"),
        ("a photo of a {color} {kind}.", "color kind"),
        ("a {kind} on {bg}.", "kind bg"),
        ("a {size} {color} {kind}.", "size color kind"),
        ("a photo of a {kind}.", "kind"),
        ("a drawing of a {color} {kind} on {bg}.", "color kind bg"),
        ("there is a {color} {kind} in this picture.", "color kind"),
    )
)

# Per attribute, which templates state it (indexed by template id).
_STATES: dict[str, Tensor] = {
    attr: torch.tensor([attr in attrs for _, attrs in CAPTION_TEMPLATES])
    for attr in ("kind", "color", "size", "bg")
}
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def chunk_seed(*parts: object) -> int:
    """A 63-bit seed from named parts: streams with different names never share a seed."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def to_clip(pixels: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` -> float32 in CLIP's normalized input space (OpenAI mean/std)."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def to_uint8(images: Tensor) -> Tensor:
    """Inverse of ``to_clip`` (for viewing and saving): float CLIP space -> uint8 pixels."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return ((images.float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def sample_scenes(
    n: int,
    gen: torch.Generator,
    kinds: Sequence[int] | None = None,
    colors: Sequence[int] | None = None,
) -> Scene:
    """Uniform attributes; ``kinds``/``colors`` restrict the kind/color index sets."""
    kind_set = torch.tensor(range(len(KINDS)) if kinds is None else kinds)
    color_set = torch.tensor(range(len(COLOR_NAMES)) if colors is None else colors)
    return Scene(
        kind=kind_set[torch.randint(len(kind_set), (n,), generator=gen)],
        color=color_set[torch.randint(len(color_set), (n,), generator=gen)],
        size=torch.randint(len(SIZES), (n,), generator=gen),
        background=torch.randint(len(BACKGROUNDS), (n,), generator=gen),
    )


def caption(template: int, kind: int, color: int, size: int, background: int) -> str:
    text = CAPTION_TEMPLATES[template][0].format(
        kind=KINDS[kind],
        color=COLOR_NAMES[color],
        size=SIZES[size],
        bg=BACKGROUND_PHRASES[BACKGROUNDS[background]],
    )
    return _ARTICLE.sub(r"\1n ", text)


def caption_fits(scene: Scene, template: Tensor) -> Tensor:
    """``(N, N)`` bool: ``[i, j]`` is True when caption ``j`` is also a true caption of image ``i``.

    A caption states only its template's attributes, so "a picture of a star" fits every
    star. Contrastive training must not push such pairs apart (they are false negatives).
    """
    fits = scene.kind[:, None] == scene.kind[None, :]
    for attr, values in (("color", scene.color), ("size", scene.size), ("bg", scene.background)):
        states = _STATES[attr][template]
        fits &= (values[:, None] == values[None, :]) | ~states[None, :]
    return fits | torch.eye(len(scene), dtype=torch.bool)


@dataclass(frozen=True)
class Batch:
    """Generated images (uint8), their scenes, occlusion flags and captions."""

    pixels: Tensor
    scene: Scene
    occluded: Tensor
    template: Tensor
    captions: tuple[str, ...]

    @property
    def images(self) -> Tensor:
        """Float ``(N, 3, 32, 32)`` in CLIP-normalized space: what the model is fed."""
        return to_clip(self.pixels)

    def __len__(self) -> int:
        return len(self.scene)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, restoring the caller's setting after.

    Rendering is many small element-wise ops: a second thread gains ~1.7x on an idle
    2-core machine but loses ~10x when another process holds a core (OpenMP workers spin
    and wait on each other), so the robust choice is one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def render_chunks(
    n: int, seed_parts: tuple[object, ...], make_scene: Callable[[int, torch.Generator], Scene]
) -> tuple[Scene, Tensor, Tensor, Tensor]:
    """Render ``n`` images in chunks of ``CHUNK``, chunk ``i`` drawn from ``(*seed_parts, i)``.

    ``make_scene(m, gen)`` picks a chunk's attributes; a caption template per image is drawn
    after rendering. Returns scenes, uint8 pixels, occluded flags and template indices.
    """
    scenes: list[Scene] = []
    pixels: list[Tensor] = []
    occluded: list[Tensor] = []
    templates: list[Tensor] = []
    with one_thread():
        for i, start in enumerate(range(0, n, CHUNK)):
            m = min(CHUNK, n - start)
            gen = torch.Generator().manual_seed(chunk_seed(*seed_parts, i))
            scene = make_scene(m, gen)
            px, occ = render(scene, gen)
            scenes.append(scene)
            pixels.append(px)
            occluded.append(occ)
            templates.append(torch.randint(len(CAPTION_TEMPLATES), (m,), generator=gen))
    return Scene.cat(scenes), torch.cat(pixels), torch.cat(occluded), torch.cat(templates)


def generate(
    n: int,
    seed: int,
    kinds: Sequence[int] | None = None,
    colors: Sequence[int] | None = None,
    stream: str = "world",
) -> Batch:
    """``n`` random image-caption pairs; same ``(n, seed, kinds, colors, stream)``, same bytes."""
    scene, pixels, occluded, template = render_chunks(
        n, (stream, seed), lambda m, gen: sample_scenes(m, gen, kinds, colors)
    )
    caps = tuple(
        caption(t, k, c, s, b)
        for t, k, c, s, b in zip(
            template.tolist(),
            scene.kind.tolist(),
            scene.color.tolist(),
            scene.size.tolist(),
            scene.background.tolist(),
            strict=True,
        )
    )
    return Batch(pixels, scene, occluded, template, caps)
