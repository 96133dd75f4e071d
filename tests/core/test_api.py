"""The one-screen library API: quantize / export / load_quantized / load_model, and the README's
Python snippet run exactly as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from d4c_core import Recipe, export, load_model, load_quantized, quantize
from d4c_core.artifacts import CALIBRATION_SHEET, MANIFEST_FILE, MODEL_FILE, REPORT_FILE, verify
from d4c_core.calibration import make_calibration
from d4c_core.calibration.synthesis import initial_images
from d4c_core.errors import ArtifactError, SpecError
from d4c_core.models import LoadedModel, ModelSpec
from d4c_core.quant.quantizers import RoundMode
from d4c_core.quant.wrap import act_quantizers, fp_mode, quant_layers
from d4c_core.recipe import CalibrationRecipe, QuantRecipe
from d4c_core.stages import QuantizedModel

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(
    r"<!-- python-snippet -->\s*```python\n(?P<code>.*?)```\s*<!-- /python-snippet -->", re.S
)
ARCH = "d4c-tiny-vit"
FAST = Recipe(
    seed=5,
    quant=QuantRecipe(
        recon_iters=2,
        recon_batch=8,
        mse_candidates=5,
        range_init_images=8,
        range_init_prompts=8,
    ),
    calibration=CalibrationRecipe(num_images=8, num_prompts=8),
)
ARTIFACT_FILES = {MODEL_FILE, REPORT_FILE, MANIFEST_FILE, CALIBRATION_SHEET}


def _inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    return images, tokenizer(["a red car", "an empty room", "two dogs"])


def _encode(model: torch.nn.Module, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.fixture(scope="module")
def quantized(tiny: dict[str, LoadedModel]) -> tuple[QuantizedModel, dict]:
    """FAST on the shared random-init tiny ViT, with what the test wants to know around it."""
    lm = tiny[ARCH]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rng = torch.get_rng_state()
    seen: list[tuple[str, float]] = []
    q = quantize(lm, FAST, on_progress=lambda s, f: seen.append((s, f)))
    return q, {"before": before, "rng": rng, "rng_after": torch.get_rng_state(), "seen": seen}


# --------------------------------------------------------------------------- the public surface


def test_one_line_import_in_a_fresh_interpreter() -> None:
    code = "from d4c_core import quantize, export, load_quantized, Recipe; print(Recipe.VERSION)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(Recipe.VERSION)


def test_every_public_name_resolves() -> None:
    import d4c_core

    for name in d4c_core.__all__:
        assert getattr(d4c_core, name) is not None, name
    with pytest.raises(AttributeError):
        d4c_core.quantize_  # noqa: B018 - the old name is gone


def _readme_snippet() -> str:
    m = SNIPPET.search(README.read_text())
    assert m, "README.md has no ```python block between <!-- python-snippet --> markers"
    return m["code"]


def test_readme_python_snippet_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's snippet, exactly: ≤ 5 lines, and it leaves a verified, runnable artifact
    whose model computes what the in-memory quantized model computes."""
    code = _readme_snippet()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 5, lines
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    out = next(tmp_path.glob("out/*"))
    manifest = verify(out)
    assert set(manifest["files"]) | {MANIFEST_FILE} == ARTIFACT_FILES
    assert manifest["model"]["arch"] == ARCH and manifest["model"]["pretrained"] == "builtin"
    qmodel = next(v for v in ns.values() if isinstance(v, QuantizedModel))
    assert Recipe.from_dict(manifest["recipe"]) == qmodel.recipe
    loaded = load_quantized(out)
    images, tokens = _inputs(loaded.tokenizer)
    got, want = _encode(loaded.model, images, tokens), _encode(qmodel.model, images, tokens)
    with fp_mode(qmodel.model):
        fp = _encode(qmodel.model, images, tokens)
    assert (fp[0] - want[0]).abs().max() > 1e-3  # quantization is really on
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-5


# --------------------------------------------------------------------------- quantize


def test_quantize_leaves_the_callers_model_and_rng_alone(quantized, tiny) -> None:
    q, seen = quantized
    lm = tiny[ARCH]
    assert not quant_layers(lm.model)
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())
    assert torch.equal(seen["rng"], seen["rng_after"])
    assert q.model is not lm.model and q.spec == lm.spec and q.fingerprint == lm.fingerprint


