"""An in-process worker for ``d4c serve`` on the embedded default (no Redis, no second
process): a Celery worker with the solo pool on the filesystem transport, in a thread, plus
the reaper.

The filesystem transport deletes a message when it is fetched, so it never redelivers; the
reaper covers that: a job left *running* by a killed ``d4c serve`` is requeued once its
heartbeat goes stale, and a *queued* job whose message is gone is re-sent. ``stop()`` hands a
running job back to the queue at its next unit boundary; the next start resumes it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from app.core.config import Settings
from worker.celery_app import QUEUE, celery_app
from worker.reaper import ReaperThread, start_reaper
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger("d4c.worker.embedded")


class EmbeddedWorker:
    """Handle of a running in-process worker; ``stop()`` ends it."""

    def __init__(self, settings: Settings, wsettings: WorkerSettings) -> None:
        from worker import tasks

        self._tasks = tasks
        self.ready = threading.Event()
        self.hostname = f"d4c-embedded-{os.getpid()}@{socket.gethostname()}"
        self.controller: Any = celery_app().WorkController(
            hostname=self.hostname,
            pool_cls="solo",
            concurrency=1,
            queues=[QUEUE],
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel=settings.log_level,
            ready_callback=self._on_ready,
        )
        self.thread = threading.Thread(target=self._run, name="d4c-embedded-worker", daemon=True)
        self.reaper: ReaperThread = start_reaper(settings, wsettings)

    def _on_ready(self, consumer: Any) -> None:
        self.controller.on_consumer_ready(consumer)
        self.ready.set()

    def _run(self) -> None:
        self._tasks.warm_up()
        self.controller.start()

    def start(self) -> EmbeddedWorker:
        self._tasks.STOPPING.clear()
        self._tasks.WORKER_ID = self.hostname
        self.thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop consuming; a running job is handed back at its next unit boundary."""
        self._tasks.STOPPING.set()
        self.ready.wait(timeout=timeout)
        self.controller.stop(in_sighandler=False)
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():
            log.warning("embedded worker did not stop in time")
        self.reaper.stop()
        self._tasks.STOPPING.clear()
        self._tasks.WORKER_ID = None


def start_worker_thread(
    settings: Settings, wsettings: WorkerSettings | None = None
) -> EmbeddedWorker:
    """Start the in-process worker and its reaper; ``.stop()`` the returned handle."""
    if not settings.embedded:
        raise ValueError("the in-process worker runs only on the embedded default")
    return EmbeddedWorker(settings, wsettings or get_worker_settings()).start()
