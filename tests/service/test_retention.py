"""The reaper's deletion sweeps: retention (``retention_days``) and unfinished purges."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from app.core.config import Settings
from app.db.models import Artifact, utcnow
from app.storage import ArtifactStore
from tests.service.test_auth_isolation import add_artifact
from tests.support.jobs import insert_job, job_row
from worker.reaper import Reaper, Sweep

pytestmark = pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)


@pytest.fixture
def pg_url(private_pg_url: str) -> str:
    """The reaper sweeps the whole jobs table: a database of its own per test."""
    return private_pg_url


def _ago(**delta: float) -> datetime:
    return utcnow() - timedelta(**delta)


def _sweep(settings: Settings) -> Sweep:
    from app.db.session import sync_sessionmaker

    reaper = Reaper(sync_sessionmaker(settings), settings, bool, lambda: 0)
    return reaper.sweep()


def _with_files(settings: Settings, db: Any, **values: Any) -> str:
    job_id = insert_job(settings, {"any": "thing"}, **values)
    add_artifact(db, settings, job_id, "model.safetensors", b"weights")
    work = settings.work_dir / job_id
    work.mkdir(parents=True)
    (work / "unit-0.pt").write_bytes(b"x")
    return job_id


def _files_gone(settings: Settings, db: Any, job_id: str) -> bool:
    with db.connect() as conn:
        q = select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)
        rows = int(conn.scalar(q))
    on_disk = (settings.artifacts_dir / job_id).exists() or (settings.work_dir / job_id).exists()
    return rows == 0 and not on_disk


def test_retention_purges_only_jobs_finished_before_the_cutoff(settings: Settings, db: Any) -> None:
    settings.retention_days = 1
    old = _with_files(settings, db, state="succeeded", finished_at=_ago(days=2))
    old_failed = _with_files(settings, db, state="failed", finished_at=_ago(days=30))
    recent = _with_files(settings, db, state="succeeded", finished_at=_ago(hours=20))
    running = _with_files(
        settings, db, state="running", worker="w", heartbeat_at=utcnow(), started_at=_ago(days=5)
    )
    sweep = _sweep(settings)
    assert sorted(sweep.expired) == sorted([old, old_failed])
    for job_id in (old, old_failed):
        row = job_row(settings, job_id)
        assert row.deleted_at is not None and row.purged_at is not None
        assert _files_gone(settings, db, job_id)
    for job_id in (recent, running):
        assert job_row(settings, job_id).deleted_at is None
        assert ArtifactStore(settings).path(job_id, "model.safetensors").is_file()
    assert _sweep(settings).expired == []  # idempotent


def test_without_retention_nothing_expires(settings: Settings, db: Any) -> None:
    assert settings.retention_days is None  # the default
    job_id = _with_files(settings, db, state="succeeded", finished_at=_ago(days=3650))
    assert _sweep(settings).expired == []
    assert job_row(settings, job_id).deleted_at is None


def test_reapers_running_at_once_purge_each_job_once(settings: Settings, db: Any) -> None:
    settings.retention_days = 0.5
    ids = {_with_files(settings, db, state="succeeded", finished_at=_ago(days=1)) for _ in range(6)}
    start = threading.Barrier(3)
    results: list[list[str]] = []

    def reap() -> None:
        start.wait()
        results.append(_sweep(settings).expired)

    threads = [threading.Thread(target=reap) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claimed = [job_id for r in results for job_id in r]
    assert len(results) == 3 and sorted(claimed) == sorted(ids)  # each by exactly one reaper
    assert all(_files_gone(settings, db, job_id) for job_id in ids)


def test_a_purge_whose_process_died_is_finished_by_the_reaper(settings: Settings, db: Any) -> None:
    """Tombstoned (the rows say deleted) but the files are still there: the API process died
    between its commit and the purge. Past the grace period the reaper removes them."""
    abandoned = _with_files(
        settings, db, state="succeeded", finished_at=_ago(hours=1), deleted_at=_ago(hours=1)
    )
    in_progress = _with_files(
        settings, db, state="succeeded", finished_at=_ago(hours=1), deleted_at=utcnow()
    )
    sweep = _sweep(settings)
    assert sweep.purged == [abandoned]
    assert not (settings.artifacts_dir / abandoned).exists()
    assert not (settings.work_dir / abandoned).exists()
    assert job_row(settings, abandoned).purged_at is not None
    assert job_row(settings, in_progress).purged_at is None  # left to its owner for now
    assert _sweep(settings).purged == []
