"""Zero-shot evaluation tasks of the testbed: the project's CIFAR-10 / CIFAR-100 stand-ins.

``object10`` asks for an object's kind (10 of the world's kinds, chosen for distinct
silhouettes); ``object_color100`` for kind and color (those 10 kinds x 10 colors). Splits
are generated on demand from fixed seed streams that training never draws from, with
labels balanced within every chunk of ``world.CHUNK`` images.

D4C calibrates with prompts built from ``generic_prompts()``: kinds the models were trained
on that no task asks about, so calibration never sees an evaluation class name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor

from d4c_core.errors import SpecError
from d4c_core.testbed.render import BACKGROUNDS, COLOR_NAMES, SIZES, Scene
from d4c_core.testbed.shapes import KINDS
from d4c_core.testbed.world import render_chunks, to_clip

OBJECT10_KINDS: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart",
    "ring", "cross", "arrow", "crescent", "diamond",
)  # fmt: skip
EVAL_COLORS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "black",
)  # fmt: skip

# CLIP-style zero-shot templates: photo variations, some with words training never used.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a drawing of a {c}.",
    "a picture of a {c}.",
    "a photo of the {c}.",
    "a photo of a small {c}.",
    "a photo of a large {c}.",
    "a close-up photo of a {c}.",
    "a cropped photo of a {c}.",
    "a good photo of a {c}.",
    "a bad photo of a {c}.",
    "a rendering of a {c}.",
)

GENERIC_TEMPLATE = "a photo of a {c}."
SPLIT_SIZES: dict[str, int] = {"test": 5000, "train": 10000}


@dataclass(frozen=True)
class Task:
    """A zero-shot classification task: class ``i`` is kind ``kinds[i]`` (and color ``colors[i]``).

    ``colors`` empty means any of the world's colors may appear for a class.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    kinds: tuple[int, ...] = field(repr=False)
    colors: tuple[int, ...] = field(default=(), repr=False)

    def split(self, split: str, n: int | None = None) -> tuple[Tensor, Tensor]:
        """``(images, labels)``: CLIP-normalized float ``(n, 3, 32, 32)`` and long ``(n,)``.

        Default ``n`` is ``SPLIT_SIZES[split]``; a smaller ``n`` that is a multiple of
        ``CHUNK`` is a prefix of the full split. Results are cached per ``(split, n)``.
        """
        if split not in SPLIT_SIZES:
            raise SpecError(f"unknown split {split!r}; use one of {', '.join(SPLIT_SIZES)}")
        n = SPLIT_SIZES[split] if n is None else n
        if n <= 0:
            raise SpecError(f"split size must be > 0, got {n}")
        pixels, labels = _split_pixels(self, split, n)
        return to_clip(pixels), labels.clone()


@cache
def _split_pixels(task: Task, split: str, n: int) -> tuple[Tensor, Tensor]:
    """uint8 images and labels (cached as uint8: a quarter of the float memory)."""
    n_cls = len(task.classnames)
    kinds = torch.tensor(task.kinds)
    colors = torch.tensor(task.colors) if task.colors else None
    labels: list[Tensor] = []

    def make_scene(m: int, gen: torch.Generator) -> Scene:
        y = (torch.arange(m) % n_cls)[torch.randperm(m, generator=gen)]
        labels.append(y)
        color = (
            colors[y]
            if colors is not None
            else torch.randint(len(COLOR_NAMES), (m,), generator=gen)
        )
        return Scene(
            kind=kinds[y],
            color=color,
            size=torch.randint(len(SIZES), (m,), generator=gen),
            background=torch.randint(len(BACKGROUNDS), (m,), generator=gen),
        )

    _, pixels, _, _ = render_chunks(n, ("task", task.name, split), make_scene)
    return pixels, torch.cat(labels)


@cache
def tasks() -> dict[str, Task]:
    """The evaluation tasks by name: ``object10`` and ``object_color100``."""
    k10 = tuple(KINDS.index(k) for k in OBJECT10_KINDS)
    c10 = tuple(COLOR_NAMES.index(c) for c in EVAL_COLORS)
    pairs = [(k, c) for k in k10 for c in c10]
    return {
        "object10": Task("object10", OBJECT10_KINDS, TEMPLATES, k10),
        "object_color100": Task(
            "object_color100",
            tuple(f"{COLOR_NAMES[c]} {KINDS[k]}" for k, c in pairs),
            TEMPLATES,
            tuple(k for k, _ in pairs),
            tuple(c for _, c in pairs),
        ),
    }


def generic_prompts() -> tuple[str, ...]:
    """Concepts the built-in models learned that no evaluation task uses (for D4C prompts).

    These are the kinds outside ``object10``; every task's classes are built from those ten
    kinds, so a prompt here never names (or contains the word of) an evaluation class.
    """
    return tuple(k for k in KINDS if k not in OBJECT10_KINDS)
