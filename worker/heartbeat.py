"""A thread that keeps a job's heartbeat fresh while the pipeline computes.

Progress only moves between units, and one unit (or evaluation, or a long synthesis) can take
minutes; the reaper judges liveness by the heartbeat alone, so it must not depend on progress.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from worker.lease import Lease

log = logging.getLogger("d4c.worker.heartbeat")


class Heartbeat(threading.Thread):
    """Renews ``lease`` every ``interval_s``; sets ``lost`` when the claim is gone."""

    def __init__(self, lease: Lease, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{lease.job_id}", daemon=True)
        self.lease = lease
        self.interval_s = interval_s
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                alive = self.lease.heartbeat()
            except SQLAlchemyError:
                # The DB is down: keep computing; if it stays down past the staleness limit
                # the reaper hands the job on and the next successful beat reports it lost.
                log.warning("heartbeat failed", extra={"job_id": self.lease.job_id})
                continue
            if not alive:
                log.warning("claim lost", extra={"job_id": self.lease.job_id})
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
