"""Service test fixtures: a throwaway PostgreSQL database per session, SQLite per test, an app
with a recording queue, and tenants with API keys.

PostgreSQL: 127.0.0.1:5432, trust auth; a database ``d4c_test_<random>`` is created, migrated
once and dropped at the end (tests isolate by creating their own tenants, so no truncation).
Set ``D4C_TEST_PG_ADMIN_URL`` to use another server.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import pytest
from sqlalchemy import update

from app.cli import create_key
from app.core.config import Settings, get_settings
from app.db.migrate import upgrade
from app.db.models import Job
from app.db.session import make_sync_engine
from app.main import create_app
from tests.support.pg import pg_admin_url, pg_database
from tests.support.redisdb import redis_database
from tests.support.stack import ServiceStack

PG_ADMIN_URL = os.environ.get("D4C_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_admin() -> str:
    return pg_admin_url(PG_ADMIN_URL)


@contextlib.contextmanager
def migrated_pg_database(admin_url: str) -> Iterator[str]:
    with pg_database(admin_url) as url:
        upgrade(Settings(database_url=url))
        yield url


@pytest.fixture(scope="session")
def pg_url(pg_admin: str) -> Iterator[str]:
    """A migrated PostgreSQL database for the whole session (dropped at the end)."""
    with migrated_pg_database(pg_admin) as url:
        yield url


@pytest.fixture(scope="module")
def module_pg_url(pg_admin: str) -> Iterator[str]:
    """A migrated PostgreSQL database for one module, for a module whose workers sweep whole
    tables (its reaper would pick up jobs other modules left queued)."""
    with migrated_pg_database(pg_admin) as url:
        yield url


@pytest.fixture
def private_pg_url(pg_admin: str) -> Iterator[str]:
    """A migrated PostgreSQL database for one test, for code that sweeps whole tables (a
    module overrides ``pg_url`` with it)."""
    with migrated_pg_database(pg_admin) as url:
        yield url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _fresh_settings_cache() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(params=["postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which database a test runs on; parametrize indirectly to add "sqlite"."""
    return str(request.param)


@pytest.fixture
def settings(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on a fresh data dir; PostgreSQL (shared session DB) or a migrated SQLite file."""
    common: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "broker_url": "memory://",
        "max_active_jobs_per_tenant": 100,
        "events_poll_s": 0.05,
    }
    if backend == "postgresql":
        return Settings(database_url=request.getfixturevalue("pg_url"), **common)
    s = Settings(**common)
    upgrade(s)
    return s


@dataclass
class Queue:
    """Stands in for app.queue.send: records what the API sent."""

    sent: list[str] = field(default_factory=list)

    def __call__(self, job_id: str) -> bool:
        self.sent.append(job_id)
        return True


@pytest.fixture
def queue() -> Queue:
    return Queue()


@pytest.fixture
def broker_up() -> dict[str, bool]:
    return {"up": True}


@pytest.fixture
async def client(
    settings: Settings, queue: Queue, broker_up: dict[str, bool]
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, enqueue=queue, broker_ping=lambda: broker_up["up"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c
    await app.state.engine.dispose()


@dataclass
class Tenant:
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def make_tenant(settings: Settings) -> Callable[[], Tenant]:
    def make() -> Tenant:
        name = f"t-{secrets.token_hex(4)}"
        return Tenant(name, create_key(name, settings))

    return make


@pytest.fixture
def tenant(make_tenant: Callable[[], Tenant]) -> Tenant:
    return make_tenant()


@pytest.fixture
def db(settings: Settings) -> Iterator[Any]:
    """A sync engine on the test database, for arranging and asserting rows directly."""
    engine = make_sync_engine(settings)
    yield engine
    engine.dispose()


def set_job(engine: Any, job_id: str, **values: Any) -> None:
    """Move a job along as a worker would (state, progress, ...)."""
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(**values))


TINY_JOB: dict[str, Any] = {
    "model": {"arch": "d4c-tiny-vit", "pretrained": "builtin"},
    "recipe": {
        "seed": 0,
        "quant": {"weight_bits": 4, "act_bits": 8, "recon_iters": 10},
        "calibration": {"method": "noise", "num_images": 8},
    },
    "eval_task": "object10",
}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item (``item.rep_call``), so a fixture can show
    its subprocesses' logs only when the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ServiceStack]]:
    stacks: list[ServiceStack] = []

    def make(database_url: str | None, broker_url: str | None, **env: str) -> ServiceStack:
        stack = ServiceStack(tmp_path / f"stack{len(stacks)}", database_url, broker_url, **env)
        stacks.append(stack)
        return stack

    yield make
    report = getattr(request.node, "rep_call", None)
    for stack in stacks:
        stack.close(failed=report is None or report.failed)


@pytest.fixture
def record() -> Callable[..., None]:
    """Record a figure a test measured (printed; appended as a JSON line to
    ``$D4C_BENCH_RECORD`` when set, which is how ``bench/faults.py`` collects them)."""

    def rec(case: str, measure: str, value: float, unit: str = "s") -> None:
        print(f"{case}: {measure} {value:.1f} {unit}")
        path = os.environ.get("D4C_BENCH_RECORD")
        if path:
            row = {"case": case, "measure": measure, "value": value, "unit": unit}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return rec


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A private database on the shared Redis, for one test."""
    with redis_database("d4c:test:stack") as url:
        yield url
