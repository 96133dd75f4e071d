"""The quantization job as resumable stages: calibration → range init → reconstruction →
evaluation → export.

Every stage leaves its result in the work dir under a key (sha256 of everything it depends
on). A run started again with the same inputs reuses what matches and continues at the first
missing piece, down to the reconstruction unit; a changed input invalidates that stage and
everything after it. Between units the caller's ``should_cancel`` is asked and
``on_progress(stage, fraction)`` told, so a service can drive it without threads or signals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from d4c_core.artifacts import export, write_safetensors
from d4c_core.calibration import make_calibration, make_text_calibration, save_contact_sheet
from d4c_core.errors import Cancelled
from d4c_core.evaluate import embedding_cosine_fp_mode, layer_sqnr, zero_shot
from d4c_core.models import LoadedModel, ModelSpec, load_clip
from d4c_core.quant.quantizers import RoundMode
from d4c_core.quant.range_init import init_ranges
from d4c_core.quant.reconstruct import (
    Unit,
    load_unit_state,
    reconstruct_unit,
    unit_seed,
    unit_state,
    units,
)
from d4c_core.quant.wrap import fp_mode, quantize_, set_quant_state, set_round_mode
from d4c_core.recipe import Recipe

log = logging.getLogger("d4c.pipeline")

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]

# Share of the whole job each stage stands for, for one progress number.
STAGES = {
    "load": 0.02,
    "calibration": 0.05,
    "range_init": 0.05,
    "reconstruction": 0.8,
    "evaluation": 0.06,
    "export": 0.02,
}


@dataclass(frozen=True)
class EvalTask:
    """A zero-shot task: class names, templates and labelled, preprocessed images."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    recipe: Recipe
    calib_dir: Path | None = None
    eval_task: EvalTask | None = None
    device: str = "cpu"


@dataclass
class _Progress:
    on_progress: ProgressFn | None
    should_cancel: CancelFn | None
    timings: dict[str, float] = field(default_factory=dict)

    def at(self, stage: str, within: float) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled during {stage}")
        if self.on_progress is not None:
            done = 0.0
            for name, share in STAGES.items():
                if name == stage:
                    break
                done += share
            self.on_progress(stage, min(1.0, done + STAGES[stage] * within))


def _key(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def tensor_digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save(path: Path, tensors: dict[str, Tensor], key: str) -> None:
    """Write-then-rename, so a kill never leaves a half file that looks finished."""
    tmp = path.with_suffix(".tmp")
    write_safetensors(
        tmp, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"key": key}
    )
    tmp.replace(path)


def _load(path: Path, key: str) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
        return load_file(str(path))
    except Exception:  # unreadable checkpoint: recompute rather than fail
        log.warning("discarding unreadable checkpoint %s", path.name)
        return None


def _calibration(
    job: JobSpec, loaded: LoadedModel, work: Path, prog: _Progress
) -> tuple[Tensor, Tensor, str]:
    cal = job.recipe.calibration
    listing = None
    if cal.method == "real" and job.calib_dir is not None:
        from d4c_core.calibration.sources import list_images

        listing = [
            (str(p.relative_to(job.calib_dir)), p.stat().st_size)
            for p in list_images(job.calib_dir)
        ]
    cal_dict = cal.to_dict()
    if cal.method in ("noise", "real"):  # synthesis settings do not change these images
        cal_dict.pop("synth")
    key = _key("calibration", loaded.fingerprint, cal_dict, job.recipe.seed, listing)
    path = work / "calibration.safetensors"
    sheet = work / "calibration.png"
    state = _load(path, key)
    if state is None:
        prog.at("calibration", 0.0)
        images = make_calibration(
            loaded,
            cal,
            seed=job.recipe.seed,
            image_dir=job.calib_dir,
            # Synthesis reports (and checks for cancel) at most once per 1% of its steps.
            on_step=lambda frac: prog.at("calibration", frac),
        )
        tokens = make_text_calibration(loaded, cal, seed=job.recipe.seed)
        _save(path, {"images": images, "tokens": tokens}, key)
        state = {"images": images, "tokens": tokens}
        sheet.unlink(missing_ok=True)  # a sheet of older calibration data would be stale
    if not sheet.is_file():
        cfg = open_clip.get_model_preprocess_cfg(loaded.model)
        save_contact_sheet(state["images"].cpu(), sheet, cfg["mean"], cfg["std"])
    images, tokens = state["images"].to(job.device), state["tokens"].to(job.device)
    return images, tokens, tensor_digest(images, tokens)


def _quant_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if "_quant." in k}


