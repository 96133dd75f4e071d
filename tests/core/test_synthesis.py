"""Data-free calibration synthesis: D4C (PGSI, SCG, PAE), BNS, PSE and their shared loop.

Losses are checked against independent float64 computations (hand-computed cases, numpy
loops, ``scipy.stats.gaussian_kde``); the sources on the trained built-in tiny models with
small budgets (a few seconds each, one intra-op thread).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import gaussian_kde
from torch import nn

from d4c_core.calibration import SOURCES, check_method, make_calibration
from d4c_core.calibration.bns import BNSObjective, bn_stat_loss
from d4c_core.calibration.d4c import (
    D4CObjective,
    box_masks,
    crop_boxes,
    crop_grid,
    pgsi_logits,
    prompt_set,
    scg_logits,
)
from d4c_core.calibration.pae import perturb
from d4c_core.calibration.prompts import GENERIC_NAMES
from d4c_core.calibration.pse import DENSITY_EPS, PSEObjective, kde_entropy, patch_similarities
from d4c_core.calibration.synthesis import PixelOptimizer, frozen, synthesize
from d4c_core.calibration.tv import total_variation
from d4c_core.errors import CalibrationError, SpecError
from d4c_core.models import LoadedModel, ModelSpec, load_clip
from d4c_core.recipe import CalibrationRecipe, SynthRecipe
from d4c_core.testbed.tasks import generic_prompts


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors on a busy 2-core box: one intra-op thread is faster (no barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit() -> LoadedModel:
    return load_clip(ModelSpec("d4c-tiny-vit", pretrained="builtin"))


@pytest.fixture(scope="module")
def rn() -> LoadedModel:
    return load_clip(ModelSpec("d4c-tiny-rn", pretrained="builtin"))


def synth_recipe(method: str, n: int = 5, **synth: object) -> CalibrationRecipe:
    return CalibrationRecipe(method=method, num_images=n, synth=SynthRecipe(**synth))  # type: ignore[arg-type]


# ---------------------------------------------------------------- losses vs references


def test_total_variation_matches_direct_float64() -> None:
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = x.numpy()
    ref = 0.0
    for i in range(2):
        dw = sum((a[i, c, h, w + 1] - a[i, c, h, w]) ** 2 for c in range(3) for h in range(4)
                 for w in range(4))  # fmt: skip
        dh = sum((a[i, c, h + 1, w] - a[i, c, h, w]) ** 2 for c in range(3) for h in range(3)
                 for w in range(5))  # fmt: skip
        ref += dw / (3 * 4 * 4) + dh / (3 * 3 * 5)
    assert total_variation(x).item() == pytest.approx(ref / 2, rel=1e-12)


def test_pgsi_cross_entropy_hand_computed() -> None:
    # Two unit image features, three unit prompts in 2-D; τ = 0.1.
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    logits = pgsi_logits(a, u, 0.1)
    want = torch.tensor([[10.0, 0.0, -10.0], [6.0, 8.0, -6.0]], dtype=torch.float64)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)
    y = torch.tensor([0, 1])
    ce0 = -10 + math.log(math.exp(10) + 1 + math.exp(-10))
    ce1 = -8 + math.log(math.exp(6) + math.exp(8) + math.exp(-6))
    assert F.cross_entropy(logits, y).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-12)


def test_scg_logits_layout_has_own_background_among_negatives() -> None:
    fg = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    bg = torch.tensor([[0.8, 0.6], [0.6, -0.8]], dtype=torch.float64)
    u = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.6, 0.8]], dtype=torch.float64)
    logits = scg_logits(fg, bg, u, 0.5)
    k, b = 3, 2
    assert logits.shape == (b, k + b)
    # Row i: K prompt columns, then background j at column K + j (own one at K + i).
    want = [[2.0, 0.0, 1.2, 1.6, 1.2], [0.0, -2.0, 1.6, 1.2, -1.6]]
    torch.testing.assert_close(logits, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    y = torch.tensor([2, 0])
    rows = logits.tolist()
    ref = np.mean(
        [-r[t] + math.log(sum(math.exp(v) for v in r)) for r, t in zip(rows, [2, 0], strict=True)]
    )
    assert F.cross_entropy(logits, y).item() == pytest.approx(ref, rel=1e-12)


def test_kde_entropy_matches_scipy_gaussian_kde() -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(3, 60, generator=gen, dtype=torch.float64) * 0.3 + 0.5
    bw, points = 0.01, 10
    got = kde_entropy(s, bw, points).item()
    xs = np.linspace(s.min().item(), s.max().item(), points)
    ents = []
    for row in s.numpy():
        # scipy's kernel std is bw_method x the data's std (ddof=1): choose it to be 0.01.
        kde = gaussian_kde(row, bw_method=bw / row.std(ddof=1))
        p = kde(xs) + DENSITY_EPS
        ents.append(np.trapezoid(-p * np.log(p), xs))
    assert got == pytest.approx(float(np.mean(ents)), rel=1e-9)


def test_patch_similarities_are_cosines_of_attention_contexts() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.softmax(torch.randn(2, 5, 5, generator=gen, dtype=torch.float64), -1)
    v = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    got = patch_similarities(w, v).view(2, 4, 4)
    for b in range(2):
        ctx = (w[b] @ v[b]).numpy()[1:]
        for i in range(4):
            for j in range(4):
                cos = ctx[i] @ ctx[j] / np.linalg.norm(ctx[i]) / np.linalg.norm(ctx[j])
                assert got[b, i, j].item() == pytest.approx(cos, abs=1e-6)


def test_bn_stat_loss_matches_independent_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.copy_(torch.randn(4, generator=gen))  # type: ignore[union-attr]
    bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)  # type: ignore[union-attr]
    x = torch.randn(3, 4, 5, 6, generator=gen)
    a = x.double().numpy().transpose(1, 0, 2, 3).reshape(4, -1)
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()  # type: ignore[union-attr]
    ref = np.mean((a.mean(1) - rm) ** 2) + np.mean((a.var(1) - rv) ** 2)  # np.var: biased
    assert bn_stat_loss(x, bn).item() == pytest.approx(ref, rel=1e-5)


def test_bns_objective_sums_every_batchnorm(rn: LoadedModel) -> None:
    obj = BNSObjective(rn)
    bns = [m for m in rn.model.visual.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = obj(x, slice(0, 4), torch.Generator())
        inputs: list[torch.Tensor] = []
        hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in bns]
        rn.model.encode_image(x)
        for h in hooks:
            h.remove()
    assert len(obj.terms) == len(bns) == len(inputs) > 10
    ref = sum(bn_stat_loss(i, b).item() for i, b in zip(inputs, bns, strict=True))
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_pse_objective_reads_every_attention_block(vit: LoadedModel) -> None:
    obj = PSEObjective(vit, synth_recipe("pse"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = vit.model.encode_image(x)
        loss = obj(x, slice(0, 2), torch.Generator())
        after = vit.model.encode_image(x)  # hooks removed, outputs unchanged
    blocks = sum(isinstance(m, nn.MultiheadAttention) for m in vit.model.visual.modules())
    patches = (32 // 4) ** 2
    assert len(obj.sims) == blocks == 4
    assert all(s.shape == (2, patches * patches) for s in obj.sims)
    ref = -sum(kde_entropy(s, 0.01, 10) for s in obj.sims)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(before, after)


# ---------------------------------------------------------------- SCG geometry, PAE


def test_crop_grid_equals_interpolating_the_crop() -> None:
    gen = torch.Generator().manual_seed(6)
    size = 12
    boxes = crop_boxes(20, size, (0.4, 0.7), gen)
    side = boxes[:, 2]
    area = side.double() ** 2 / size**2
    assert ((area <= 0.7) & (area >= 0.3)).all()  # floor(sqrt(r·H·W))² of r ∈ [0.4, 0.7]
    assert ((boxes[:, 0] + side <= size) & (boxes[:, 1] + side <= size)).all()
    x = torch.randn(20, 3, size, size, generator=gen, dtype=torch.float64)
    got = F.grid_sample(x, crop_grid(boxes, size).double(), align_corners=False)
    for i, (t, left, s) in enumerate(boxes.tolist()):
        crop = x[i : i + 1, :, t : t + s, left : left + s]
        ref = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        # The grid is float32: coordinates exact to ~1e-7 of the image width.
        torch.testing.assert_close(got[i : i + 1], ref, rtol=0, atol=1e-5)
    keep = box_masks(boxes, size)
    assert (keep.sum((1, 2, 3)) == size * size - side**2).all()


def test_scg_gradient_routing(rn: LoadedModel) -> None:
    """Pixels inside the box learn through the foreground only, outside through the background."""
    recipe = synth_recipe("d4c", n=4, components=("pgsi", "scg"))
    obj = D4CObjective(rn, recipe, seed=0)
    inside = obj.keep == 0  # (N, 1, H, W)
    encode = rn.model.encode_image

    def grad(cut: str) -> torch.Tensor:
        def encode_cut(v: torch.Tensor) -> torch.Tensor:
            fg, bg = v.chunk(2)
            return encode(torch.cat([fg.detach(), bg] if cut == "fg" else [fg, bg.detach()]))

        obj.encode = encode_cut
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        with frozen(rn.model):
            obj(x, slice(0, 4), torch.Generator().manual_seed(2)).backward()
        assert x.grad is not None
        return x.grad.abs().sum(1, keepdim=True)

    g_fg = grad("bg")  # background path cut: only the foreground carries gradient
    assert (g_fg[~inside] == 0).all() and (g_fg[inside] > 0).float().mean() > 0.9
    g_bg = grad("fg")
    assert (g_bg[inside] == 0).all() and (g_bg[~inside] > 0).float().mean() > 0.9


def test_pae_is_differentiable_and_seeded() -> None:
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x.requires_grad_(True)

    def aug(v: torch.Tensor) -> torch.Tensor:
        return perturb(v, torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(aug, (x,), eps=1e-6, atol=1e-5)
    torch.testing.assert_close(aug(x), aug(x), rtol=0, atol=0)
    other = perturb(x, torch.Generator().manual_seed(1))
    assert not torch.allclose(aug(x), other)
    assert aug(x).shape == x.shape and torch.isfinite(aug(x)).all()


def test_pae_draws_follow_the_reference_distribution() -> None:
    """A constant 20 px image: jitter scales it by c·β ∈ [0.36, 1.96]; erasing zeroes a 4 px
    square (p = 0.3) that reaches the central 12x12 (where padding never does) in 15 x 15 of
    the 20 x 20 centre positions: P = 0.3 · 0.75² ≈ 0.169."""
    x = torch.ones(4000, 3, 20, 20)
    out = perturb(x, torch.Generator().manual_seed(0))
    hit = (out[:, :, 4:16, 4:16] == 0).flatten(1).any(1).float().mean().item()
    assert hit == pytest.approx(0.3 * 0.75**2, abs=0.025)  # ~4 standard errors
    centre = out[:, 0, 10, 10]
    gains = centre[centre != 0]
    assert gains.min() > 0.36 - 1e-6 and gains.max() < 1.96 + 1e-6
    assert gains.mean().item() == pytest.approx(1.0, abs=0.02)  # E[c]·E[β] = 1


# ---------------------------------------------------------------- the loop and the sources


@pytest.mark.parametrize(
    ("arch", "method"),
    [("d4c-tiny-rn", "bns"), ("d4c-tiny-vit", "pse"), ("d4c-tiny-rn", "d4c"),
     ("d4c-tiny-vit", "d4c")],
)  # fmt: skip
def test_sources_give_requested_shape(
    arch: str, method: str, rn: LoadedModel, vit: LoadedModel
) -> None:
    loaded = rn if arch == "d4c-tiny-rn" else vit
    recipe = synth_recipe(method, n=5, iters=1, batch=2)  # 3 mini-batches, the last of 1
    images = make_calibration(loaded, recipe, seed=3)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    noise = make_calibration(loaded, CalibrationRecipe(method="noise", num_images=5), seed=3)
    assert not torch.equal(images, noise)
    torch.testing.assert_close(make_calibration(loaded, recipe, seed=3), images)
    start = make_calibration(loaded, synth_recipe(method, n=5, iters=0), seed=3)
    torch.testing.assert_close(start, noise, rtol=0, atol=0)  # synthesis starts at noise


def test_shared_adam_quirk_and_per_batch_fix(rn: LoadedModel) -> None:
    moved = {}
    for per_batch in (False, True):
        recipe = synth_recipe("d4c", n=8, batch=4, per_batch_adam=per_batch)
        opt = PixelOptimizer(rn.model, recipe, 32, D4CObjective(rn, recipe, 0), seed=0)
        with frozen(rn.model):
            opt.step(0)
            first = opt.images()[:4].clone()
            opt.step(1)
        moved[per_batch] = (opt.images()[:4] - first).abs().max().item()
    assert moved[False] > 1e-3  # stale momentum drags the idle mini-batch along
    assert moved[True] == 0.0


def test_progress_is_throttled_and_can_cancel(rn: LoadedModel) -> None:
    recipe = synth_recipe("bns", n=2, iters=150, batch=1)  # 300 steps
    seen: list[float] = []
    flags = [p.requires_grad for p in rn.model.parameters()]
    with pytest.raises(KeyboardInterrupt):

        def on_step(frac: float) -> None:
            seen.append(frac)
            if frac >= 0.05:
                raise KeyboardInterrupt

        make_calibration(rn, recipe, seed=0, on_step=on_step)
    assert seen[0] == 0.0 and seen == sorted(seen) and len(seen) == 6
    assert [p.requires_grad for p in rn.model.parameters()] == flags
    seen.clear()
    make_calibration(rn, synth_recipe("bns", n=2, iters=3, batch=1), seed=0, on_step=seen.append)
    assert seen == [0.0, *(k / 6 for k in range(1, 7))]


def test_d4c_prompt_sets() -> None:
    names, templates = prompt_set("d4c-tiny-rn", CalibrationRecipe())
    assert names == generic_prompts() and templates == ("a photo of a {c}.",)
    names, templates = prompt_set("ViT-B-32", CalibrationRecipe())
    assert names == GENERIC_NAMES and templates == ("a photo of a {c}.",)
    own = CalibrationRecipe(classnames=("x", "y"), templates=("{c}!", "a {c}"))
    assert prompt_set("ViT-B-32", own) == (("x", "y"), ("{c}!", "a {c}"))


@pytest.mark.parametrize("components", [("pgsi",), ("pgsi", "scg", "pae")])
def test_d4c_images_agree_with_their_prompts(rn: LoadedModel, components: tuple[str, ...]) -> None:
    """A short run lifts zero-shot agreement with the targets from chance (1/31) to most images.

    With SCG the prompt is carried by the box's content, so the crop is what is classified.
    """
    iters = 20 if components == ("pgsi",) else 30
    recipe = synth_recipe("d4c", n=16, iters=iters, batch=16, lr=0.1, components=components)
    obj = D4CObjective(rn, recipe, seed=0)
    images = synthesize(rn.model, recipe, 32, obj, seed=0)
    if "scg" in components:
        images = F.grid_sample(images, obj.grid, align_corners=False)
    with torch.no_grad():
        feats = F.normalize(rn.model.encode_image(images), dim=-1)
    agree = ((feats @ obj.text.T).argmax(1) == obj.labels).float().mean().item()
    assert len(obj.text) == 31
    assert agree >= 0.6


# ---------------------------------------------------------------- unsupported combinations


@pytest.mark.parametrize(
    ("arch", "method", "ok"),
    [
        ("d4c-tiny-rn", "bns", True), ("d4c-tiny-rn", "pse", False),
        ("d4c-tiny-vit", "pse", True), ("d4c-tiny-vit", "bns", False),
        ("RN50", "bns", True), ("RN50", "pse", False),
        ("ViT-B-32", "pse", True), ("ViT-B-32", "bns", False),
        ("RN50", "d4c", True), ("ViT-B-32", "d4c", True), ("RN50", "noise", True),
    ],
)  # fmt: skip
def test_check_method(arch: str, method: str, ok: bool) -> None:
    if ok:
        check_method(arch, method)
    else:
        with pytest.raises(CalibrationError, match=f"'{method}' needs .*{arch}"):
            check_method(arch, method)


def test_check_method_unknown_names() -> None:
    with pytest.raises(SpecError, match="unknown architecture"):
        check_method("no-such-arch", "d4c")
    with pytest.raises(SpecError, match="unknown"):
        check_method("RN50", "bogus")


def test_sources_refuse_towers_without_their_layers(rn: LoadedModel, vit: LoadedModel) -> None:
    assert {"bns", "pse", "d4c"} <= set(SOURCES)
    with pytest.raises(CalibrationError, match=r"'bns' needs BatchNorm.*no BatchNorm2d"):
        make_calibration(vit, synth_recipe("bns", iters=1), seed=0)
    with pytest.raises(CalibrationError, match=r"'pse' needs attention.*no MultiheadAttention"):
        make_calibration(rn, synth_recipe("pse", iters=1), seed=0)
