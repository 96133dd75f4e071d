"""Zero-shot scoring, folder/list loading, embedding cosine and per-layer SQNR."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from d4c_core.errors import SpecError
from d4c_core.evaluate import (
    SQNR_CAP_DB,
    embedding_cosine,
    embedding_cosine_fp_mode,
    image_folder,
    layer_sqnr,
    read_lines,
    sqnr_db,
    zero_shot,
    zero_shot_classifier,
    zero_shot_folder,
)
from d4c_core.models import LoadedModel, ModelSpec, load_clip
from d4c_core.quant.wrap import (
    act_quantizers,
    fp_mode,
    quant_layers,
    set_quant_state,
    wrap_for_quantization,
)
from d4c_core.recipe import Recipe

C, T, D = 6, 3, 8
CLASSES = [f"class{i}" for i in range(C)]
TEMPLATES = ["a {c}.", "the {c}!", "photo: {c}"]


class FakeCLIP(nn.Module):
    """Hand-made towers: a prompt's text embedding is looked up, an image *is* its embedding."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def encode_text(self, tokens: Tensor) -> Tensor:
        assert not self.training
        return self.table[tokens]

    def encode_image(self, x: Tensor) -> Tensor:
        assert not self.training
        return x


def fake_setup() -> tuple[FakeCLIP, dict[str, int], np.ndarray]:
    """Text embedding of (class c, template t) = e_c + small noise in the last two dims."""
    rng = np.random.default_rng(0)
    emb = np.zeros((C, T, D))
    for c in range(C):
        for t in range(T):
            emb[c, t, c] = rng.uniform(
                0.5, 2.0
            )  # unequal norms: per-template normalization matters
            emb[c, t, C:] = 0.1 * rng.uniform(-1, 1, size=D - C)
    prompt_ids = {
        t.replace("{c}", name): c * T + j
        for c, name in enumerate(CLASSES)
        for j, t in enumerate(TEMPLATES)
    }
    model = FakeCLIP(torch.tensor(emb.reshape(C * T, D), dtype=torch.float32))
    return model, prompt_ids, emb


def fake_tokenizer(prompt_ids: dict[str, int]):
    return lambda texts: torch.tensor([prompt_ids[t] for t in texts])


def numpy_classifier(emb: np.ndarray) -> np.ndarray:
    """Independent float64 reference of CLIP_benchmark's class weights, (D, C)."""
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = unit.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).T


# ---------------------------------------------------------------- zero-shot


def test_classifier_matches_numpy() -> None:
    model, ids, emb = fake_setup()
    ref = numpy_classifier(emb)
    for batch in (256, 4, 1):  # batching over prompts must not change anything
        w = zero_shot_classifier(model, fake_tokenizer(ids), CLASSES, TEMPLATES, batch=batch)
        assert w.shape == (D, C)
        np.testing.assert_allclose(w.double().numpy(), ref, atol=1e-6)
    # Not the un-normalized mean: the unequal norms make that differ noticeably.
    naive = emb.mean(axis=1).T / np.linalg.norm(emb.mean(axis=1), axis=-1)
    assert np.abs(naive - ref).max() > 1e-3


def known_images() -> tuple[Tensor, Tensor]:
    """10 images whose true label sits at a known rank: 4 at rank 1, 1 at 2, 1 at 3, 1 at 5,
    3 at rank 6 -> top1 = 40 %, top5 = 70 %. Score gaps (1.0) dwarf the text noise (<1 %)."""
    ranks = [1, 1, 1, 1, 2, 3, 5, 6, 6, 6]
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for i, rank in enumerate(ranks):
        order = rng.permutation(C)  # order[0] scores highest
        label = int(order[rank - 1])
        x = np.zeros(D)
        x[order] = np.arange(C, 0, -1, dtype=float)
        xs.append(x * (i + 1))  # varied norms: images are normalized before scoring
        ys.append(label)
    return torch.tensor(np.array(xs), dtype=torch.float32), torch.tensor(ys)


def test_zero_shot_known_answer() -> None:
    model, ids, _ = fake_setup()
    model.train()
    x, y = known_images()
    tok = fake_tokenizer(ids)
    res = zero_shot(model, tok, CLASSES, TEMPLATES, (x, y))
    assert res == {"top1": 40.0, "top5": 70.0, "n": 10}
    assert model.training  # the caller's mode is restored
    # Same answer from an iterable of uneven batches and with a small internal batch.
    batches = [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:], y[4:])]
    assert zero_shot(model, tok, CLASSES, TEMPLATES, batches) == res
    assert zero_shot(model, tok, CLASSES, TEMPLATES, (x, y), batch=3) == res


def test_zero_shot_topk_capped_by_classes() -> None:
    model, ids, _ = fake_setup()
    x, y = known_images()
    keep = y < 3  # only images of classes 0..2, scored against those 3 classes
    res = zero_shot(model, fake_tokenizer(ids), CLASSES[:3], TEMPLATES, (x[keep], y[keep]))
    assert res["top5"] == 100.0 and res["n"] == int(keep.sum())
    # top1 over 3 classes: recompute by hand from the image scores (argmax over dims 0..2).
    expect = 100.0 * float((x[keep][:, :3].argmax(dim=1) == y[keep]).double().mean())
    assert res["top1"] == pytest.approx(expect, abs=1e-9)


