"""The quantization job as a resumable, checkpointing driver: load → calibration → range init
→ reconstruction → evaluation → export.

The stages are ``d4c_core.stages`` (the same functions ``d4c_core.quantize`` runs in memory)
with a ``Checkpoints`` work dir: every stage leaves its result there under a key (sha256 of
everything it depends on). A run started again with the same inputs reuses what matches and
continues at the first missing piece, down to the reconstruction unit; a changed input
invalidates that stage and everything after it. Between units the caller's ``should_cancel``
is asked and ``on_progress(stage, fraction)`` told, so a service can drive it without
threads or signals. The artifact is written by ``d4c_core.export`` (temp dir, then rename).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d4c_core.api import export
from d4c_core.checkpoints import Checkpoints
from d4c_core.models import ModelSpec, load_clip
from d4c_core.recipe import Recipe
from d4c_core.stages import (
    CancelFn,
    EvalTask,
    Progress,
    ProgressFn,
    QuantizedModel,
    run_stages,
)

__all__ = ["CancelFn", "EvalTask", "JobSpec", "ProgressFn", "run"]


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs: which model, the recipe, real images, a task, the device."""

    model: ModelSpec
    recipe: Recipe
    calib_dir: Path | None = None
    eval_task: EvalTask | None = None
    device: str = "cpu"


def run(
    job: JobSpec,
    workdir: Path,
    out_dir: Path,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict[str, Any]:
    """Run (or resume) the job; write the artifact to ``out_dir`` atomically; return the report."""
    prog = Progress(on_progress, should_cancel)
    store = Checkpoints(Path(workdir))
    with prog.timed("load"):
        prog.at("load", 0.0)
        loaded = load_clip(job.model, job.device)
        store.open("units")  # only once the inputs are valid
    qmodel = run_stages(
        loaded, job.recipe, store, prog, image_dir=job.calib_dir, task=job.eval_task
    )
    _export(qmodel, Path(out_dir), prog)
    return qmodel.report


def _export(qmodel: QuantizedModel, out: Path, prog: Progress) -> None:
    """The export stage: report.json carries every stage's time but its own (0 there)."""
    t0 = time.perf_counter()
    prog.at("export", 0.0)
    prog.timings["export"] = 0.0
    qmodel.report["timings"] = dict(prog.timings)
    export(qmodel, out, overwrite=True)
    prog.timings["export"] = time.perf_counter() - t0
    qmodel.report["timings"] = dict(prog.timings)
    prog.at("export", 1.0)
