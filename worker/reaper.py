"""The reaper: the DB is the truth, the broker only a delivery mechanism; reconcile the two.

Two ways a job can be stranded:

- *running* with a heartbeat older than ``stale_after_s``: its worker died (kill -9, OOM,
  lost node). The job goes back to *queued* and is re-sent; the next worker resumes it from
  its work dir. After ``max_attempts`` deaths it is failed instead, so a job that kills every
  worker cannot loop forever.
- *queued* for longer than ``requeue_queued_after_s`` while the broker holds fewer messages
  than there are such jobs: its message was lost (Redis restarted without persistence, a
  send that failed after the row was committed). It is re-sent.

It also deletes: with ``retention_days`` set, the artifacts and work dirs of jobs finished
longer ago (tombstoned like ``DELETE /jobs/{id}``), and it finishes any purge whose process
died between the tombstone and the files (``app.deletion``).

Every worker runs a reaper thread. Each change is a conditional ``UPDATE`` re-checking the
condition it acts on, and only the reaper whose update hit the row re-sends it, so several
reapers never requeue the same job twice; duplicate deliveries that slip through anyway are
dropped by the task's own claim.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import deletion, queue
from app.core.config import Settings
from app.db.models import Job, utcnow
from app.db.session import sync_sessionmaker
from worker import problems

log = logging.getLogger("d4c.worker.reaper")


@dataclass
class Sweep:
    """What one pass changed (job ids), for logs and tests."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)


class Reaper:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        enqueue: Callable[[str], bool],
        queue_depth: Callable[[], int],
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.enqueue = enqueue
        self.queue_depth = queue_depth

    def sweep(self) -> Sweep:
        out = Sweep()
        self._reap_stale(out)
        self._resend_queued(out)
        self._delete(out)
        return out

    def _delete(self, out: Sweep) -> None:
        """Retention, then unfinished purges. A purge in progress elsewhere gets
        ``stale_after_s`` before it counts as abandoned (purging twice is harmless anyway)."""
        out.expired = deletion.expire_jobs(self.sessions, self.settings)
        out.purged = deletion.finish_purges(
            self.sessions, self.settings, self.settings.stale_after_s
        )

    def _reap_stale(self, out: Sweep) -> None:
        cutoff = utcnow() - timedelta(seconds=self.settings.stale_after_s)
        stale = (
            Job.state == "running",
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
        )
        with self.sessions() as db:
            rows = db.execute(
                select(Job.id, Job.attempts, Job.cancel_requested).where(*stale)
            ).all()
        for job_id, attempts, cancel in rows:
            now = utcnow()
            if cancel:
                values = {"state": "cancelled", "finished_at": now, "worker": None}
                bucket = out.cancelled
            elif attempts >= self.settings.worker_max_attempts:
                values = {
                    "state": "failed",
                    "error": problems.worker_lost(attempts),
                    "finished_at": now,
                    "worker": None,
                }
                bucket = out.failed
            else:
                values = {"state": "queued", "worker": None}
                bucket = out.requeued
            if self._update(job_id, stale, values | {"heartbeat_at": now}):
                bucket.append(job_id)
                if bucket is out.requeued:
                    self.enqueue(job_id)
                log.warning(
                    "stale job reaped",
                    extra={"job_id": job_id, "attempts": attempts, "to": values["state"]},
                )

    def _resend_queued(self, out: Sweep) -> None:
        cutoff = utcnow() - timedelta(seconds=self.settings.worker_requeue_queued_after_s)
        # heartbeat_at on a queued row is when it was last (re)queued; created_at before that.
        since = func.coalesce(Job.heartbeat_at, Job.created_at)
        waiting = (Job.state == "queued", since < cutoff)
        with self.sessions() as db:
            ids = db.execute(select(Job.id).where(*waiting).order_by(since)).scalars().all()
        if not ids:
            return
        try:
            depth = self.queue_depth()
        except Exception as e:  # broker down: nothing can be re-sent now; retry next sweep
            log.warning("queue depth unavailable", extra={"error": f"{type(e).__name__}: {e}"})
            return
        if depth >= len(ids):
            return  # every waiting job may still have its message; workers are just busy
        for job_id in ids:
            if self._update(job_id, waiting, {"heartbeat_at": utcnow()}):
                self.enqueue(job_id)
                out.resent.append(job_id)
        log.warning(
            "re-sent queued jobs the broker lost",
            extra={"count": len(out.resent), "queue_depth": depth},
        )

    def _update(self, job_id: str, condition: tuple, values: dict) -> bool:  # type: ignore[type-arg]
        with self.sessions() as db, db.begin():
            result = db.execute(
                update(Job)
                .where(Job.id == job_id, *condition)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]


class ReaperThread(threading.Thread):
    """Sweeps every ``interval_s`` (with jitter, so several workers spread out) until stopped."""

    def __init__(self, reaper: Reaper, interval_s: float) -> None:
        super().__init__(name="d4c-reaper", daemon=True)
        self.reaper = reaper
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s * random.uniform(0.8, 1.2)):
            try:
                self.reaper.sweep()
            except (SQLAlchemyError, OSError):
                log.warning("reaper sweep failed; retrying next interval", exc_info=True)
            except Exception:
                log.exception("reaper sweep crashed; retrying next interval")

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)


def start_reaper(settings: Settings) -> ReaperThread:
    """Start a reaper thread for ``settings``, sending and counting through the queue port."""
    reaper = Reaper(
        sync_sessionmaker(settings),
        settings,
        functools.partial(queue.send, settings=settings),
        functools.partial(queue.depth, settings=settings),
    )
    interval = settings.worker_reaper_interval_s or settings.heartbeat_s
    thread = ReaperThread(reaper, interval)
    thread.start()
    return thread
