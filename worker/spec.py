"""Turn a claimed job row into the engine's ``JobSpec``.

The row holds only what the API validated (an open_clip arch with a tag, or a checkpoint id;
a recipe dict; a built-in task name). Paths are the server's: a checkpoint id becomes
``Settings.checkpoint_path(id)`` only after the row proves it belongs to the job's tenant.
Heavy engine modules are imported here, inside the worker's child process, never at import
time of the worker's parent (a prefork parent must not start torch's thread pools).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Checkpoint
from d4c_core.errors import CheckpointError, SpecError
from worker.lease import ClaimedJob

if TYPE_CHECKING:
    from d4c_core.models import ModelSpec
    from d4c_core.pipeline import EvalTask, JobSpec


def resolve_device(wanted: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@cache
def eval_task(name: str) -> EvalTask:
    """A built-in task's full test split (generated once per process: a worker runs many
    jobs, and the split takes seconds to render)."""
    from d4c_core.pipeline import EvalTask
    from d4c_core.testbed.tasks import tasks

    task = tasks().get(name)
    if task is None:
        raise SpecError(f"unknown evaluation task {name!r}")
    images, labels = task.split("test")
    return EvalTask(task.name, task.classnames, task.templates, images, labels)


def model_spec(
    model: dict[str, Any], tenant_id: str, settings: Settings, sessions: sessionmaker[Session]
) -> ModelSpec:
    from d4c_core.models import ModelSpec

    arch = model["arch"]
    checkpoint_id = model.get("checkpoint_id")
    if checkpoint_id is None:
        return ModelSpec(arch, pretrained=model.get("pretrained"))
    with sessions() as db:
        row = db.execute(
            select(Checkpoint).where(
                Checkpoint.id == checkpoint_id, Checkpoint.tenant_id == tenant_id
            )
        ).scalar_one_or_none()
    path = settings.checkpoint_path(checkpoint_id)
    if row is None or not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint_id} is no longer available")
    if row.arch != arch:
        raise CheckpointError(f"checkpoint {checkpoint_id} holds {row.arch}, not {arch}")
    return ModelSpec(arch, checkpoint=path)


def job_spec(
    job: ClaimedJob, settings: Settings, sessions: sessionmaker[Session], device: str
) -> JobSpec:
    from d4c_core.models import check_model_size
    from d4c_core.pipeline import JobSpec
    from d4c_core.recipe import Recipe

    # Before anything is built: a row from before the limit (or a lowered limit) must not
    # make this worker allocate a model the deployment refuses (ModelTooLarge, a D4CError).
    check_model_size(job.model["arch"], settings.max_model_params)
    return JobSpec(
        model=model_spec(job.model, job.tenant_id, settings, sessions),
        recipe=Recipe.from_dict(job.recipe),
        eval_task=eval_task(job.eval_task) if job.eval_task else None,
        device=resolve_device(device),
    )
