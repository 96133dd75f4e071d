"""Calibration prompts, image sources (noise, real folder) and contact sheets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from d4c_core.calibration import (
    DEFAULT_TEMPLATES,
    GENERIC_NAMES,
    SOURCES,
    calibration_prompts,
    make_calibration,
    make_text_calibration,
    save_contact_sheet,
)
from d4c_core.errors import CalibrationError, SpecError
from d4c_core.models import LoadedModel, ModelSpec, load_clip
from d4c_core.recipe import CalibrationRecipe

MEAN = np.array(OPENAI_DATASET_MEAN)
STD = np.array(OPENAI_DATASET_STD)
# Distinct solid colours: each real-source image is identified by its colour after preprocess.
LSB = 2 / 255 / STD.min()  # two 8-bit steps in normalized units
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (90, 30, 200)]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_clip(ModelSpec("d4c-tiny-vit"))


def normalized(color: tuple[int, int, int]) -> np.ndarray:
    """Independent reference of CLIP normalization of a solid colour (per channel)."""
    return (np.array(color) / 255.0 - MEAN) / STD


def write_folder(root: Path) -> list[tuple[int, int, int]]:
    """Solid-colour images in nested folders with mixed suffix case, plus non-images."""
    names = ["a.png", "sub/b.PNG", "sub/deeper/c.jpg", "d.bmp", "e.JPEG", "f.webp"]
    for name, color in zip(names, COLORS, strict=True):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 48), color).save(p, quality=100, lossless=True)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "x.gif").write_bytes(b"GIF89a")  # not a listed suffix: ignored
    return COLORS


# ---------------------------------------------------------------- prompts


def test_generic_names_and_templates() -> None:
    assert len(set(GENERIC_NAMES)) >= 150
    assert len(set(GENERIC_NAMES)) == len(GENERIC_NAMES)
    assert all(n and n == n.strip() for n in GENERIC_NAMES)
    assert len(DEFAULT_TEMPLATES) == 18
    assert all("{c}" in t for t in DEFAULT_TEMPLATES)


def test_prompts_deterministic_and_seeded() -> None:
    a = calibration_prompts((), (), 64, seed=1)
    assert a == calibration_prompts((), (), 64, seed=1)
    assert a != calibration_prompts((), (), 64, seed=2)
    assert len(a) == 64
    assert len(set(a)) == 64  # 3690 pairs: drawing 64 of them never repeats
    allowed = {t.replace("{c}", c) for c in GENERIC_NAMES for t in DEFAULT_TEMPLATES}
    assert set(a) <= allowed


def test_prompts_custom_sets_cycle() -> None:
    out = calibration_prompts(("cat", "dog"), ("a {c}.", "the {c}!"), 9, seed=0)
    assert len(out) == 9
    assert set(out[:4]) == {"a cat.", "a dog.", "the cat!", "the dog!"}
    assert all(out[i] == out[i % 4] for i in range(9))


def test_prompts_errors() -> None:
    with pytest.raises(SpecError, match="placeholder"):
        calibration_prompts(("cat",), ("a photo",), 3, seed=0)
    with pytest.raises(SpecError, match="> 0"):
        calibration_prompts((), (), 0, seed=0)


def test_text_calibration(loaded: LoadedModel) -> None:
    recipe = CalibrationRecipe(num_prompts=7, classnames=("cat", "dog"), templates=("a {c}.",))
    tokens = make_text_calibration(loaded, recipe, seed=3)
    assert tokens.shape == (7, 32)
    expected = loaded.tokenizer(calibration_prompts(("cat", "dog"), ("a {c}.",), 7, 3))
    assert torch.equal(tokens, expected)
    assert torch.equal(tokens, make_text_calibration(loaded, recipe, seed=3))


# ---------------------------------------------------------------- image sources


def test_noise_source(loaded: LoadedModel) -> None:
    recipe = CalibrationRecipe(method="noise", num_images=5)
    x = make_calibration(loaded, recipe, seed=7)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, make_calibration(loaded, recipe, seed=7))
    assert not torch.equal(x, make_calibration(loaded, recipe, seed=8))
    # Spec: N(0, 1) from a generator seeded with `seed`, not optimized.
    ref = torch.randn((5, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, ref)


def test_registry_is_the_dispatch(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake(
        lm: LoadedModel,
        recipe: CalibrationRecipe,
        *,
        seed: int,
        image_dir: Path | None,
        on_step: object = None,
    ) -> torch.Tensor:
        calls.append(seed)
        return torch.zeros(recipe.num_images, 3, lm.image_size, lm.image_size)

    monkeypatch.setitem(SOURCES, "noise", fake)
    out = make_calibration(loaded, CalibrationRecipe(num_images=2), seed=11)
    assert calls == [11] and out.shape == (2, 3, 32, 32)

    monkeypatch.setitem(
        SOURCES, "noise", lambda lm, r, *, seed, image_dir, on_step: torch.zeros(1, 3, 8, 8)
    )
    with pytest.raises(RuntimeError, match="not"):
        make_calibration(loaded, CalibrationRecipe(num_images=2), seed=0)


def test_real_source(loaded: LoadedModel, tmp_path: Path) -> None:
    colors = write_folder(tmp_path)
    recipe = CalibrationRecipe(method="real", num_images=4)
    x = make_calibration(loaded, recipe, seed=0, image_dir=tmp_path)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, make_calibration(loaded, recipe, seed=0, image_dir=tmp_path))

    refs = np.stack([normalized(c) for c in colors])  # (6, 3)

    def which(img: torch.Tensor) -> int:
        per_channel = img.double().mean(dim=(1, 2)).numpy()
        # Solid colours stay solid through resize/crop; tolerance 2 LSB (JPEG is lossy).
        assert float((img.double() - img.double().mean(dim=(1, 2), keepdim=True)).abs().max()) < LSB
        dist = np.abs(refs - per_channel).max(axis=1)
        assert dist.min() < LSB
        return int(dist.argmin())

    picked = [which(img) for img in x]
    assert len(set(picked)) == 4  # a permutation: no image chosen twice
    everything = make_calibration(
        loaded, CalibrationRecipe(method="real", num_images=6), seed=5, image_dir=tmp_path
    )
    assert sorted(which(img) for img in everything) == list(range(6))
    other = [
        [which(img) for img in make_calibration(loaded, recipe, seed=s, image_dir=tmp_path)]
        for s in range(1, 6)
    ]
    assert any(o != picked for o in other)  # the seed matters


def test_real_source_errors(loaded: LoadedModel, tmp_path: Path) -> None:
    recipe = CalibrationRecipe(method="real", num_images=2)
    with pytest.raises(CalibrationError, match="needs an image folder"):
        make_calibration(loaded, recipe, seed=0)
    with pytest.raises(CalibrationError, match="does not exist"):
        make_calibration(loaded, recipe, seed=0, image_dir=tmp_path / "nope")

    write_folder(tmp_path / "few")
    with pytest.raises(CalibrationError, match="has 6 images, 7 requested"):
        make_calibration(
            loaded,
            CalibrationRecipe(method="real", num_images=7),
            seed=0,
            image_dir=tmp_path / "few",
        )

    bad = tmp_path / "bad" / "inner"
    bad.mkdir(parents=True)
    (bad / "garbage.png").write_bytes(b"definitely not a png")
    with pytest.raises(CalibrationError, match=r"inner/garbage\.png"):
        make_calibration(
            loaded,
            CalibrationRecipe(method="real", num_images=1),
            seed=0,
            image_dir=tmp_path / "bad",
        )


# ---------------------------------------------------------------- contact sheet


def test_contact_sheet(tmp_path: Path) -> None:
    colors = [(255, 0, 0), (0, 128, 255), (10, 200, 30), (255, 255, 255), (0, 0, 0)]
    imgs = torch.stack(
        [
            torch.tensor(normalized(c), dtype=torch.float32).view(3, 1, 1).expand(3, 8, 10)
            for c in colors
        ]
    )
    imgs[4, :, 0, 0] = 100.0  # far out of range: must clamp to white, not wrap
    path = save_contact_sheet(imgs, tmp_path / "out" / "sheet.png", cols=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        # 3 columns x 2 rows of 10x8 tiles with 2-px borders.
        assert im.size == (3 * (10 + 2) + 2, 2 * (8 + 2) + 2)
        px = np.asarray(im).astype(int)
    for i, c in enumerate(colors):
        r, col = divmod(i, 3)
        top, left = 2 + r * 10, 2 + col * 12
        tile = px[top + 1 : top + 8, left + 1 : left + 10]  # skip the clamped corner pixel
        assert np.abs(tile - np.array(c)).max() <= 1, f"tile {i}"
    assert tuple(px[2 + 10, 2 + 12]) == (255, 255, 255)  # clamped corner of image 4
    assert tuple(px[0, 0]) == (0, 0, 0)  # border

    with pytest.raises(ValueError, match="N, 3, H, W"):
        save_contact_sheet(torch.zeros(0, 3, 4, 4), tmp_path / "empty.png")
