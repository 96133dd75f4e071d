"""worker/lease.py: the row-level claim that keeps two workers from running one job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from app.core.config import Settings
from app.db.models import Artifact, Job, utcnow
from app.db.session import sync_sessionmaker
from app.storage import StoredFile
from tests.support.jobs import insert_job, job_row
from worker.lease import Lease, LeaseLost

pytestmark = pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)

RECIPE = {"any": "thing"}  # the lease never reads the recipe


def _lease(settings: Settings, job_id: str, worker: str) -> Lease:
    return Lease(sync_sessionmaker(settings), job_id, worker, settings.stale_after_s)


def test_only_one_worker_claims_a_queued_job(settings: Settings) -> None:
    job_id = insert_job(settings, RECIPE)
    a, b = _lease(settings, job_id, "a"), _lease(settings, job_id, "b")
    claimed = a.claim()
    assert claimed is not None and claimed.attempts == 1
    assert b.claim() is None  # running elsewhere, heartbeat fresh: duplicate delivery
    row = job_row(settings, job_id)
    assert (row.state, row.worker, row.attempts) == ("running", "a", 1)
    assert row.started_at is not None and row.heartbeat_at is not None


def test_a_stale_job_is_taken_over_and_the_old_worker_loses_its_claim(
    settings: Settings,
) -> None:
    job_id = insert_job(settings, RECIPE)
    a, b = _lease(settings, job_id, "a"), _lease(settings, job_id, "b")
    assert a.claim() is not None
    first_start = job_row(settings, job_id).started_at
    stale = utcnow() - timedelta(seconds=settings.stale_after_s + 1)
    with sync_sessionmaker(settings)() as db, db.begin():
        db.get(Job, job_id).heartbeat_at = stale  # type: ignore[union-attr]
    assert b.claim() is not None
    assert not a.heartbeat()
    assert not a.progress("reconstruction", 0.5)
    with pytest.raises(LeaseLost):
        a.cancel_requested()
    with pytest.raises(LeaseLost):
        a.succeed({}, [])
    assert not a.finish("failed", {"title": "x"})
    row = job_row(settings, job_id)
    assert (row.state, row.worker, row.attempts) == ("running", "b", 2)
    assert row.started_at == first_start


def test_the_same_worker_reclaims_its_own_job_at_once(settings: Settings) -> None:
    """A redelivery to the worker that held the job means its last run died (one job at a
    time per worker), so it need not wait for the heartbeat to go stale."""
    job_id = insert_job(settings, RECIPE)
    assert _lease(settings, job_id, "a").claim() is not None
    assert _lease(settings, job_id, "a").claim() is not None
    assert job_row(settings, job_id).attempts == 2


def test_finished_jobs_are_never_claimed(settings: Settings) -> None:
    job_id = insert_job(settings, RECIPE, state="succeeded")
    assert _lease(settings, job_id, "a").claim() is None


def test_succeed_lists_artifacts_in_the_same_transaction(settings: Settings) -> None:
    job_id = insert_job(settings, RECIPE)
    lease = _lease(settings, job_id, "a")
    assert lease.claim() is not None
    files = [
        StoredFile("model.safetensors", 3, "ab" * 32),
        StoredFile("manifest.json", 2, "cd" * 32),
    ]
    lease.succeed({"embedding_cosine": {"image": 1.0}}, files)
    row = job_row(settings, job_id)
    assert (row.state, row.progress, row.metrics) == (
        "succeeded",
        1.0,
        {"embedding_cosine": {"image": 1.0}},
    )
    assert row.finished_at is not None
    with sync_sessionmaker(settings)() as db:
        names = db.execute(select(Artifact.name).where(Artifact.job_id == job_id)).scalars()
        assert sorted(names) == ["manifest.json", "model.safetensors"]


def test_release_puts_the_job_back_in_the_queue(settings: Settings) -> None:
    job_id = insert_job(settings, RECIPE)
    lease = _lease(settings, job_id, "a")
    assert lease.claim() is not None
    assert lease.release()
    row = job_row(settings, job_id)
    assert (row.state, row.worker) == ("queued", None)
    assert _lease(settings, job_id, "b").claim() is not None