def test_zero_shot_errors() -> None:
    model, ids, _ = fake_setup()
    tok = fake_tokenizer(ids)
    with pytest.raises(SpecError, match="class name"):
        zero_shot_classifier(model, tok, [], TEMPLATES)
    with pytest.raises(SpecError, match="template"):
        zero_shot_classifier(model, tok, CLASSES, [])
    with pytest.raises(SpecError, match="no images"):
        zero_shot(model, tok, CLASSES, TEMPLATES, [])
    with pytest.raises(SpecError, match="labels"):
        zero_shot(model, tok, CLASSES, TEMPLATES, (torch.zeros(3, D), torch.zeros(2)))


# ---------------------------------------------------------------- folders and files


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_clip(ModelSpec("d4c-tiny-vit"))


def save(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 36), color).save(path)


def test_read_lines(tmp_path: Path) -> None:
    f = tmp_path / "names.txt"
    f.write_text("  cat \n\n dog\n   \nsea lion\n")
    assert read_lines(f) == ["cat", "dog", "sea lion"]
    with pytest.raises(SpecError, match="does not exist"):
        read_lines(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n   \n")
    with pytest.raises(SpecError, match="empty"):
        read_lines(tmp_path / "blank.txt")


def test_image_folder(loaded: LoadedModel, tmp_path: Path) -> None:
    names = ["cat", "dog", "sea lion"]
    save(tmp_path / "dog" / "1.png", (0, 0, 255))
    save(tmp_path / "dog" / "2.jpg", (0, 0, 250))
    save(tmp_path / "cat" / "nested" / "1.png", (255, 0, 0))
    (tmp_path / "cat" / "readme.txt").write_text("ignored")
    x, y = image_folder(tmp_path, names, loaded.preprocess)
    assert x.shape == (3, 3, 32, 32)
    assert y.tolist() == [0, 1, 1]  # folders sorted; "sea lion" has no folder: allowed


def test_image_folder_errors(loaded: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        image_folder(tmp_path / "nope", ["cat"], loaded.preprocess)
    save(tmp_path / "cat" / "1.png", (1, 2, 3))
    save(tmp_path / "Cat" / "1.png", (1, 2, 3))
    with pytest.raises(SpecError, match="not class names: Cat"):
        image_folder(tmp_path, ["cat"], loaded.preprocess)
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(SpecError, match="no images"):
        image_folder(empty, ["cat"], loaded.preprocess)
    bad = tmp_path / "bad"
    (bad / "cat").mkdir(parents=True)
    (bad / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(SpecError, match=r"cat/broken\.jpg"):
        image_folder(bad, ["cat"], loaded.preprocess)


def test_zero_shot_folder_on_tiny_model(loaded: LoadedModel, tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("red thing\nblue thing\n")
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\n")
    save(tmp_path / "imgs" / "red thing" / "a.png", (250, 10, 10))
    save(tmp_path / "imgs" / "blue thing" / "a.png", (10, 10, 250))
    save(tmp_path / "imgs" / "blue thing" / "b.png", (30, 30, 200))
    res = zero_shot_folder(
        loaded.model,
        loaded.tokenizer,
        loaded.preprocess,
        tmp_path / "classes.txt",
        tmp_path / "templates.txt",
        tmp_path / "imgs",
    )
    # Reference: logits computed by hand from the model's own embeddings in float64.
    x, y = image_folder(tmp_path / "imgs", ["red thing", "blue thing"], loaded.preprocess)
    with torch.no_grad():
        img = loaded.model.encode_image(x).double()
        txt = loaded.model.encode_text(
            loaded.tokenizer(["a photo of a red thing.", "a photo of a blue thing."])
        ).double()
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    pred = (img @ txt.T).argmax(dim=1)
    assert res["n"] == 3 and res["top5"] == 100.0
    assert res["top1"] == pytest.approx(100.0 * float((pred == y).double().mean()), abs=1e-9)

    (tmp_path / "bad_templates.txt").write_text("a photo\n")
    with pytest.raises(SpecError, match="placeholder"):
        zero_shot_folder(
            loaded.model,
            loaded.tokenizer,
            loaded.preprocess,
            tmp_path / "classes.txt",
            tmp_path / "bad_templates.txt",
            tmp_path / "does-not-matter",
        )


# ---------------------------------------------------------------- quantized model metrics


@pytest.fixture(scope="module")
def quantized(loaded: LoadedModel) -> nn.Module:
    """W4A8 tiny ViT with ranges initialized (small search grids: this is about plumbing)."""
    q = wrap_for_quantization(copy.deepcopy(loaded.model), Recipe.preset("w4a8").quant)
    search = {"candidates": 10, "zero_points": 4, "max_samples": 512}
    for _, aq in act_quantizers(q):
        aq.observing, aq.search = True, dict(search)
    with torch.no_grad():
        q.encode_image(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        q.encode_text(loaded.tokenizer(["a photo of a cat", "a blurry photo of a dog"]))
    for _, aq in act_quantizers(q):
        aq.observing = False
    for info in quant_layers(q):
        info.module.weight_quant.init_range(info.module.weight, **search)
    set_quant_state(q, weights=True, acts=True)
    return q


@pytest.fixture(scope="module")
def probe(loaded: LoadedModel) -> tuple[Tensor, Tensor]:
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = loaded.tokenizer(["a photo of a dog.", "a car", "a low contrast photo of a tree."])
    return images, tokens


def numpy_cos(a: Tensor, b: Tensor) -> np.ndarray:
    a64, b64 = a.double().numpy(), b.double().numpy()
    return (a64 * b64).sum(-1) / np.linalg.norm(a64, axis=-1) / np.linalg.norm(b64, axis=-1)


def test_embedding_cosine(
    loaded: LoadedModel, quantized: nn.Module, probe: tuple[Tensor, Tensor]
) -> None:
    images, tokens = probe
    res = embedding_cosine_fp_mode(quantized, images, tokens)
    with torch.no_grad():
        with fp_mode(quantized):
            fi, ft = quantized.encode_image(images), quantized.encode_text(tokens)
        qi, qt = quantized.encode_image(images), quantized.encode_text(tokens)
    ci, ct = numpy_cos(fi, qi), numpy_cos(ft, qt)
    for key, ref in (
        ("image", ci.mean()),
        ("text", ct.mean()),
        ("image_min", ci.min()),
        ("text_min", ct.min()),
    ):
        assert res[key] == pytest.approx(float(ref), abs=1e-6), key
    assert res["image"] < 1 - 1e-6 and res["text"] < 1 - 1e-6  # quantization does change things
    assert res["image"] > 0.9 and res["text"] > 0.9  # ...but W4A8 keeps the embeddings close
    # The wrapped model in fp_mode computes what the open_clip model does (to ~1e-5).
    two_models = embedding_cosine(loaded.model, quantized, images, tokens, batch=2)
    for key in res:
        assert two_models[key] == pytest.approx(res[key], abs=1e-4), key
    same = embedding_cosine(loaded.model, loaded.model, images, tokens)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in same.values())


def test_sqnr_db_cap() -> None:
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == SQNR_CAP_DB == 200.0
    assert sqnr_db(0.0, 1.0) == -SQNR_CAP_DB
    assert sqnr_db(1.0, 1e-300) == SQNR_CAP_DB


def test_layer_sqnr_matches_numpy(quantized: nn.Module, probe: tuple[Tensor, Tensor]) -> None:
    images, tokens = probe
    layers = quant_layers(quantized)
    # Reference: our own hooks, one FP and one quantized pass, SQNR in numpy float64.
    outs: dict[str, list[np.ndarray]] = {"fp": [], "q": []}
    current: list[str] = []
    handles = [
        info.module.register_forward_hook(
            lambda _m, _i, o, n=n: outs[current[0]].append((n, o.detach().double().numpy()))
        )
        for n, info in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            current[:] = ["fp"]
            with fp_mode(quantized):
                quantized.encode_image(images)
                quantized.encode_text(tokens)
            current[:] = ["q"]
            quantized.encode_image(images)
            quantized.encode_text(tokens)
    finally:
        for h in handles:
            h.remove()
    fp, q = dict(outs["fp"]), dict(outs["q"])
    assert len(fp) == len(q) == len(layers) == len(outs["fp"])  # each layer ran exactly once
    ref = [
        10 * np.log10((fp[n] ** 2).sum() / ((fp[n] - q[n]) ** 2).sum()) for n in range(len(layers))
    ]

    got = layer_sqnr(quantized, images, tokens)
    assert [g["name"] for g in got] == [i.name for i in layers]
    assert [g["tower"] for g in got] == [i.tower for i in layers]
    assert {g["tower"] for g in got} == {"image", "text"}
    np.testing.assert_allclose([g["sqnr_db"] for g in got], ref, atol=1e-3)
    assert all(0 < g["sqnr_db"] < 80 for g in got)  # real quantization error, not the cap

    # Chunking the inputs must not change the sums (static ranges, float64 accumulation).
    chunked = layer_sqnr(quantized, images, tokens, batch=2)
    np.testing.assert_allclose([g["sqnr_db"] for g in chunked], ref, atol=1e-3)


def test_layer_sqnr_without_error_hits_cap(
    quantized: nn.Module, probe: tuple[Tensor, Tensor]
) -> None:
    images, tokens = probe
    with fp_mode(quantized):  # "quantized" pass is FP too: zero error everywhere
        got = layer_sqnr(quantized, images, tokens)
    assert all(g["sqnr_db"] == SQNR_CAP_DB for g in got)
    # fp_mode restored the quant state afterwards: error is back.
    assert layer_sqnr(quantized, images[:1], tokens[:1])[0]["sqnr_db"] < SQNR_CAP_DB