def run(
    job: JobSpec,
    workdir: Path,
    out_dir: Path,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict[str, Any]:
    """Run (or resume) the job; write the artifact to ``out_dir`` atomically; return the report."""
    work = Path(workdir)
    prog = _Progress(on_progress, should_cancel)
    recipe = job.recipe
    torch.manual_seed(recipe.seed)

    t0 = time.perf_counter()
    prog.at("load", 0.0)
    loaded = load_clip(job.model, job.device)
    (work / "units").mkdir(parents=True, exist_ok=True)  # only once the inputs are valid
    prog.timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images, tokens, calib_digest = _calibration(job, loaded, work, prog)
    prog.timings["calibration"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prog.at("range_init", 0.0)
    model = quantize_(loaded.model, recipe.quant)
    base = _key("quant", loaded.fingerprint, calib_digest, recipe.to_dict())
    state = _load(work / "range_init.safetensors", base)
    if state is None:
        init_ranges(model, images, tokens, recipe.quant)
        _save(work / "range_init.safetensors", _quant_state(model), base)
    else:
        init_ranges_from_state(model, state)
    prog.timings["range_init"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results, resumed = _reconstruct(model, units(model), images, tokens, recipe, base, work, prog)
    prog.timings["reconstruction"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prog.at("evaluation", 0.0)
    report = _evaluate(job, loaded, model, images, tokens)
    prog.timings["evaluation"] = time.perf_counter() - t0
    report["units"] = results
    report["resumed_units"] = resumed
    report["calibration_digest"] = calib_digest

    t0 = time.perf_counter()
    prog.at("export", 0.0)
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prog.timings["export"] = 0.0  # filled below; report.json carries the stages before it
        report["timings"] = dict(prog.timings)
        model.cpu()
        export(
            model,
            job.model,
            recipe,
            tmp,
            fingerprint=loaded.fingerprint,
            report=report,
            extra_files={"calibration.png": work / "calibration.png"},
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prog.timings["export"] = time.perf_counter() - t0
    report["timings"] = dict(prog.timings)
    prog.at("export", 1.0)
    return report


def init_ranges_from_state(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Restore a range-init checkpoint and switch quantization on, as ``init_ranges`` ends."""

    missing = set(_quant_state(model)) - set(state)
    if missing:
        raise RuntimeError(f"range-init checkpoint lacks {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False)
    set_round_mode(model, RoundMode.NEAREST)
    set_quant_state(model, weights=True, acts=True)


def _reconstruct(
    model: torch.nn.Module,
    todo: list[Unit],
    images: Tensor,
    tokens: Tensor,
    recipe: Recipe,
    base: str,
    work: Path,
    prog: _Progress,
) -> tuple[list[dict[str, Any]], int]:
    """Reconstruct units in order; a unit whose checkpoint matches is loaded, not redone.

    A unit's key chains the key and the learned state of the unit before it, so a unit is
    reused only if every earlier unit holds exactly what it held when this one was computed
    (a recomputed earlier unit that came out differently, e.g. on a non-deterministic GPU,
    invalidates everything after it).
    """
    results: list[dict[str, Any]] = []
    resumed = 0
    key, before = base, ""
    for unit in todo:
        prog.at("reconstruction", unit.index / max(1, len(todo)))
        key = _key("unit", key, before, unit.index, unit.name)
        path = work / "units" / f"{unit.index:04d}.safetensors"
        saved = _load(path, key)
        if saved is not None:
            meta = (
                json.loads((path.with_suffix(".json")).read_text())
                if path.with_suffix(".json").is_file()
                else {}
            )
            load_unit_state(unit, saved)
            results.append(meta | {"resumed": True})
            resumed += 1
            before = tensor_digest(*(saved[k] for k in sorted(saved)))
            continue
        t0 = time.perf_counter()
        res = reconstruct_unit(
            model, unit, images, tokens, recipe.quant, unit_seed(recipe.seed, unit.index)
        )
        res.seconds = time.perf_counter() - t0
        path.with_suffix(".json").write_text(json.dumps(asdict(res)))
        state = unit_state(unit)
        _save(path, state, key)
        before = tensor_digest(*(state[k] for k in sorted(state)))
        results.append(asdict(res))
        log.info(
            "unit done",
            extra={"unit": unit.name, "mse_init": res.mse_init, "mse_final": res.mse_final},
        )
    prog.at("reconstruction", 1.0)
    return results, resumed


def _evaluate(
    job: JobSpec, loaded: LoadedModel, model: torch.nn.Module, images: Tensor, tokens: Tensor
) -> dict[str, Any]:
    """Per-layer SQNR and embedding cosine on the calibration batch; zero-shot if a task is set."""
    n_img, n_txt = job.recipe.quant.range_init_images, job.recipe.quant.range_init_prompts
    report: dict[str, Any] = {
        "model": job.model.to_dict() | {"fingerprint": loaded.fingerprint},
        "recipe": job.recipe.to_dict(),
        "layers": layer_sqnr(model, images[:n_img], tokens[:n_txt]),
        "embedding_cosine": embedding_cosine_fp_mode(model, images[:n_img], tokens[:n_txt]),
    }
    metrics: dict[str, Any] = {"embedding_cosine": report["embedding_cosine"]}
    task = job.eval_task
    if task is not None:
        data = (task.images.to(job.device), task.labels.to(job.device))
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
