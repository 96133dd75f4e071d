"""The testbed world, its zero-shot tasks and the training step (speed is benchmarked, not here)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss

from d4c_core.models import ModelSpec, create_architecture, load_clip
from d4c_core.testbed.render import BACKGROUNDS, COLOR_NAMES, SIZES
from d4c_core.testbed.shapes import KINDS, atlas
from d4c_core.testbed.shipped import save_weights
from d4c_core.testbed.tasks import (
    EVAL_COLORS,
    GENERIC_TEMPLATE,
    OBJECT10_KINDS,
    generic_prompts,
    tasks,
)
from d4c_core.testbed.train import (
    LOGIT_SCALE_MAX,
    CaptionTokens,
    MaskedClipLoss,
    lr_at,
    param_groups,
    parse_args,
    train_batch,
    train_step,
)
from d4c_core.testbed.world import (
    BACKGROUND_PHRASES,
    CAPTION_TEMPLATES,
    CHUNK,
    caption_fits,
    generate,
    to_clip,
    to_uint8,
)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_vocabulary_is_rich_enough() -> None:
    assert len(KINDS) >= 30 and len(set(KINDS)) == len(KINDS)
    assert len(COLOR_NAMES) >= 10 and len(set(COLOR_NAMES)) == len(COLOR_NAMES)
    assert len(BACKGROUNDS) >= 5 and set(BACKGROUND_PHRASES) == set(BACKGROUNDS)
    assert len(CAPTION_TEMPLATES) >= 6
    masks = atlas()
    assert masks.shape[0] == len(KINDS)
    # every silhouette is a real shape: neither empty nor the whole frame, and unique
    cover = masks.mean(dim=(1, 2))
    assert bool(((cover > 0.1) & (cover < 0.7)).all())
    flat = masks.flatten(1)
    diff = (flat[:, None] - flat[None]).abs().mean(-1) + torch.eye(len(KINDS))
    assert float(diff.min()) > 0.02


def test_generation_is_deterministic_per_seed() -> None:
    a, b, c = generate(64, seed=3), generate(64, seed=3), generate(64, seed=4)
    assert a.pixels.dtype == torch.uint8 and a.pixels.shape == (64, 3, 32, 32)
    assert torch.equal(a.pixels, b.pixels) and a.captions == b.captions
    assert torch.equal(a.scene.kind, b.scene.kind) and torch.equal(a.occluded, b.occluded)
    assert not torch.equal(a.pixels, c.pixels)
    # chunked seeding: a longer draw starts with the shorter one's whole chunks
    long = generate(CHUNK + 8, seed=3)
    assert torch.equal(long.pixels[:CHUNK], generate(CHUNK, seed=3).pixels)


def test_images_are_clip_normalized_and_viewable() -> None:
    batch = generate(32, seed=0)
    x = batch.images
    assert x.dtype == torch.float32 and x.shape == (32, 3, 32, 32)
    assert torch.equal(to_uint8(x), batch.pixels)
    assert torch.allclose(to_clip(batch.pixels), x)
    # textured scenes, not flat fills: every image has real contrast
    assert bool((batch.pixels.float().std(dim=(1, 2, 3)) > 10).all())


def test_captions_state_their_images_attributes() -> None:
    batch = generate(400, seed=1)
    color_words, size_words = set(COLOR_NAMES), set(SIZES)
    for i, cap in enumerate(batch.captions):
        attrs = CAPTION_TEMPLATES[int(batch.template[i])][1]
        kind = KINDS[int(batch.scene.kind[i])]
        color = COLOR_NAMES[int(batch.scene.color[i])]
        size = SIZES[int(batch.scene.size[i])]
        bg = BACKGROUND_PHRASES[BACKGROUNDS[int(batch.scene.background[i])]]
        w = words(cap)
        assert words(kind) <= w, cap
        assert (w & color_words) == ({color} if "color" in attrs else set()), cap
        assert (w & size_words) == ({size} if "size" in attrs else set()), cap
        assert (bg in cap) == ("bg" in attrs), cap
    assert len(set(batch.template.tolist())) == len(CAPTION_TEMPLATES)
    assert not any(re.search(r"\ba [aeiou]", c) for c in batch.captions)  # "an orange star"


def test_caption_fits_marks_false_negatives() -> None:
    batch = generate(200, seed=2)
    fits = caption_fits(batch.scene, batch.template)
    assert bool(fits.diagonal().all())
    same_text = torch.tensor(
        [[a == b for b in batch.captions] for a in batch.captions], dtype=torch.bool
    )
    assert bool(fits[same_text].all())  # an identical caption is never a negative
    kinds = batch.scene.kind
    assert not bool(fits[kinds[:, None] != kinds[None, :]].any())  # other kinds always are


@pytest.mark.parametrize("name", ["object10", "object_color100"])
def test_task_splits_are_balanced_and_fixed(name: str) -> None:
    task = tasks()[name]
    x, y = task.split("test")
    n_cls = len(task.classnames)
    assert x.shape == (y.shape[0], 3, 32, 32) and y.shape[0] >= 5000
    counts = torch.bincount(y, minlength=n_cls)
    assert int(counts.min()) >= 0.9 * y.shape[0] / n_cls
    assert int(counts.max()) <= 1.1 * y.shape[0] / n_cls
    # a prefix of whole chunks is the same images, and train differs from test
    x1, y1 = task.split("test", n=CHUNK)
    assert torch.equal(x1, x[:CHUNK]) and torch.equal(y1, y[:CHUNK])
    xt, _ = task.split("train", n=CHUNK)
    assert not torch.equal(xt, x1)


def test_task_definitions() -> None:
    all_tasks = tasks()
    assert set(all_tasks) == {"object10", "object_color100"}
    o10, oc100 = all_tasks["object10"], all_tasks["object_color100"]
    assert o10.classnames == OBJECT10_KINDS and len(set(OBJECT10_KINDS)) == 10
    assert set(OBJECT10_KINDS) <= set(KINDS) and set(EVAL_COLORS) <= set(COLOR_NAMES)
    assert len(oc100.classnames) == 100 == len(set(oc100.classnames))
    assert "red star" in oc100.classnames
    for task in all_tasks.values():
        assert len(task.templates) >= 10
        assert all("{c}" in t for t in task.templates)
    with pytest.raises(Exception, match="unknown split"):
        o10.split("val")


def test_generic_prompts_avoid_every_evaluation_class() -> None:
    generic = generic_prompts()
    assert len(generic) >= 20 and set(generic) <= set(KINDS)
    assert "{c}" in GENERIC_TEMPLATE
    eval_words = set().union(*(words(k) for k in OBJECT10_KINDS))
    for task in tasks().values():
        assert not set(generic) & set(task.classnames)
    for g in generic:
        assert not words(g) & eval_words, g


def test_masked_loss_is_clip_loss_without_a_mask() -> None:
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    masked = MaskedClipLoss()
    assert torch.allclose(masked(img, txt, scale), ClipLoss()(img, txt, scale))
    ignore = torch.zeros(6, 6, dtype=torch.bool)
    ignore[0, 1] = ignore[1, 0] = True
    loss = masked(img, txt, scale, ignore)
    assert math.isfinite(float(loss)) and float(loss) < float(ClipLoss()(img, txt, scale))


def test_lr_schedule_and_param_groups() -> None:
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    model = create_architecture("d4c-tiny-vit")
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    keep_names = {names[id(p)] for p in keep["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding"} <= keep_names
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert keep["weight_decay"] == 0.0


def test_one_training_step_changes_the_model() -> None:
    torch.manual_seed(0)
    arch = "d4c-tiny-vit"
    model = create_architecture(arch)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    tokens_of = CaptionTokens(open_clip.get_tokenizer(arch))
    data = train_batch(0, seed=0, batch=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = train_step(model, opt, MaskedClipLoss(), data, tokens_of(data.captions))
    assert math.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "visual.conv1.weight" in changed and "text_projection" in changed
    assert float(model.logit_scale.detach()) <= LOGIT_SCALE_MAX
    # the training stream is seeded too
    assert train_batch(0, 0, 16).captions == data.captions
    assert train_batch(1, 0, 16).captions != data.captions


def test_fp16_weights_load_into_fp32_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_architecture("d4c-tiny-rn")  # has int64 BatchNorm counters too
    path = tmp_path / "w.safetensors"
    save_weights(model, path, "fp16", {"arch": "d4c-tiny-rn", "steps": "1"})
    again = tmp_path / "again.safetensors"
    save_weights(model, again, "fp16", {"arch": "d4c-tiny-rn", "steps": "1"})
    assert path.read_bytes() == again.read_bytes()  # same weights, same bytes (card sha256)
    loaded = load_clip(ModelSpec("d4c-tiny-rn", checkpoint=path)).model
    ref = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert t.dtype == ref[name].dtype, name
        expect = ref[name].half().float() if ref[name].is_floating_point() else ref[name]
        assert torch.equal(t, expect), name


def test_cli_needs_exactly_one_budget() -> None:
    cfg = parse_args(["--arch", "d4c-tiny-rn", "--steps", "5", "--out", "w.safetensors"])
    assert cfg.steps == 5 and cfg.minutes is None and cfg.batch == 256
    with pytest.raises(SystemExit):
        parse_args(["--arch", "d4c-tiny-rn", "--out", "w.safetensors"])
    with pytest.raises(SystemExit):
        parse_args(["--arch", "d4c-tiny-rn", "--steps", "5", "--minutes", "1", "--out", "w"])
