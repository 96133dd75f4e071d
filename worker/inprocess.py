"""The in-process worker ``d4c serve`` runs on the embedded default (``Settings.embedded``: no
broker configured, so no Redis and no second process): a Celery worker with the solo pool on
the filesystem transport, in a thread of the API process, plus the reaper.

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
from app.queue import QUEUE
from worker.celery_app import celery_app
from worker.reaper import ReaperThread, start_reaper

log = logging.getLogger("d4c.worker.inprocess")


class InProcessWorker:
    """Handle of a running in-process worker; ``stop()`` ends it."""

    def __init__(self, settings: Settings) -> None:
        from worker import tasks

        self._tasks = tasks
        self.ready = threading.Event()
        self.hostname = f"d4c-inprocess-{os.getpid()}@{socket.gethostname()}"
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
        self.thread = threading.Thread(target=self._run, name="d4c-inprocess-worker", daemon=True)
        self.reaper: ReaperThread = start_reaper(settings)

    def _on_ready(self, consumer: Any) -> None:
        self.controller.on_consumer_ready(consumer)
        self.ready.set()

    def _run(self) -> None:
        self._tasks.warm_up()
        self.controller.start()

    def start(self) -> InProcessWorker:
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
            log.warning("in-process worker did not stop in time")
        self.reaper.stop()
        self._tasks.STOPPING.clear()
        self._tasks.WORKER_ID = None


def start_worker_thread(settings: Settings) -> InProcessWorker:
    """Start the in-process worker and its reaper; ``.stop()`` the returned handle."""
    if not settings.embedded:
        raise ValueError("the in-process worker runs only on the embedded default (no broker)")
    return InProcessWorker(settings).start()