def test_quantize_returns_a_quantized_model_and_report(quantized) -> None:
    q, _ = quantized
    layers = quant_layers(q.model)
    assert layers and all(i.module.quant_weight for i in layers)
    assert all(i.module.weight_quant.mode == RoundMode.HARD for i in layers)
    assert all(aq.enabled for _, aq in act_quantizers(q.model))
    assert q.recipe == FAST
    assert q.calibration_images is not None and q.calibration_images.shape == (8, 3, 32, 32)
    r = q.report
    assert len(r["units"]) == len(layers) and r["resumed_units"] == 0
    assert set(r["timings"]) == {"calibration", "range_init", "reconstruction", "evaluation"}
    assert set(r["metrics"]) == {"embedding_cosine"}  # no task: no zero-shot
    assert r["model"]["fingerprint"] == q.fingerprint


def test_quantize_progress_covers_its_own_stages(quantized) -> None:
    seen = quantized[1]["seen"]
    fr = [f for _, f in seen]
    assert fr == sorted(fr) and fr[0] == 0.0 and fr[-1] == pytest.approx(1.0)
    stages = list(dict.fromkeys(s for s, _ in seen))
    assert stages == ["calibration", "range_init", "reconstruction", "evaluation"]


def test_given_images_run_the_same_stages_as_generated_ones(quantized, tiny) -> None:
    """The noise source's own images passed as a tensor: the same quantized model, and the
    recipe records them as real data."""
    q, _ = quantized
    images = initial_images(8, 32, FAST.seed)
    given = quantize(tiny[ARCH], FAST, calibration=images)
    assert given.recipe.calibration.method == "real"
    assert given.recipe.calibration.num_images == 8
    assert given.recipe.quant == FAST.quant
    assert torch.equal(given.calibration_images, images)
    a, b = q.model.state_dict(), given.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_image_folder_is_real_calibration(tiny, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    lm = tiny[ARCH]
    q = quantize(lm, FAST.replace(quant={"recon_iters": 0}), calibration=tmp_path)
    assert q.recipe.calibration.method == "real" and q.recipe.calibration.num_images == 8
    want = make_calibration(lm, q.recipe.calibration, seed=FAST.seed, image_dir=tmp_path)
    assert torch.equal(q.calibration_images, want)


def test_quantize_refuses(tiny, quantized) -> None:
    lm = tiny[ARCH]
    d4c = FAST.replace(calibration={"method": "d4c"})
    with pytest.raises(SpecError, match="synthesizes"):
        quantize(lm, d4c, calibration=torch.zeros(4, 3, 32, 32))
    with pytest.raises(SpecError, match=r"\(N, 3, 32, 32\)"):
        quantize(lm, FAST, calibration=torch.zeros(4, 3, 16, 16))
    with pytest.raises(SpecError):
        quantize(lm, FAST, calibration=torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="LoadedModel"):
        quantize(lm.model, FAST)  # type: ignore[arg-type]
    wrapped = LoadedModel(lm.spec, quantized[0].model, lm.preprocess, lm.tokenizer, "x")
    with pytest.raises(SpecError, match="already wrapped"):
        quantize(wrapped, FAST)


def test_load_model_defaults_and_refusals() -> None:
    lm = load_model(ARCH)
    assert lm.spec == ModelSpec(ARCH, pretrained="builtin")
    with pytest.raises(SpecError, match="pretrained=TAG or checkpoint"):
        load_model("ViT-B-32")  # never random weights by accident
    with pytest.raises(SpecError, match="inside the ModelSpec"):
        load_model(ModelSpec(ARCH), pretrained="builtin")


# --------------------------------------------------------------------------- export


def test_export_writes_a_verified_artifact_atomically(quantized, tmp_path: Path) -> None:
    q, _ = quantized
    out = tmp_path / "a" / "art"  # parent made on the way
    manifest = export(q, out)
    assert verify(out) == manifest
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert Recipe.from_dict(manifest["recipe"]) == q.recipe
    assert [p.name for p in out.parent.iterdir()] == ["art"]  # no temp dir left
    loaded = load_quantized(out)
    images, tokens = _inputs(loaded.tokenizer)
    got, want = _encode(loaded.model, images, tokens), _encode(q.model, images, tokens)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-5


def test_export_replaces_only_when_asked(quantized, tmp_path: Path) -> None:
    q, _ = quantized
    out = tmp_path / "art"
    out.mkdir()  # an empty dir is fine
    export(q, out)
    first = (out / MODEL_FILE).read_bytes()
    (out / "note.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="overwrite"):
        export(q, out)
    assert (out / "note.txt").read_text() == "mine"
    export(q, out, overwrite=True)
    assert not (out / "note.txt").exists()
    assert (out / MODEL_FILE).read_bytes() == first  # same model, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_export_without_calibration_images_has_no_sheet(quantized, tmp_path: Path) -> None:
    q, _ = quantized
    bare = QuantizedModel(q.model, q.spec, q.recipe, q.fingerprint, None, None, q.report)
    manifest = export(bare, tmp_path / "art")
    assert set(manifest["files"]) == {MODEL_FILE, REPORT_FILE}
