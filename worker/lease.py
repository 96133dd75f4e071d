"""A worker's claim on one job row, and every write it makes while holding it.

Each write is one ``UPDATE ... WHERE id = :id AND state = 'running' AND worker = :me`` whose
row count says whether the claim still holds: the reaper may have handed the job to another
worker (this one looked dead), and from then on this worker must not touch the row again.
Two workers can therefore never both finish a job, on PostgreSQL or SQLite alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Artifact, Job, utcnow
from app.storage import StoredFile

log = logging.getLogger("d4c.worker.lease")
T = TypeVar("T")
OUTAGE_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


class LeaseLost(Exception):
    """Another worker holds the job now (or the row is gone); stop without writing."""


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs from the row to run the job (read once, at claim time)."""

    id: str
    tenant_id: str
    model: dict[str, Any]
    recipe: dict[str, Any]
    eval_task: str | None
    attempts: int
    cancel_requested: bool


class Lease:
    """Writes to ``job_id``'s row on behalf of ``worker_id`` while it runs the job."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        worker_id: str,
        stale_after_s: float,
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.worker_id = worker_id
        self.stale_after_s = stale_after_s

    def _mine(self) -> Any:
        return (Job.id == self.job_id, Job.state == "running", Job.worker == self.worker_id)

    def _update(self, **values: Any) -> bool:
        with self.sessions() as db, db.begin():
            result = db.execute(
                update(Job)
                .where(*self._mine())
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]

    def claim(self) -> ClaimedJob | None:
        """Take the job if it is queued, or running but abandoned (stale heartbeat, or last
        claimed by this same worker, which runs one job at a time and so must have died).

        None when another live worker has it or it already finished: the delivery was a
        duplicate and is dropped.
        """
        now = utcnow()
        cutoff = now - timedelta(seconds=self.stale_after_s)
        with self.sessions() as db, db.begin():
            result = db.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    or_(
                        Job.state == "queued",
                        (Job.state == "running")
                        & or_(
                            Job.heartbeat_at.is_(None),
                            Job.heartbeat_at < cutoff,
                            Job.worker == self.worker_id,
                        ),
                    ),
                )
                .values(
                    state="running",
                    worker=self.worker_id,
                    attempts=Job.attempts + 1,
                    heartbeat_at=now,
                    started_at=func.coalesce(Job.started_at, now),
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            job = db.execute(select(Job).where(Job.id == self.job_id)).scalar_one()
            return ClaimedJob(
                id=job.id,
                tenant_id=job.tenant_id,
                model=dict(job.model),
                recipe=dict(job.recipe),
                eval_task=job.eval_task,
                attempts=job.attempts,
                cancel_requested=job.cancel_requested,
            )

    def heartbeat(self) -> bool:
        """Prove this worker is alive; False once the claim is lost."""
        return self._update(heartbeat_at=utcnow())

    def progress(self, stage: str, fraction: float) -> bool:
        """Record stage and progress (a heartbeat too); False once the claim is lost."""
        return self._update(stage=stage, progress=fraction, heartbeat_at=utcnow())

    def cancel_requested(self) -> bool:
        """The client's cancel flag; a lost claim raises (the job is someone else's)."""
        with self.sessions() as db:
            row = db.execute(select(Job.cancel_requested).where(*self._mine())).scalar_one_or_none()
        if row is None:
            raise LeaseLost(self.job_id)
        return bool(row)

    def succeed(self, metrics: dict[str, Any], files: list[StoredFile]) -> None:
        """Mark succeeded and list the artifacts in one transaction: a client sees either a
        running job with no files or a finished one with all of them."""
        _through_outage(lambda: self._succeed(metrics, files))

    def _succeed(self, metrics: dict[str, Any], files: list[StoredFile]) -> None:
        now = utcnow()
        with self.sessions() as db, db.begin():
            result = db.execute(
                update(Job)
                .where(*self._mine())
                .values(
                    state="succeeded",
                    stage="done",
                    progress=1.0,
                    metrics=metrics,
                    error=None,
                    finished_at=now,
                    heartbeat_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise LeaseLost(self.job_id)  # rolls back: nothing listed
            db.execute(delete(Artifact).where(Artifact.job_id == self.job_id))
            db.add_all(
                Artifact(
                    job_id=self.job_id,
                    name=f.name,
                    size_bytes=f.size_bytes,
                    sha256=f.sha256,
                    created_at=now,
                )
                for f in files
            )

    def finish(self, state: str, error: dict[str, Any] | None = None) -> bool:
        """End the job as ``failed`` or ``cancelled``; False if the claim was already lost."""
        now = utcnow()
        return _through_outage(
            lambda: self._update(state=state, error=error, finished_at=now, heartbeat_at=now)
        )

    def release(self) -> bool:
        """Give the job back to the queue unfinished (this worker is shutting down); its work
        dir stays, so whoever runs it next resumes."""
        return _through_outage(
            lambda: self._update(state="queued", worker=None, heartbeat_at=utcnow())
        )


def _through_outage(write: Callable[[], T]) -> T:
    """Retry a job's final write through a short DB outage (~30 s): the work it records is
    done, and giving up means the reaper requeues the job and it is recomputed (from its
    checkpoints) once the DB is back."""
    for delay in OUTAGE_RETRY_DELAYS_S:
        try:
            return write()
        except OperationalError:
            log.warning("job DB unreachable; retrying the final write", extra={"in_s": delay})
            time.sleep(delay)
    return write()
