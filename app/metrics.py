"""Prometheus metrics: ``GET /metrics`` (prometheus-client's exposition, no home-made format).

Where each series comes from, and why:

- **The job database, read at scrape time** — ``d4c_jobs{state}``, the stage-duration
  histogram ``d4c_job_stage_duration_seconds{stage}``, and the heartbeat ages. A deployment
  runs the API and any number of workers as separate processes (and containers); a worker's
  in-process Histogram would need every worker to be a scrape target, would live in the prefork
  child that runs the job (prometheus-client's multiprocess mode, a shared directory), and
  would vanish with a killed worker. The job row already holds what matters (``state``,
  ``heartbeat_at``, and on success ``metrics.timings``, the pipeline's per-stage seconds), so
  the API reports it: one scrape target sees the whole fleet, nothing is lost when a worker
  dies, and a restarted API reports the same numbers. Cost: three aggregate queries per scrape
  (the stage histogram scans succeeded jobs' JSON; fine for the job counts a GPU service
  produces at a 15-60 s scrape interval). With several API replicas every replica reports the
  same fleet-wide values: aggregate them with ``max``, not ``sum``.
- **The broker** — ``d4c_queue_depth``: messages waiting in the Celery queue (Redis ``LLEN``
  through kombu, so the embedded filesystem transport works too; ``app.queue.depth``, the
  same count the reaper reads). It is the broker's view;
  ``d4c_jobs{state="queued"}`` is the DB's. A gap between them is what the reaper repairs.
- **This API process** — ``d4c_http_request_duration_seconds{method,route,status}``, a
  Histogram observed by ``app.main.AccessLog``; labelled by the route *template*
  (``/jobs/{job_id}``), never the raw path, so job ids cannot explode its cardinality. It is
  per process: run one uvicorn process per container (as ``d4c serve`` does) and scale
  containers, not ``--workers``.

``d4c_metrics_source_up{source}`` says whether the DB and the broker answered this scrape; a
failed source drops its series instead of failing the scrape, so the API's own metrics are
still there while PostgreSQL is down.

``/metrics`` is unauthenticated by default (it carries counts and worker host names, never a
tenant's data) so any Prometheus can scrape it; set ``D4C_METRICS_TOKEN`` to require
``Authorization: Bearer <token>``, or ``D4C_METRICS_ENABLED=false`` to remove the route. It
is left out of the OpenAPI schema: it is an operator's endpoint, not part of the product API.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from sqlalchemy import Float, case, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.api.problems import Problem, problem_responses
from app.db.models import JOB_STATES, Job, utcnow
from app.queue import QUEUE
from d4c_core.vocabulary import STAGES

log = logging.getLogger("d4c.metrics")

# The pipeline's stages, as keys of ``report["timings"]``; the SQL aggregate is built once
# from them at import.
# Stages run from seconds (tiny models on a GPU) to hours (20k-iteration reconstruction).
STAGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SOURCE_TIMEOUT_S = 3.0
UNMATCHED_ROUTE = "unmatched"


@dataclass(frozen=True)
class AppMetrics:
    """The app's own collectors, in a registry per app (not prometheus-client's global one),
    so several apps in one process (the tests) never collide."""

    registry: CollectorRegistry
    http_latency: Histogram


def make_metrics() -> AppMetrics:
    registry = CollectorRegistry()
    http_latency = Histogram(
        "d4c_http_request_duration_seconds",
        "HTTP request latency by route template, method and status",
        ["method", "route", "status"],
        buckets=HTTP_BUCKETS,
        registry=registry,
    )
    ProcessCollector(registry=registry)
    return AppMetrics(registry, http_latency)


@dataclass
class StageStats:
    count: int
    total_s: float
    cumulative: list[int]  # jobs with the stage's duration <= each of STAGE_BUCKETS


@dataclass
class Snapshot:
    """What one scrape read from the job DB and the broker (None: the source failed)."""

    jobs_by_state: dict[str, int] | None = None
    stages: dict[str, StageStats] = field(default_factory=dict)
    # worker -> oldest heartbeat among its running jobs; per-job newest/oldest overall.
    oldest_beat_by_worker: dict[str, datetime] = field(default_factory=dict)
    oldest_beat: datetime | None = None
    newest_beat: datetime | None = None
    queue_depth: int | None = None
    now: datetime = field(default_factory=utcnow)


def _stage_columns() -> list[Any]:
    cols: list[Any] = []
    for stage in STAGES:
        seconds = Job.metrics[("timings", stage)].as_float()
        cols += [func.count(seconds), func.coalesce(func.sum(seconds), 0.0)]
        cols += [
            func.coalesce(func.sum(case((seconds <= literal(le, Float), 1), else_=0)), 0)
            for le in STAGE_BUCKETS
        ]
    return cols


async def read_db(session: AsyncSession, snap: Snapshot) -> None:
    """Fill ``snap`` from the job table: three aggregate queries, no rows transferred."""
    counts = dict.fromkeys(JOB_STATES, 0)
    rows = await session.execute(select(Job.state, func.count()).group_by(Job.state))
    for state, n in rows.all():
        counts[state] = int(n)

    beat = func.coalesce(Job.heartbeat_at, Job.started_at)
    rows = await session.execute(
        select(Job.worker, func.min(beat), func.max(beat))
        .where(Job.state == "running")
        .group_by(Job.worker)
    )
    for worker, oldest, newest in rows.all():
        if oldest is None:
            continue
        name = worker or "unknown"
        prev = snap.oldest_beat_by_worker.get(name)
        snap.oldest_beat_by_worker[name] = oldest if prev is None else min(prev, oldest)
        snap.oldest_beat = oldest if snap.oldest_beat is None else min(snap.oldest_beat, oldest)
        snap.newest_beat = newest if snap.newest_beat is None else max(snap.newest_beat, newest)

    row = (await session.execute(select(*_stage_columns()).where(Job.state == "succeeded"))).one()
    width = 2 + len(STAGE_BUCKETS)
    for i, stage in enumerate(STAGES):
        chunk = row[i * width : (i + 1) * width]
        snap.stages[stage] = StageStats(
            count=int(chunk[0]), total_s=float(chunk[1]), cumulative=[int(c) for c in chunk[2:]]
        )
    snap.jobs_by_state = counts


async def take_snapshot(
    sessions: async_sessionmaker[AsyncSession], queue_depth: Callable[[], int | None]
) -> Snapshot:
    """Read both sources, each bounded by ``SOURCE_TIMEOUT_S``; a failure only blanks its part."""
    snap = Snapshot()
    try:
        with anyio.fail_after(SOURCE_TIMEOUT_S):
            async with sessions() as session:
                await read_db(session, snap)
    except Exception as e:  # DB down or slow: report database_up 0, keep the scrape alive
        log.warning("metrics: job database unreadable", extra={"error": type(e).__name__})
        snap.jobs_by_state = None
    try:
        with anyio.fail_after(SOURCE_TIMEOUT_S):
            snap.queue_depth = await anyio.to_thread.run_sync(queue_depth, abandon_on_cancel=True)
    except Exception as e:
        log.warning("metrics: broker unreadable", extra={"error": type(e).__name__})
        snap.queue_depth = None
    return snap


def _age(now: datetime, then: datetime) -> float:
    return max(0.0, (now - then).total_seconds())


def snapshot_metrics(snap: Snapshot) -> Iterator[Metric]:
    """The DB- and broker-backed metric families for one scrape."""
    up = GaugeMetricFamily(
        "d4c_metrics_source_up",
        "1 when the source answered this scrape; its series are missing otherwise",
        labels=["source"],
    )
    up.add_metric(["database"], float(snap.jobs_by_state is not None))
    up.add_metric(["broker"], float(snap.queue_depth is not None))
    yield up

    if snap.queue_depth is not None:
        depth = GaugeMetricFamily(
            "d4c_queue_depth",
            "Job messages waiting in the broker queue (not those workers hold)",
            labels=["queue"],
        )
        depth.add_metric([QUEUE], float(snap.queue_depth))
        yield depth

    if snap.jobs_by_state is None:
        return
    jobs = GaugeMetricFamily("d4c_jobs", "Jobs in the job database by state", labels=["state"])
    for state, n in snap.jobs_by_state.items():
        jobs.add_metric([state], float(n))
    yield jobs

    stages = HistogramMetricFamily(
        "d4c_job_stage_duration_seconds",
        "Pipeline stage durations of succeeded jobs (from the job rows' metrics.timings)",
        labels=["stage"],
    )
    for stage, st in snap.stages.items():
        buckets = [(_le(le), float(c)) for le, c in zip(STAGE_BUCKETS, st.cumulative, strict=True)]
        buckets.append(("+Inf", float(st.count)))
        stages.add_metric([stage], buckets, st.total_s)
    yield stages

    per_worker = GaugeMetricFamily(
        "d4c_worker_heartbeat_age_seconds",
        "Age of the oldest heartbeat among each worker's running jobs",
        labels=["worker"],
    )
    for worker, oldest in sorted(snap.oldest_beat_by_worker.items()):
        per_worker.add_metric([worker], _age(snap.now, oldest))
    yield per_worker
    if snap.oldest_beat is not None and snap.newest_beat is not None:
        yield GaugeMetricFamily(
            "d4c_worker_heartbeat_age_max_seconds",
            "Oldest heartbeat age over running jobs (the reaper requeues past stale_after_s)",
            value=_age(snap.now, snap.oldest_beat),
        )
        yield GaugeMetricFamily(
            "d4c_worker_heartbeat_age_min_seconds",
            "Newest heartbeat age over running jobs",
            value=_age(snap.now, snap.newest_beat),
        )


def _le(bound: float) -> str:
    return repr(float(bound))


class _ScrapeRegistry(CollectorRegistry):
    """The app's registry plus this scrape's snapshot, rendered as one exposition."""

    def __init__(self, base: CollectorRegistry, extra: Iterable[Metric]) -> None:
        super().__init__(auto_describe=False)
        self._base = base
        self._extra = list(extra)

    def collect(self) -> Iterator[Metric]:
        yield from self._base.collect()
        yield from self._extra


router = APIRouter(tags=["ops"])


def _check_token(request: Request) -> None:
    token = request.app.state.settings.metrics_token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise Problem(
            401,
            "Unauthorized",
            "metrics need the configured bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics: jobs by state, stage durations, queue depth, HTTP latency",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {}}},
        **problem_responses(401),
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text format (or OpenMetrics when the scraper asks for it)."""
    _check_token(request)
    state = request.app.state
    snap = await take_snapshot(state.sessionmaker, state.queue_depth)
    encoder, content_type = choose_encoder(request.headers.get("accept"))
    body = encoder(_ScrapeRegistry(state.metrics.registry, snapshot_metrics(snap)))
    return Response(body, media_type=content_type)
