"""The quantization job's stages, written once: calibration → range init → reconstruction →
evaluation.

``d4c_core.quantize`` runs them in memory; ``pipeline.run`` runs the same functions with a
``Checkpoints`` work dir, so a killed job resumes at the last finished stage or unit. Each
stage reads and writes its result through ``store`` under a key of everything it depends
on; with ``Checkpoints(None)`` nothing is stored and every stage computes. Between units the
caller's ``should_cancel`` is asked and ``on_progress(stage, fraction)`` told.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d4c_core.calibration import make_calibration, make_text_calibration
from d4c_core.calibration.sources import list_images, model_device
from d4c_core.checkpoints import Checkpoints, stage_key, tensor_digest
from d4c_core.errors import Cancelled
from d4c_core.evaluate import embedding_cosine_fp_mode, layer_sqnr, zero_shot
from d4c_core.finite import require_finite
from d4c_core.models import LoadedModel, ModelSpec
from d4c_core.quant.capture import BoundaryCapture
from d4c_core.quant.range_init import init_ranges, init_ranges_from_state, range_state
from d4c_core.quant.reconstruct import (
    Unit,
    UnitResult,
    learn_unit,
    load_unit_state,
    unit_mse,
    unit_seed,
    unit_state,
)
from d4c_core.quant.reconstruct import units as model_units
from d4c_core.quant.wrap import fp_mode, wrap_for_quantization
from d4c_core.recipe import Recipe
from d4c_core.vocabulary import STAGE_SHARES

log = logging.getLogger("d4c.pipeline")

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]


@dataclass
class Progress:
    """One progress number over the stages in ``shares`` (summing to 1), a cancel check
    before each report, and the stage timings the report carries."""

    on_progress: ProgressFn | None
    should_cancel: CancelFn | None
    shares: dict[str, float] = field(default_factory=lambda: dict(STAGE_SHARES))
    timings: dict[str, float] = field(default_factory=dict)

    def at(self, stage: str, within: float) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled during {stage}")
        if self.on_progress is not None:
            done = 0.0
            for name, share in self.shares.items():
                if name == stage:
                    break
                done += share
            self.on_progress(stage, min(1.0, done + self.shares[stage] * within))

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[stage] = time.perf_counter() - t0


@dataclass(frozen=True)
class EvalTask:
    """A zero-shot task: class names, templates and labelled, preprocessed images."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class Calibration:
    """The calibration batch on the model's device, and the digest later keys chain."""

    images: Tensor
    tokens: Tensor
    digest: str


@dataclass
class QuantizedModel:
    """A quantized CLIP in memory, and what ``export`` writes next to it.

    ``model`` is the fake-quant model (quantization on, eval mode): ``encode_image`` and
    ``encode_text`` run it. ``calibration_images`` make the artifact's contact sheet.
    """

    model: nn.Module
    spec: ModelSpec
    recipe: Recipe
    fingerprint: str
    tokenizer: Any
    preprocess: Any
    report: dict[str, Any]
    calibration_images: Tensor | None = None
    calibration_tokens: Tensor | None = None
    eval_task: EvalTask | None = None


def _calibration_key(loaded: LoadedModel, recipe: Recipe, image_dir: Path | None) -> str:
    cal = recipe.calibration
    listing = None
    if cal.method == "real" and image_dir is not None:
        listing = [
            (str(p.relative_to(image_dir)), p.stat().st_size) for p in list_images(image_dir)
        ]
    cal_dict = cal.to_dict()
    if cal.method in ("noise", "real"):  # synthesis settings do not change these images
        cal_dict.pop("synth")
    return stage_key("calibration", loaded.fingerprint, cal_dict, recipe.seed, listing)


