"""Calibration sources: where the images that drive range init and reconstruction come from.

A source is a function ``(loaded, recipe, *, seed, image_dir, on_step) -> (N, 3, H, W)`` in
CLIP's normalized input space at the model's resolution; ``on_step(fraction)`` reports the
progress of long (synthesizing) sources and may raise to cancel them. ``SOURCES`` maps
``recipe.method`` to one; ``make_calibration`` is the single entry point, so synthesis
methods (bns, pse, d4c) plug in by adding a registry entry, without callers changing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch import Tensor

from d4c_core.calibration.bns import bns_source
from d4c_core.calibration.d4c import d4c_source
from d4c_core.calibration.prompts import calibration_prompts
from d4c_core.calibration.pse import pse_source
from d4c_core.calibration.synthesis import ProgressCallback, initial_images
from d4c_core.errors import CalibrationError
from d4c_core.finite import require_finite
from d4c_core.models import BUILTIN_ARCHS, LoadedModel
from d4c_core.recipe import CalibrationRecipe

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


class CalibrationSource(Protocol):
    def __call__(
        self,
        loaded: LoadedModel,
        recipe: CalibrationRecipe,
        *,
        seed: int,
        image_dir: Path | None,
        on_step: ProgressCallback | None = None,
    ) -> Tensor: ...


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-less modules)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by relative path for a stable order."""
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB (decoding errors surface here, not later)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def noise_source(
    loaded: LoadedModel,
    recipe: CalibrationRecipe,
    *,
    seed: int,
    image_dir: Path | None = None,
    on_step: ProgressCallback | None = None,
) -> Tensor:
    """N(0, 1) in normalized space, not optimized (method spec: the noise baseline).

    The same tensor is where every synthesizing source starts from.
    """
    x = initial_images(recipe.num_images, loaded.image_size, seed)
    return x.to(model_device(loaded.model))


def real_source(
    loaded: LoadedModel,
    recipe: CalibrationRecipe,
    *,
    seed: int,
    image_dir: Path | None = None,
    on_step: ProgressCallback | None = None,
) -> Tensor:
    """``num_images`` files picked by a seeded permutation from a folder, CLIP-preprocessed."""
    if image_dir is None:
        raise CalibrationError("calibration method 'real' needs an image folder (image_dir)")
    root = Path(image_dir)
    if not root.is_dir():
        raise CalibrationError(f"calibration image folder {root} does not exist")
    files = list_images(root)
    want = recipe.num_images
    if len(files) < want:
        raise CalibrationError(
            f"calibration image folder {root} has {len(files)} images, {want} requested"
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = [files[i] for i in torch.randperm(len(files), generator=gen)[:want].tolist()]
    out = []
    for path in chosen:
        try:
            img = load_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            rel = path.relative_to(root).as_posix()
            raise CalibrationError(f"cannot read calibration image {rel}: {e}") from e
        out.append(loaded.preprocess(img))
    return torch.stack(out).to(torch.float32).to(model_device(loaded.model))


SOURCES: dict[str, CalibrationSource] = {
    "noise": noise_source,
    "real": real_source,
    "bns": bns_source,
    "pse": pse_source,
    "d4c": d4c_source,
}


def make_calibration(
    loaded: LoadedModel,
    recipe: CalibrationRecipe,
    *,
    seed: int,
    image_dir: Path | None = None,
    on_step: ProgressCallback | None = None,
) -> Tensor:
    """Calibration images ``(num_images, 3, H, W)`` float32 for ``recipe.method``."""
    source = SOURCES.get(recipe.method)
    if source is None:
        raise CalibrationError(
            f"no calibration source {recipe.method!r}; available: {', '.join(sorted(SOURCES))}"
        )
    images = source(loaded, recipe, seed=seed, image_dir=image_dir, on_step=on_step)
    require_finite("in the calibration images", images)
    size = loaded.image_size
    expected = (recipe.num_images, 3, size, size)
    if tuple(images.shape) != expected:  # a source bug, not a user error
        raise RuntimeError(f"source {recipe.method!r} gave {tuple(images.shape)}, not {expected}")
    return images


def make_text_calibration(loaded: LoadedModel, recipe: CalibrationRecipe, seed: int) -> Tensor:
    """Token ids ``(num_prompts, context_length)`` of the seeded calibration prompts.

    Without a prompt set in the recipe, real CLIPs use the built-in generic names; the tiny
    built-in models use the generic set they ship (training concepts outside every task).
    """
    names, templates = recipe.classnames, recipe.templates
    if not names and loaded.spec.arch in BUILTIN_ARCHS:
        from d4c_core.testbed.tasks import TEMPLATES, generic_prompts

        names, templates = generic_prompts(), templates or TEMPLATES
    prompts = calibration_prompts(names, templates, recipe.num_prompts, seed)
    return loaded.tokenizer(prompts).to(model_device(loaded.model))
