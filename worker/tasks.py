"""The Celery task: claim a job row, run the engine's pipeline on it, publish, finish.

A delivery carries only the job id; the row says what to run. The work dir is
``work_dir/<job_id>`` whatever worker or attempt runs it, so a redelivered or requeued job
resumes at its last finished reconstruction unit. The row is written only while this worker's
claim holds (see ``worker.lease``); every outcome ends in one terminal state, except a lost
claim (someone else finishes the job) and a worker shutdown (the job goes back to the queue).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import SQLAlchemyError

from app import deletion
from app.core.config import Settings, get_settings
from app.db.session import sync_sessionmaker
from app.queue import TASK_NAME
from app.storage import ArtifactStore
from d4c_core.errors import Cancelled, D4CError
from worker import problems
from worker.heartbeat import Heartbeat
from worker.lease import ClaimedJob, Lease, LeaseLost
from worker.logs import JobLog, job_log
from worker.spec import job_spec

log = logging.getLogger("d4c.worker")

# Set when this process's worker is shutting down (in-process ``stop()``): the running job
# stops at its next unit boundary and goes back to the queue instead of being cancelled.
STOPPING = threading.Event()


# This process's worker node name, when the task request does not carry it (the in-process
# worker's requests name only the host). One name per worker process: a redelivery to the same
# name means its previous run died (see ``Lease.claim``).
WORKER_ID: str | None = None


class WorkerStopping(Exception):
    """The worker is shutting down; hand the job back unfinished."""


class JobTimeLimit(Exception):
    """The job ran past ``Settings.job_time_limit_s``."""


class _Hooks:
    """The pipeline's ``on_progress`` / ``should_cancel``, throttled so a fast sequence of
    units costs a DB round trip at most every ``worker_progress_interval_s``."""

    def __init__(self, lease: Lease, beat: Heartbeat, settings: Settings, deadline: float) -> None:
        self.lease = lease
        self.beat = beat
        self.settings = settings
        self.deadline = deadline
        self._last_write = 0.0
        self._last_stage = ""
        self._last_poll = 0.0
        self._cancel = False

    def on_progress(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        recent = now - self._last_write < self.settings.worker_progress_interval_s
        if stage == self._last_stage and recent:
            return
        self._last_write, self._last_stage = now, stage
        try:
            alive = self.lease.progress(stage, round(fraction, 4))
        except SQLAlchemyError:
            # A DB blip must not throw away computed work: keep going; the heartbeat thread
            # and the final write retry, and the reaper covers a long outage.
            log.warning("progress write failed", extra={"job_id": self.lease.job_id})
            return
        if not alive:
            raise LeaseLost(self.lease.job_id)

    def should_cancel(self) -> bool:
        if self.beat.lost.is_set():
            raise LeaseLost(self.lease.job_id)
        if STOPPING.is_set():
            raise WorkerStopping()
        now = time.monotonic()
        if now > self.deadline:
            raise JobTimeLimit()
        if not self._cancel and now - self._last_poll >= self.settings.worker_cancel_poll_s:
            self._last_poll = now
            try:
                self._cancel = self.lease.cancel_requested()
            except SQLAlchemyError:
                log.warning("cancel flag unreadable", extra={"job_id": self.lease.job_id})
        return self._cancel


class JobRunner:
    """Runs one delivery of one job id on behalf of ``worker_id``."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.sessions = sync_sessionmaker(settings)
        self.store = ArtifactStore(settings)

    def run(self, job_id: str) -> str:
        """Return the outcome: succeeded, failed, cancelled, skipped, lost or released."""
        log = job_log("d4c.worker", job_id, worker=self.worker_id)
        lease = Lease(self.sessions, job_id, self.worker_id, self.settings.stale_after_s)
        job = lease.claim()
        if job is None:
            log.info("not claimed: finished or running elsewhere; duplicate delivery dropped")
            return "skipped"
        log.info("claimed", extra={"attempt": job.attempts})
        if job.attempts > self.settings.worker_max_attempts:
            # Redelivered after its process died again and again (e.g. killed for memory).
            lease.finish("failed", problems.worker_lost(job.attempts - 1))
            self._cleanup(job_id)
            log.warning("too many attempts; failed", extra={"attempt": job.attempts})
            return "failed"
        if job.cancel_requested:
            lease.finish("cancelled")
            self._cleanup(job_id)
            log.info("cancelled before it started")
            return "cancelled"
        beat = Heartbeat(lease, self.settings.heartbeat_s)
        beat.start()
        try:
            outcome = self._run_claimed(job, lease, beat, log)
        finally:
            beat.stop()
            staging = self.store.staging_dir(job_id, create_parent=False)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(staging.with_name(f".{staging.name}.tmp"), ignore_errors=True)
        if outcome in ("succeeded", "failed", "cancelled"):
            self._cleanup(job_id)
        log.info("finished", extra={"outcome": outcome})
        return outcome

    def _run_claimed(self, job: ClaimedJob, lease: Lease, beat: Heartbeat, log: JobLog) -> str:
        from d4c_core.artifacts import verify
        from d4c_core.pipeline import run

        limit = self.settings.job_time_limit_s
        hooks = _Hooks(lease, beat, self.settings, time.monotonic() + limit)
        work = self.settings.work_dir / job.id
        try:
            staging = self.store.staging_dir(job.id)
            spec = job_spec(job, self.settings, self.sessions, self.settings.worker_device)
            report = run(spec, work, staging, hooks.on_progress, hooks.should_cancel)
            verify(staging)  # what the pipeline wrote is what its manifest lists
            if not _still_mine(lease):
                raise LeaseLost(job.id)
            files = self.store.publish(job.id, staging)
            lease.succeed(_metrics(report), files)
            return "succeeded"
        except LeaseLost:
            log.warning("claim lost to another worker; leaving the job to it")
            self._discard_if_deleted(job.id)
            return "lost"
        except WorkerStopping:
            released = lease.release()
            log.info("worker stopping; job handed back to the queue")
            return "released" if released else "lost"
        except Cancelled:
            if beat.lost.is_set():
                self._discard_if_deleted(job.id)
                return "lost"
            return _end(lease, "cancelled")
        except (JobTimeLimit, SoftTimeLimitExceeded):
            log.warning("time limit exceeded", extra={"limit_s": limit})
            return _end(lease, "failed", problems.time_limit(limit))
        except D4CError as e:
            log.info("job rejected by the engine", extra={"error": str(e)})
            return _end(lease, "failed", problems.from_engine(e))
        except OSError as e:
            log.exception("storage error")
            return _end(lease, "failed", problems.from_storage(e))
        except Exception:
            log.exception("job failed unexpectedly")
            return _end(lease, "failed", problems.internal())

    def _discard_if_deleted(self, job_id: str) -> None:
        """A lost claim may mean the job was taken over, finished and deleted while this
        worker stalled; what it published or wrote since must not outlive the delete."""
        deletion.discard_if_deleted(self.sessions, self.settings, job_id)

    def _cleanup(self, job_id: str) -> None:
        """A finished job never resumes: its checkpoints are garbage now."""
        shutil.rmtree(self.settings.work_dir / job_id, ignore_errors=True)


