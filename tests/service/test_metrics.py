"""GET /metrics: the named series with the values a DB of known job rows implies.

The DB-backed series are asserted on a database holding exactly the rows this test wrote (a
fresh PostgreSQL database, or a fresh SQLite file), since the session's shared PostgreSQL
database also holds other tests' jobs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.db.migrate import upgrade
from app.db.models import Job, Tenant, utcnow
from app.db.session import make_sync_engine
from app.main import create_app
from tests.service.test_jobs_api import assert_problem
from worker.client import free_port

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """``{(sample name, labels): value}`` from a Prometheus text exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings on an empty, migrated database of its own."""
    common: dict[str, Any] = {"data_dir": tmp_path / "data", "broker_url": "memory://"}
    if request.param == "sqlite":
        s = Settings(**common)
        upgrade(s)
        yield s
        return
    yield Settings(database_url=request.getfixturevalue("private_pg_url"), **common)


TIMINGS_FAST = {
    "load": 0.5,
    "calibration": 3.0,
    "range_init": 20.0,
    "reconstruction": 100.0,
    "evaluation": 2.0,
    "export": 0.2,
}
TIMINGS_SLOW = {**TIMINGS_FAST, "load": 2.0, "reconstruction": 4000.0}


def seed_jobs(settings: Settings) -> None:
    """2 queued, 3 running (worker-a: beats 5 s and 40 s old; worker-b: 12 s), 3 succeeded
    (two with timings, one without), 1 failed, 0 cancelled."""
    now = utcnow()
    engine = make_sync_engine(settings)
    try:
        with Session(engine) as db, db.begin():
            tenant = Tenant(name=f"t-{secrets.token_hex(4)}")
            db.add(tenant)
            db.flush()

            def job(state: str, **values: Any) -> None:
                db.add(
                    Job(
                        tenant_id=tenant.id,
                        state=state,
                        model={"arch": "d4c-tiny-vit"},
                        recipe={},
                        request_hash="0" * 64,
                        **values,
                    )
                )

            job("queued")
            job("queued")
            job("running", worker="worker-a", heartbeat_at=now - timedelta(seconds=5))
            job("running", worker="worker-a", heartbeat_at=now - timedelta(seconds=40))
            job("running", worker="worker-b", heartbeat_at=now - timedelta(seconds=12))
            job("succeeded", metrics={"top1": 0.5, "timings": TIMINGS_FAST})
            job("succeeded", metrics={"top1": 0.4, "timings": TIMINGS_SLOW})
            job("succeeded", metrics=None)
            job("failed", error={"title": "boom"})
    finally:
        engine.dispose()


@pytest.fixture
async def metrics_client(fresh_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    seed_jobs(fresh_settings)
    app = create_app(
        fresh_settings, enqueue=lambda _: True, broker_ping=lambda: True, queue_depth=lambda: 7
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        yield c
    await app.state.engine.dispose()


async def test_db_backed_series(metrics_client: httpx.AsyncClient) -> None:
    r = await metrics_client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    s = parse(r.text)

    assert sample(s, "d4c_metrics_source_up", source="database") == 1
    assert sample(s, "d4c_metrics_source_up", source="broker") == 1
    assert sample(s, "d4c_queue_depth", queue="d4c.jobs") == 7
    expected = {"queued": 2, "running": 3, "succeeded": 3, "failed": 1, "cancelled": 0}
    for state, n in expected.items():
        assert sample(s, "d4c_jobs", state=state) == n, state

    # Stage durations: only the two succeeded jobs that carry timings.
    h = "d4c_job_stage_duration_seconds"
    assert sample(s, h + "_count", stage="load") == 2
    assert sample(s, h + "_sum", stage="load") == pytest.approx(2.5)
    assert sample(s, h + "_bucket", stage="load", le="1.0") == 1
    assert sample(s, h + "_bucket", stage="load", le="5.0") == 2
    assert sample(s, h + "_bucket", stage="load", le="+Inf") == 2
    assert sample(s, h + "_sum", stage="reconstruction") == pytest.approx(4100.0)
    assert sample(s, h + "_bucket", stage="reconstruction", le="60.0") == 0
    assert sample(s, h + "_bucket", stage="reconstruction", le="120.0") == 1
    assert sample(s, h + "_bucket", stage="reconstruction", le="3600.0") == 1
    assert sample(s, h + "_bucket", stage="reconstruction", le="7200.0") == 2
    assert sample(s, h + "_count", stage="export") == 2

    # Heartbeats: per worker, its oldest running job's beat; max/min over running jobs.
    tol = 5.0  # slow shared CPUs between seeding and scraping
    age = "d4c_worker_heartbeat_age_seconds"
    assert 40 <= sample(s, age, worker="worker-a") < 40 + tol
    assert 12 <= sample(s, age, worker="worker-b") < 12 + tol
    assert 40 <= sample(s, "d4c_worker_heartbeat_age_max_seconds") < 40 + tol
    assert 5 <= sample(s, "d4c_worker_heartbeat_age_min_seconds") < 5 + tol


async def test_http_latency_by_route_template(metrics_client: httpx.AsyncClient) -> None:
    job_id = secrets.token_hex(16)
    for _ in range(2):
        assert (await metrics_client.get("/healthz")).status_code == 200
    r = await metrics_client.get(f"/jobs/{job_id}")  # no key: 401, but the route matched
    assert r.status_code == 401
    assert (await metrics_client.get(f"/no/such/{job_id}")).status_code == 404

    text = (await metrics_client.get("/metrics")).text
    assert job_id not in text  # raw paths never become labels
    s = parse(text)
    h = "d4c_http_request_duration_seconds"
    assert sample(s, h + "_count", method="GET", route="/healthz", status="200") == 2
    assert sample(s, h + "_count", method="GET", route="/jobs/{job_id}", status="401") == 1
    assert sample(s, h + "_count", method="GET", route="unmatched", status="404") == 1
    assert "process_cpu_seconds_total" in names(s)


async def test_sources_down_keep_the_scrape_alive(tmp_path: Path) -> None:
    """DB and broker unreachable: still 200, source_up says 0, their series are absent."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nope",
    )

    def broker_down() -> int:
        raise ConnectionRefusedError("broker down")

    app = create_app(
        settings, enqueue=lambda _: None, broker_ping=lambda: False, queue_depth=broker_down
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/metrics")
    await app.state.engine.dispose()
    assert r.status_code == 200, r.text
    s = parse(r.text)
    assert sample(s, "d4c_metrics_source_up", source="database") == 0
    assert sample(s, "d4c_metrics_source_up", source="broker") == 0
    assert not names(s) & {"d4c_jobs", "d4c_queue_depth", "d4c_worker_heartbeat_age_seconds"}
    assert "d4c_http_request_duration_seconds_count" in names(s)


async def test_token_and_disable_flag(tmp_path: Path) -> None:
    base: dict[str, Any] = {"data_dir": tmp_path, "broker_url": "memory://"}
    for settings, checks in (
        (Settings(metrics_token="s3cret", **base), "token"),
        (Settings(metrics_enabled=False, **base), "disabled"),
    ):
        upgrade(settings)
        app = create_app(settings, enqueue=lambda _: None, queue_depth=lambda: 0)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as c:
            if checks == "token":
                assert_problem(await c.get("/metrics"), 401)
                bad = {"Authorization": "Bearer nope"}
                assert_problem(await c.get("/metrics", headers=bad), 401)
                ok = await c.get("/metrics", headers={"Authorization": "Bearer s3cret"})
                assert ok.status_code == 200 and "d4c_jobs" in ok.text
            else:
                assert (await c.get("/metrics")).status_code == 404
            # Documented exactly when it is served.
            paths = (await c.get("/openapi.json")).json()["paths"]
            assert ("/metrics" in paths) == (checks == "token")
        await app.state.engine.dispose()


def _redis_url() -> str | None:
    import redis

    url = os.environ.get("D4C_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return None
    return url


def test_queue_depth_reads_the_redis_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default probe: kombu's view of the Celery queue on a real Redis."""
    import redis

    url = _redis_url()
    if url is None:
        pytest.skip("Redis at 127.0.0.1:6379 is not reachable")
    from app.queue import QUEUE, depth, send

    monkeypatch.setenv("D4C_BROKER_URL", url)
    get_settings.cache_clear()
    r = redis.Redis.from_url(url)
    r.delete(QUEUE)
    try:
        assert depth() == 0
        for i in range(3):
            assert send(f"job-{i}")
        assert depth() == 3
    finally:
        r.delete(QUEUE)


async def test_access_log_quiet_for_successful_reads_only(
    client: httpx.AsyncClient, tenant: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Polls are counted in the histogram, not logged; writes, errors and slow requests are
    logged (the policy that keeps the poll path cheap without losing an event)."""
    from tests.service.conftest import TINY_JOB

    caplog.set_level("INFO", logger="d4c.access")
    job = (await client.post("/jobs", json=TINY_JOB, headers=tenant.headers)).json()
    assert (await client.get(f"/jobs/{job['id']}", headers=tenant.headers)).status_code == 200
    assert (await client.get("/jobs/" + "0" * 32, headers=tenant.headers)).status_code == 404
    lines = [(r.method, r.status) for r in caplog.records if r.name == "d4c.access"]  # type: ignore[attr-defined]
    assert lines == [("POST", 202), ("GET", 404)]
    samples = parse((await client.get("/metrics")).text)
    get_ok = sample(
        samples,
        "d4c_http_request_duration_seconds_count",
        method="GET",
        route="/jobs/{job_id}",
        status="200",
    )
    assert get_ok == 1.0


async def test_access_log_logs_everything_without_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from app.main import AccessLog

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def noop(message: Any) -> None:
        return None

    caplog.set_level("INFO", logger="d4c.access")
    scope = {"type": "http", "method": "GET", "path": "/jobs/x"}
    await AccessLog(ok, histogram=None)(scope, noop, noop)  # type: ignore[arg-type]
    assert [r.status for r in caplog.records if r.name == "d4c.access"] == [200]  # type: ignore[attr-defined]