def calibrate(
    loaded: LoadedModel,
    recipe: Recipe,
    store: Checkpoints,
    prog: Progress,
    *,
    image_dir: Path | None = None,
    images: Tensor | None = None,
) -> Calibration:
    """Calibration images (``images`` if given, else the recipe's source) and prompt tokens.

    The caller's own images are neither synthesized nor stored (the key could not tell two
    such batches apart); generated ones are stored, since synthesis can take hours.
    """
    cal, device = recipe.calibration, model_device(loaded.model)
    if images is not None:
        prog.at("calibration", 0.0)
        state = {"images": images, "tokens": make_text_calibration(loaded, cal, seed=recipe.seed)}
    else:
        key = _calibration_key(loaded, recipe, image_dir)
        state = store.load("calibration", key)
        if state is None:
            prog.at("calibration", 0.0)
            images = make_calibration(
                loaded,
                cal,
                seed=recipe.seed,
                image_dir=image_dir,
                # Synthesis reports (and checks for cancel) at most once per 1% of its steps.
                on_step=lambda frac: prog.at("calibration", frac),
            )
            tokens = make_text_calibration(loaded, cal, seed=recipe.seed)
            state = {"images": images, "tokens": tokens}
            store.save("calibration", state, key)
    images, tokens = state["images"].to(device), state["tokens"].to(device)
    return Calibration(images, tokens, tensor_digest(images, tokens))


def wrap_and_init_ranges(
    model: nn.Module,
    calib: Calibration,
    recipe: Recipe,
    fingerprint: str,
    store: Checkpoints,
    prog: Progress,
) -> str:
    """Wrap ``model`` in place and set every quantizer's range; return the key units chain."""
    prog.at("range_init", 0.0)
    wrap_for_quantization(model, recipe.quant)
    base = stage_key("quant", fingerprint, calib.digest, recipe.to_dict())
    state = store.load("range_init", base)
    if state is None:
        init_ranges(model, calib.images, calib.tokens, recipe.quant)
        store.save("range_init", range_state(model), base)
    else:
        init_ranges_from_state(model, state)
    return base


@dataclass
class _Pending:
    """A reconstructed unit waiting for its MSE after (then saved)."""

    unit: Unit
    name: str
    key: str
    state: dict[str, Tensor]
    inputs: Tensor
    targets: Tensor
    before: float
    seconds: float

    def finish(self, after: float | None, store: Checkpoints, results: list[dict]) -> None:
        """Save the unit and its result; ``after`` None: measure it on the cached data."""
        if after is None:
            after = unit_mse(self.unit.module, self.inputs, self.targets)
        require_finite(f"in reconstruction unit {self.unit.name}", after)
        u = self.unit
        res = UnitResult(u.index, u.name, u.tower, self.before, after, self.seconds)
        store.save_json(self.name, asdict(res))
        store.save(self.name, self.state, self.key)
        results.append(asdict(res))
        log.info("unit done", extra={"unit": u.name, "mse_init": self.before, "mse_final": after})


def reconstruct_units(
    model: nn.Module,
    calib: Calibration,
    recipe: Recipe,
    base: str,
    store: Checkpoints,
    prog: Progress,
) -> tuple[list[dict[str, Any]], int]:
    """Reconstruct units in order; a unit whose checkpoint matches is loaded, not redone.

    A unit's key chains the key and the learned state of the unit before it, so a unit is
    reused only if every earlier unit holds exactly what it held when this one was computed
    (a recomputed earlier unit that came out differently, e.g. on a non-deterministic GPU,
    invalidates everything after it). Returns the per-unit results and how many were reused.
    """
    todo = model_units(model)
    results: list[dict[str, Any]] = []
    resumed = 0
    key, before = base, ""
    spill = None if store.root is None else store.root / "capture"
    data = BoundaryCapture(
        model,
        [u.module for u in todo],
        calib.images,
        calib.tokens,
        max(recipe.quant.recon_batch, 64),
        spill_dir=spill,
    )
    # A reconstructed unit is saved once its MSE after is known: the next unit's capture
    # replays it over the calibration set anyway (``pending`` until then; a cancel saves
    # it at once, a kill loses it and a resume recomputes it).
    pending: _Pending | None = None

    try:
        for unit in todo:
            prog.at("reconstruction", unit.index / max(1, len(todo)))
            key = stage_key("unit", key, before, unit.index, unit.name)
            name = f"units/{unit.index:04d}"
            state = store.load(name, key)
            if state is not None:
                if pending is not None:
                    pending.finish(None, store, results)
                    pending = None
                load_unit_state(unit, state)
                results.append(store.load_json(name) | {"resumed": True})
                resumed += 1
            else:
                t0 = time.perf_counter()
                done = None if pending is None else (pending.unit.module, pending.targets)
                inputs, targets, after = data.data(unit.module, unit.tower, done)
                if pending is not None:
                    pending.finish(after, store, results)
                mse0 = learn_unit(
                    unit, inputs, targets, recipe.quant, unit_seed(recipe.seed, unit.index)
                )
                state = unit_state(unit)
                pending = _Pending(
                    unit, name, key, state, inputs, targets, mse0, time.perf_counter() - t0
                )
            before = tensor_digest(*(state[k] for k in sorted(state)))
        if pending is not None:
            pending.finish(None, store, results)
            pending = None
    except Cancelled:
        if pending is not None:  # a cancelled job keeps every unit it finished
            pending.finish(None, store, results)
        raise
    finally:
        data.close()
    prog.at("reconstruction", 1.0)
    return results, resumed


