"""worker/reaper.py: stale running jobs are requeued once, lost queued jobs re-sent."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest

from app.core.config import Settings
from app.db.models import Job, utcnow
from app.db.session import sync_sessionmaker
from tests.support.jobs import insert_job, job_row
from worker.reaper import Reaper

pytestmark = pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)


@pytest.fixture
def pg_url(private_pg_url: str) -> str:
    """The reaper sweeps the whole jobs table by design: rows other tests left in the session
    database would join its sweeps, so each test here gets a database of its own."""
    return private_pg_url


RECIPE = {"any": "thing"}


class Broker:
    """Records re-sends; ``depth`` is what the queue reports."""

    def __init__(self, depth: int = 0) -> None:
        self.sent: list[str] = []
        self.depth = depth
        self.lock = threading.Lock()

    def enqueue(self, job_id: str) -> bool:
        with self.lock:
            self.sent.append(job_id)
        return True


def _reaper(settings: Settings, broker: Broker, **knobs: object) -> Reaper:
    """A reaper on ``settings`` with some fields overridden (e.g. ``worker_max_attempts``)."""
    settings = settings.model_copy(update={"worker_requeue_queued_after_s": 5} | knobs)
    return Reaper(sync_sessionmaker(settings), settings, broker.enqueue, lambda: broker.depth)


def _ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def test_a_running_job_with_a_stale_heartbeat_is_requeued_once(settings: Settings) -> None:
    stale = insert_job(
        settings, RECIPE, state="running", worker="dead", attempts=1, heartbeat_at=_ago(120)
    )
    alive = insert_job(
        settings, RECIPE, state="running", worker="alive", attempts=1, heartbeat_at=_ago(1)
    )
    broker = Broker()
    sweep = _reaper(settings, broker).sweep()
    assert sweep.requeued == [stale] and broker.sent == [stale]
    row = job_row(settings, stale)
    assert (row.state, row.worker) == ("queued", None)
    assert job_row(settings, alive).state == "running"
    # Requeued just now: the next sweep leaves it to the message it was given.
    assert _reaper(settings, broker).sweep().requeued == []
    assert broker.sent == [stale]


def test_a_job_whose_worker_keeps_dying_is_failed(settings: Settings) -> None:
    job_id = insert_job(
        settings, RECIPE, state="running", worker="dead", attempts=3, heartbeat_at=_ago(120)
    )
    broker = Broker()
    assert _reaper(settings, broker, worker_max_attempts=3).sweep().failed == [job_id]
    row = job_row(settings, job_id)
    assert row.state == "failed" and row.error is not None
    assert row.error["type"] == "/problems/worker-lost"
    assert broker.sent == []


def test_a_stale_job_with_a_cancel_request_is_cancelled_not_requeued(settings: Settings) -> None:
    job_id = insert_job(
        settings,
        RECIPE,
        state="running",
        worker="dead",
        attempts=1,
        heartbeat_at=_ago(120),
        cancel_requested=True,
    )
    assert _reaper(settings, Broker()).sweep().cancelled == [job_id]
    assert job_row(settings, job_id).state == "cancelled"


def test_queued_jobs_the_broker_lost_are_resent(settings: Settings) -> None:
    old = insert_job(settings, RECIPE, created_at=_ago(60))
    new = insert_job(settings, RECIPE)
    busy = Broker(depth=1)  # the broker still holds a message for every old job: wait
    assert _reaper(settings, busy).sweep().resent == []
    lost = Broker(depth=0)
    assert _reaper(settings, lost).sweep().resent == [old]
    assert lost.sent == [old]
    assert job_row(settings, new).heartbeat_at is None
    assert _reaper(settings, lost).sweep().resent == []  # re-sent just now


def test_concurrent_reapers_requeue_a_job_only_once(settings: Settings) -> None:
    ids = [
        insert_job(
            settings, RECIPE, state="running", worker="dead", attempts=1, heartbeat_at=_ago(120)
        )
        for _ in range(5)
    ]
    broker = Broker()
    reapers = [_reaper(settings, broker) for _ in range(4)]
    barrier = threading.Barrier(len(reapers))

    def sweep(r: Reaper) -> None:
        barrier.wait()
        r.sweep()

    threads = [threading.Thread(target=sweep, args=(r,)) for r in reapers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(broker.sent) == sorted(ids)
    with sync_sessionmaker(settings)() as db:
        assert all(db.get(Job, i).state == "queued" for i in ids)  # type: ignore[union-attr]
