"""Pipeline: stage checkpoints, resume after an interruption, progress/cancel, accuracy floor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from d4c_core import export, quantize
from d4c_core.errors import Cancelled, NonFiniteError
from d4c_core.models import ModelSpec
from d4c_core.pipeline import JobSpec, run
from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe


def _recipe(bits: tuple[int, int] = (4, 8), seed: int = 0, iters: int = 8) -> Recipe:
    return Recipe(
        seed=seed,
        quant=QuantRecipe(
            weight_bits=bits[0],
            act_bits=bits[1],
            recon_iters=iters,
            recon_batch=8,
            mse_candidates=20,
            range_init_images=16,
            range_init_prompts=16,
        ),
        calibration=CalibrationRecipe(num_images=16, num_prompts=32),
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _CancelAfter:
    """should_cancel that says yes once ``n`` reconstruction units have finished."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.stage = n, 0, ""

    def progress(self, stage: str, _frac: float) -> None:
        if stage == "reconstruction":
            self.seen += 1

    def __call__(self) -> bool:
        return self.seen >= self.n


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("straight")
    frac: list[tuple[str, float]] = []
    report = run(
        JobSpec(ModelSpec("d4c-tiny-rn"), _recipe()),
        root / "work",
        root / "out",
        on_progress=lambda s, f: frac.append((s, f)),
    )
    return root / "out", {"report": report, "progress": frac}


def test_progress_monotonic_and_complete(uninterrupted: tuple[Path, dict]) -> None:
    fr = [f for _, f in uninterrupted[1]["progress"]]
    assert fr == sorted(fr) and fr[0] == 0.0 and fr[-1] == pytest.approx(1.0)
    stages = list(dict.fromkeys(s for s, _ in uninterrupted[1]["progress"]))
    assert stages == ["load", "calibration", "range_init", "reconstruction", "evaluation", "export"]


def test_report_and_artifact_contents(uninterrupted: tuple[Path, dict]) -> None:
    out, _ = uninterrupted
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings"]) >= {"calibration", "range_init", "reconstruction", "evaluation"}
    n_units = len(report["units"])
    assert n_units == 8 + 4 + 3 * 6  # tiny-rn: 8 blocks, 4 attnpool projections, 3 text blocks
    assert report["resumed_units"] == 0
    assert {u["name"] for u in report["units"]} >= {"visual.layer1.0", "visual.attnpool.q_proj"}
    assert len(report["layers"]) == 8 * 3 + 4 + 3 * 6
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.png",
        "manifest.json",
        "model.safetensors",
        "report.json",
    ]
    assert not list(out.parent.glob(".out.tmp*"))


def test_in_memory_quantize_and_export_give_the_pipelines_artifact(
    tmp_path: Path, uninterrupted: tuple[Path, dict]
) -> None:
    """``pipeline.run`` is ``quantize`` + ``export`` with checkpoints: same recipe and seed,
    the same bytes, calibration sheet and measurements."""
    qmodel = quantize(ModelSpec("d4c-tiny-rn"), _recipe())
    export(qmodel, tmp_path / "mem")
    straight = uninterrupted[0]
    for name in ("model.safetensors", "calibration.png"):
        assert _sha(tmp_path / "mem" / name) == _sha(straight / name), name
    mem, disk = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "mem", straight))
    for key in ("model", "recipe", "layers", "embedding_cosine", "metrics", "calibration_digest"):
        assert mem[key] == disk[key], key

    def same(u: dict) -> dict:  # timings and the resume flag may differ
        return {k: v for k, v in u.items() if k not in ("seconds", "resumed")}

    assert [same(u) for u in mem["units"]] == [same(u) for u in disk["units"]]


def test_resume_after_interruption_gives_same_artifact(
    tmp_path: Path, uninterrupted: tuple[Path, dict]
) -> None:
    job = JobSpec(ModelSpec("d4c-tiny-rn"), _recipe())
    stop = _CancelAfter(5)
    with pytest.raises(Cancelled):
        run(job, tmp_path / "work", tmp_path / "out", on_progress=stop.progress, should_cancel=stop)
    assert not (tmp_path / "out").exists()  # nothing half-written
    saved = sorted((tmp_path / "work" / "units").glob("*.safetensors"))
    assert len(saved) == 5
    report = run(job, tmp_path / "work", tmp_path / "out")
    assert report["resumed_units"] == 5
    assert [u.get("resumed", False) for u in report["units"]][:6] == [True] * 5 + [False]
    straight = uninterrupted[0]
    assert _sha(tmp_path / "out" / "model.safetensors") == _sha(straight / "model.safetensors")
    assert _sha(tmp_path / "out" / "calibration.png") == _sha(straight / "calibration.png")


def test_changed_recipe_does_not_reuse_stale_units(tmp_path: Path) -> None:
    job = JobSpec(ModelSpec("d4c-tiny-vit"), _recipe(iters=2))
    stop = _CancelAfter(3)
    with pytest.raises(Cancelled):
        run(job, tmp_path / "work", tmp_path / "out", on_progress=stop.progress, should_cancel=stop)
    changed = JobSpec(ModelSpec("d4c-tiny-vit"), _recipe(iters=2, seed=1))
    report = run(changed, tmp_path / "work", tmp_path / "out")
    assert report["resumed_units"] == 0