def evaluate_quantized(
    loaded: LoadedModel, calib: Calibration, recipe: Recipe, task: EvalTask | None
) -> dict[str, Any]:
    """Per-layer SQNR and embedding cosine on the calibration batch; zero-shot if a task is set.

    ``loaded.model`` is the wrapped model: ``fp_mode`` gives the FP reference without a copy.
    """
    model = loaded.model
    n_img, n_txt = recipe.quant.range_init_images, recipe.quant.range_init_prompts
    images, tokens = calib.images[:n_img], calib.tokens[:n_txt]
    report: dict[str, Any] = {
        "model": loaded.spec.to_dict() | {"fingerprint": loaded.fingerprint},
        "recipe": recipe.to_dict(),
        "layers": layer_sqnr(model, images, tokens),
        "embedding_cosine": embedding_cosine_fp_mode(model, images, tokens),
    }
    metrics: dict[str, Any] = {"embedding_cosine": report["embedding_cosine"]}
    if task is not None:
        device = model_device(model)
        data = (task.images.to(device), task.labels.to(device))
        with fp_mode(model):
            fp = zero_shot(model, loaded.tokenizer, task.classnames, task.templates, data)
        q = zero_shot(model, loaded.tokenizer, task.classnames, task.templates, data)
        metrics["zero_shot"] = {
            "task": task.name,
            "fp": fp,
            "quantized": q,
            "delta_top1": q["top1"] - fp["top1"],
            "delta_top5": q["top5"] - fp["top5"],
        }
    report["metrics"] = metrics
    return report


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Global torch RNGs seeded from the recipe inside, the caller's state restored after."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def run_stages(
    loaded: LoadedModel,
    recipe: Recipe,
    store: Checkpoints,
    prog: Progress,
    *,
    image_dir: Path | None = None,
    images: Tensor | None = None,
    task: EvalTask | None = None,
) -> QuantizedModel:
    """Calibrate, wrap ``loaded.model`` in place, init ranges, reconstruct, evaluate."""
    with seeded(recipe.seed, model_device(loaded.model)):
        with prog.timed("calibration"):
            calib = calibrate(loaded, recipe, store, prog, image_dir=image_dir, images=images)
        with prog.timed("range_init"):
            base = wrap_and_init_ranges(
                loaded.model, calib, recipe, loaded.fingerprint, store, prog
            )
        with prog.timed("reconstruction"):
            results, resumed = reconstruct_units(loaded.model, calib, recipe, base, store, prog)
        with prog.timed("evaluation"):
            prog.at("evaluation", 0.0)
            report = evaluate_quantized(loaded, calib, recipe, task)
    report |= {"units": results, "resumed_units": resumed, "calibration_digest": calib.digest}
    return QuantizedModel(
        model=loaded.model,
        spec=loaded.spec,
        recipe=recipe,
        fingerprint=loaded.fingerprint,
        tokenizer=loaded.tokenizer,
        preprocess=loaded.preprocess,
        report=report,
        calibration_images=calib.images,
        calibration_tokens=calib.tokens,
        eval_task=task,
    )
