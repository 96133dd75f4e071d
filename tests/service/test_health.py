"""/healthz, /readyz, and 503 problem+json (never a traceback) when the DB is unreachable."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from app.main import create_app
from tests.service.conftest import TINY_JOB, Tenant
from tests.service.test_jobs_api import assert_problem
from worker.client import free_port

pytestmark = pytest.mark.anyio


async def test_healthz_and_readyz(client: httpx.AsyncClient, broker_up: dict[str, bool]) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "database": "ok", "broker": "ok"}
    broker_up["up"] = False
    p = assert_problem(await client.get("/readyz"), 503)
    assert "broker: unreachable" in p["detail"]


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "postgresql"])
async def test_database_down_is_503(tmp_path: Path, tenant: Tenant, scheme: str) -> None:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path, database_url=f"{scheme}://postgres@127.0.0.1:{port}/nope"
    )
    app = create_app(settings, enqueue=lambda _: None, broker_ping=lambda: True)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        assert (await c.get("/healthz")).status_code == 200  # the process itself is fine
        for method, path in (("GET", "/jobs/" + "0" * 32), ("GET", "/jobs"), ("POST", "/jobs")):
            r = await c.request(method, path, json=TINY_JOB, headers=tenant.headers)
            p = assert_problem(r, 503)
            assert "Traceback" not in r.text and p["type"].endswith("/unavailable")
            assert r.headers["retry-after"]
        p = assert_problem(await c.get("/readyz"), 503)
        assert p["detail"].startswith("database: unreachable")
    await app.state.engine.dispose()
