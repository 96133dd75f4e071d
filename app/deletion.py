"""Deleting a finished job's files: tombstone the row first, remove the files after.

``DELETE /jobs/{id}`` and the retention sweep (``worker.reaper``) share this code, and both
leave the job row in place as a tombstone (``deleted_at``): ``GET /jobs/{id}`` keeps
answering, the artifact routes answer 410, and an idempotent retry finds the job again.

Why this order is safe:

- The tombstone is one conditional ``UPDATE ... WHERE state IN (finished) AND deleted_at IS
  NULL``. A worker's terminal write is ``UPDATE ... WHERE state = 'running' AND worker = me``:
  the two conditions exclude each other and the database serializes writes to the row, so a
  delete either sees a running job (409, nothing touched) or a finished one whose artifact
  rows are committed (and deletes them in the same transaction as the tombstone). Of several
  deleters (client, reapers) exactly one wins the ``UPDATE``.
- Files go after the commit, so nothing the database lists ever points at a missing file
  except through the tombstone, which every reader checks. ``purged_at`` records that the
  files are gone; a process that dies in between leaves it NULL and the reaper finishes the
  purge (``finish_purges``).
- A worker that lost its claim while stalled (the job was taken over, finished and deleted
  meanwhile) may still publish its staging directory afterwards; ``discard_if_deleted`` runs
  whenever a worker learns its claim is lost and removes what it resurrected.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import Row, case, delete, literal, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import FINISHED_STATES, Artifact, Job, utcnow
from app.storage import ArtifactStore

log = logging.getLogger("d4c.deletion")

# Jobs one sweep tombstones or finishes purging: a first run after enabling retention on a
# large backlog proceeds in bounded steps instead of holding one sweep for minutes.
SWEEP_BATCH = 200


def _deletable(job_id: str) -> tuple[Any, ...]:
    return (Job.id == job_id, Job.state.in_(FINISHED_STATES), Job.deleted_at.is_(None))


def purge_files(settings: Settings, job_id: str) -> None:
    """Remove the job's published artifacts, staging leftovers and work dir (idempotent).

    The work dir of a job that finished normally is already gone (the worker removes it);
    one whose worker died for good (failed by the reaper) still holds checkpoints.
    """
    ArtifactStore(settings).delete(job_id)  # validates the id before it becomes a path
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(settings.work_dir / job_id)


# --- the API (async) -------------------------------------------------------------------------


async def tombstone(session: AsyncSession, tenant_id: str, job_id: str) -> Row[Any] | None:
    """Tombstone the tenant's finished job and drop its artifact rows; commit.

    Returns the row's ``(id, state, deleted_at, purged_at)`` after the attempt (None: no
    such job for this tenant); a ``state`` still queued or running means nothing changed.
    PostgreSQL reads the newest commit per statement, so the row can show a job that
    finished just after the ``UPDATE`` missed it: it is tombstoned on a second pass (a
    finished job stays finished), never reported deleted while it is not.
    """
    for _ in range(3):
        hit = await _tombstone_once(session, tenant_id, job_id)
        row = (
            await session.execute(
                select(Job.id, Job.state, Job.deleted_at, Job.purged_at).where(
                    Job.id == job_id, Job.tenant_id == tenant_id
                )
            )
        ).first()
        if hit or row is None or row.deleted_at is not None or row.state not in FINISHED_STATES:
            break
    await session.commit()
    if hit:
        log.info("job deleted", extra={"job_id": job_id, "by": "client"})
    return row


def _tombstone_time() -> Any:
    """Now, or ``finished_at`` if later: the time is taken before the ``UPDATE`` waits for the
    row a finishing worker holds, and a tombstone must not predate the finish it follows."""
    now = literal(utcnow(), Job.__table__.c.deleted_at.type)
    return case((Job.finished_at > now, Job.finished_at), else_=now)


async def _tombstone_once(session: AsyncSession, tenant_id: str, job_id: str) -> bool:
    result = await session.execute(
        update(Job)
        .where(Job.tenant_id == tenant_id, *_deletable(job_id))
        .values(deleted_at=_tombstone_time())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    return True


async def purge(session: AsyncSession, settings: Settings, job_id: str) -> bool:
    """Remove a tombstoned job's files and record it; False (logged) when the filesystem
    refused: the tombstone stands and the reaper retries the purge later."""
    try:
        await anyio.to_thread.run_sync(purge_files, settings, job_id)
    except OSError as e:
        log.error(
            "job files not removed; the reaper retries",
            extra={"job_id": job_id, "error": f"{type(e).__name__}: {e}"},
        )
        return False
    await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.purged_at.is_(None))
        .values(purged_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    await session.commit()
    log.info("job files purged", extra={"job_id": job_id})
    return True


async def deleted_at(session: AsyncSession, job_id: str) -> datetime | None:
    """The job's tombstone time, read in a fresh transaction: a download that found its row
    or file missing asks whether a delete took it (410) or it never existed (404); SQLite's
    snapshot from the earlier reads would not show a delete committed since."""
    await session.rollback()
    return await session.scalar(select(Job.deleted_at).where(Job.id == job_id))


# --- the reaper and the worker (sync) --------------------------------------------------------


def _claim(sessions: sessionmaker[Session], job_id: str, cutoff: datetime) -> bool:
    """Tombstone one expired job unless someone else (a client, another reaper) already did."""
    with sessions() as db, db.begin():
        result = db.execute(
            update(Job)
            .where(*_deletable(job_id), Job.finished_at < cutoff)
            .values(deleted_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        db.execute(delete(Artifact).where(Artifact.job_id == job_id))
        return True


def _purge_sync(sessions: sessionmaker[Session], settings: Settings, job_id: str) -> bool:
    try:
        purge_files(settings, job_id)
    except OSError as e:
        log.error(
            "job files not removed; retrying next sweep",
            extra={"job_id": job_id, "error": f"{type(e).__name__}: {e}"},
        )
        return False
    with sessions() as db, db.begin():
        db.execute(
            update(Job)
            .where(Job.id == job_id, Job.purged_at.is_(None))
            .values(purged_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    log.info("job files purged", extra={"job_id": job_id})
    return True


def expire_jobs(sessions: sessionmaker[Session], settings: Settings) -> list[str]:
    """Tombstone and purge jobs finished more than ``retention_days`` ago; the ids claimed.

    Several reapers may run this at once: each job is claimed by one conditional ``UPDATE``,
    and only the claimant purges it.
    """
    if settings.retention_days is None:
        return []
    cutoff = utcnow() - timedelta(days=settings.retention_days)
    with sessions() as db:
        ids: Sequence[str] = (
            db.execute(
                select(Job.id)
                .where(
                    Job.deleted_at.is_(None),
                    Job.finished_at < cutoff,
                    Job.state.in_(FINISHED_STATES),
                )
                .order_by(Job.finished_at)
                .limit(SWEEP_BATCH)
            )
            .scalars()
            .all()
        )
    claimed = [job_id for job_id in ids if _claim(sessions, job_id, cutoff)]
    for job_id in claimed:
        log.info("job deleted", extra={"job_id": job_id, "by": "retention"})
        _purge_sync(sessions, settings, job_id)
    return claimed


def finish_purges(sessions: sessionmaker[Session], settings: Settings, grace_s: float) -> list[str]:
    """Purge tombstoned jobs whose files were not confirmed removed ``grace_s`` after the
    tombstone (the deleting process died, or the filesystem refused); the ids purged.

    The grace leaves a purge in progress to its owner; purging twice is harmless anyway.
    """
    cutoff = utcnow() - timedelta(seconds=grace_s)
    with sessions() as db:
        ids = (
            db.execute(
                select(Job.id)
                .where(Job.purged_at.is_(None), Job.deleted_at < cutoff)
                .limit(SWEEP_BATCH)
            )
            .scalars()
            .all()
        )
    return [job_id for job_id in ids if _purge_sync(sessions, settings, job_id)]


def discard_if_deleted(sessions: sessionmaker[Session], settings: Settings, job_id: str) -> bool:
    """Called by a worker whose claim on ``job_id`` is lost: if the job has been deleted
    meanwhile, remove whatever this worker published or wrote after the purge. A tombstoned
    job is finished, so no other worker can be using its directories. True if it did."""
    try:
        with sessions() as db:
            when = db.execute(select(Job.deleted_at).where(Job.id == job_id)).scalar()
    except SQLAlchemyError:
        log.warning("could not check for a tombstone", extra={"job_id": job_id})
        return False
    if when is None:
        return False
    try:
        purge_files(settings, job_id)
    except OSError:
        log.exception("late files of a deleted job not removed", extra={"job_id": job_id})
        return False
    log.info("late files of a deleted job removed", extra={"job_id": job_id})
    return True
