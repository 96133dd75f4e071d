"""worker/tasks.py outcomes that need no full pipeline run: duplicates, cancel before start,
too many attempts, and how each kind of failure becomes the job's problem object."""

from __future__ import annotations

import errno
from typing import Any

import pytest

import d4c_core.pipeline
from app.core.config import Settings
from app.db.models import Job, utcnow
from app.db.session import sync_sessionmaker
from tests.support.jobs import insert_job, job_row, tiny_recipe
from worker.tasks import JobRunner

pytestmark = pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)


def _run(settings: Settings, job_id: str, worker: str = "w1", **knobs: Any) -> str:
    return JobRunner(settings.model_copy(update=knobs), worker).run(job_id)


def test_a_duplicate_delivery_is_dropped(settings: Settings) -> None:
    busy = insert_job(
        settings, tiny_recipe(), state="running", worker="other", heartbeat_at=utcnow()
    )
    assert _run(settings, busy) == "skipped"
    assert job_row(settings, busy).worker == "other"
    done = insert_job(settings, tiny_recipe(), state="succeeded")
    assert _run(settings, done) == "skipped"
    assert job_row(settings, done).state == "succeeded"


def test_cancel_requested_before_start(settings: Settings) -> None:
    job_id = insert_job(settings, tiny_recipe(), cancel_requested=True)
    assert _run(settings, job_id) == "cancelled"
    assert job_row(settings, job_id).state == "cancelled"


def test_a_job_that_keeps_killing_its_worker_fails(settings: Settings) -> None:
    job_id = insert_job(settings, tiny_recipe(), attempts=3)
    assert _run(settings, job_id, worker_max_attempts=3) == "failed"
    row = job_row(settings, job_id)
    assert row.state == "failed" and row.error["type"] == "/problems/worker-lost"  # type: ignore[index]


def test_a_missing_checkpoint_fails_with_the_engines_message(settings: Settings) -> None:
    job_id = insert_job(settings, tiny_recipe())
    with sync_sessionmaker(settings)() as db, db.begin():
        job = db.get(Job, job_id)
        assert job is not None
        job.model = {"arch": "d4c-tiny-vit", "checkpoint_id": "gone"}
    assert _run(settings, job_id) == "failed"
    error = job_row(settings, job_id).error
    assert error is not None and error["type"] == "/problems/job-rejected"
    assert "no longer available" in error["detail"]


@pytest.mark.parametrize(
    ("exc", "problem"),
    [
        (RuntimeError("boom at /srv/secret/path"), "/problems/internal-error"),
        (OSError(errno.ENOSPC, "No space left", "/srv/secret/path"), "/problems/storage-error"),
    ],
)
def test_unexpected_errors_never_leak_details(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, exc: Exception, problem: str
) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise exc

    monkeypatch.setattr(d4c_core.pipeline, "run", fail)
    job_id = insert_job(settings, tiny_recipe())
    assert _run(settings, job_id) == "failed"
    row = job_row(settings, job_id)
    assert row.error is not None and row.error["type"] == problem
    assert "secret" not in str(row.error)
    assert row.finished_at is not None
    assert not (settings.work_dir / job_id).exists()