def _end(lease: Lease, state: str, error: dict[str, Any] | None = None) -> str:
    """Finish the job as ``state``; "lost" when another worker holds it by now (its work dir
    must then be left alone)."""
    return state if lease.finish(state, error) else "lost"


def _still_mine(lease: Lease) -> bool:
    """Last check before publishing; a DB blip here is no reason to fail a finished job (the
    final write is conditional on the claim anyway)."""
    try:
        return lease.heartbeat()
    except SQLAlchemyError:
        return True


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The job's ``metrics``: the engine's metrics plus per-stage timings and how many
    reconstruction units a resumed run reused (0 for an uninterrupted run)."""
    return {
        **report["metrics"],
        "timings": report["timings"],
        "resumed_units": report.get("resumed_units", 0),
    }


def default_worker_id(pid: int | None = None) -> str:
    """The name a ``d4c worker`` process (this one by default) claims jobs under."""
    return f"d4c-{pid or os.getpid()}@{socket.gethostname()}"


@shared_task(name=TASK_NAME, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    """Run (or resume) job ``job_id``; a duplicate delivery is dropped after one UPDATE."""
    worker_id = WORKER_ID or self.request.hostname or default_worker_id()
    return JobRunner(get_settings(), worker_id).run(job_id)


def warm_up() -> None:
    """Import the engine now, so a worker's first job does not pay for it."""
    import d4c_core.pipeline  # noqa: F401