def test_corrupt_unit_checkpoint_is_recomputed(tmp_path: Path) -> None:
    job = JobSpec(ModelSpec("d4c-tiny-vit"), _recipe(iters=2))
    stop = _CancelAfter(2)
    with pytest.raises(Cancelled):
        run(job, tmp_path / "work", tmp_path / "out", on_progress=stop.progress, should_cancel=stop)
    (tmp_path / "work" / "units" / "0001.safetensors").write_bytes(b"\x00garbage")
    report = run(job, tmp_path / "work", tmp_path / "out")
    assert report["resumed_units"] == 1  # unit 0 reused; unit 1 recomputed and so is the rest


def test_w8a8_keeps_embeddings_close(tmp_path: Path) -> None:
    report = run(
        JobSpec(ModelSpec("d4c-tiny-vit"), _recipe(bits=(8, 8))), tmp_path / "w", tmp_path / "o"
    )
    cos = report["metrics"]["embedding_cosine"]
    assert cos["image"] >= 0.99 and cos["text"] >= 0.99, cos
    # and the artifact reproduces them on fresh inputs
    from d4c_core.artifacts import load_quantized
    from d4c_core.evaluate import embedding_cosine

    loaded = load_quantized(tmp_path / "o")
    from d4c_core.models import load_clip

    fp = load_clip(ModelSpec("d4c-tiny-vit")).model
    g = torch.Generator().manual_seed(7)
    images = torch.randn(16, 3, 32, 32, generator=g)
    tokens = loaded.tokenizer([f"a photo of a {c}." for c in ("cat", "house", "river", "bus")])
    fresh = embedding_cosine(fp, loaded.model, images, tokens)
    assert fresh["image"] >= 0.99 and fresh["text"] >= 0.99, fresh


# ----------------------------------------------------------------------------- non-finite
# Issue 13: finite weights can still overflow float32; the job must stop with NonFiniteError
# (a client problem) where it shows, not succeed with NaN metrics or crash deep in torch.


def _overflowing_checkpoint(path: Path) -> Path:
    """The built-in tiny ViT with its patch embedding at 1e38: every weight is finite (the
    upload check passes) but the first conv's sums overflow to Inf, LayerNorm makes NaN."""
    from safetensors.torch import save_file

    from d4c_core.models import WEIGHTS_DIR, read_checkpoint

    builtin = read_checkpoint(WEIGHTS_DIR / "d4c-tiny-vit.safetensors")
    state = {k: v.float() for k, v in builtin.items()}
    state["visual.conv1.weight"] = torch.full_like(state["visual.conv1.weight"], 1e38)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    ("method", "where"),
    [("noise", "during range initialization"), ("pse", "calibration synthesis")],
)
def test_a_model_that_overflows_fails_as_non_finite(
    tmp_path: Path, method: str, where: str
) -> None:
    ckpt = _overflowing_checkpoint(tmp_path / "over.safetensors")
    cal = {"method": method, "num_images": 16, "num_prompts": 32}
    if method != "noise":
        cal["synth"] = {"iters": 2}
    recipe = Recipe(quant=_recipe().quant, calibration=CalibrationRecipe.from_dict(cal))
    spec = JobSpec(ModelSpec("d4c-tiny-vit", checkpoint=ckpt), recipe)
    with pytest.raises(NonFiniteError, match=where):
        run(spec, tmp_path / "work", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_final_embeddings_are_refused(tmp_path: Path) -> None:
    from d4c_core.evaluate import embedding_cosine
    from d4c_core.models import BUILTIN_TAG, load_clip

    good = load_clip(ModelSpec("d4c-tiny-vit", pretrained=BUILTIN_TAG)).model
    ckpt = _overflowing_checkpoint(tmp_path / "over.safetensors")
    bad = load_clip(ModelSpec("d4c-tiny-vit", checkpoint=ckpt)).model
    images = torch.randn(4, 3, 32, 32)
    tokens = torch.zeros(4, 32, dtype=torch.long)
    with pytest.raises(NonFiniteError, match="quantized model's embeddings"):
        embedding_cosine(good, bad, images, tokens)


def test_a_non_finite_reconstruction_loss_stops_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconstruction itself going NaN (e.g. a learned step collapsing) is caught per unit."""
    import d4c_core.quant.reconstruct as rec

    calls = {"n": 0}
    real = rec.unit_mse

    def nan_after_optimizing(*args: object, **kwargs: object) -> float:
        calls["n"] += 1
        return float("nan") if calls["n"] >= 2 else real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rec, "unit_mse", nan_after_optimizing)
    quant = QuantRecipe(
        recon_iters=2, recon_batch=4, mse_candidates=5, range_init_images=4, range_init_prompts=4
    )
    recipe = Recipe(quant=quant, calibration=CalibrationRecipe(num_images=8, num_prompts=8))
    with pytest.raises(NonFiniteError, match="reconstruction unit"):
        run(JobSpec(ModelSpec("d4c-tiny-vit"), recipe), tmp_path / "w", tmp_path / "o")
