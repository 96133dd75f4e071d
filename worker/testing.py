"""Helpers for tests and benchmarks that run real workers: a throwaway PostgreSQL database, a
private Redis database, a ``d4c worker`` subprocess, job rows with test-sized recipes.

Shared machines run other people's Redis data: a test takes a numbered database that is
empty, marks it with a lock key (``SET NX``) so a parallel session cannot take the same one,
and afterwards deletes only that database's keys. Nothing here stops or flushes a server.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import redis
from sqlalchemy.engine import make_url

from app.db.models import Job, Tenant
from app.db.session import sync_sessionmaker

REDIS_HOST = os.environ.get("D4C_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("D4C_TEST_REDIS_PORT", "6379"))
# How a missing shared service surfaces: a skip in tests, an error in benchmarks.
Unavailable = Callable[[str], NoReturn]

# The engine's budgets at test size: seconds on 2 shared cores instead of minutes. Jobs sent
# over HTTP pass the same values as the body's ``quant`` object (``TINY_QUANT_HTTP``).
TINY_QUANT: dict[str, Any] = {
    "recon_iters": 2,
    "range_init_images": 8,
    "range_init_prompts": 8,
    "mse_candidates": 10,
    "mse_max_samples": 16,
}
TINY_QUANT_HTTP: dict[str, Any] = {k: v for k, v in TINY_QUANT.items() if k != "recon_iters"}
TINY_CALIBRATION: dict[str, Any] = {"method": "noise", "num_images": 8, "num_prompts": 8}


def tiny_recipe(**quant: Any) -> dict[str, Any]:
    """A test-sized ``Recipe.to_dict()`` (``quant`` overrides, e.g. ``recon_iters=200``)."""
    from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe

    return Recipe(
        quant=QuantRecipe(**(TINY_QUANT | quant)),
        calibration=CalibrationRecipe(**TINY_CALIBRATION),
    ).to_dict()


def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


def pg_admin_url(url: str, unavailable: Unavailable = _skip) -> str:
    """``url`` or the same with role ``root``: the one trust auth lets in (machines differ)."""
    for candidate in (url, url.replace("postgres@", "root@", 1)):
        try:
            with psycopg.connect(candidate, connect_timeout=3):
                return candidate
        except psycopg.OperationalError:
            continue
    unavailable(f"PostgreSQL is not reachable at {url} (as postgres or root)")


@contextlib.contextmanager
def pg_database(admin_url: str, prefix: str = "d4c_test") -> Iterator[str]:
    """Create ``<prefix>_<random>``; yield its SQLAlchemy URL (psycopg); drop it afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def redis_database(
    lock_key: str = "d4c:test:lock",
    unavailable: Unavailable = _skip,
    host: str = REDIS_HOST,
    port: int = REDIS_PORT,
) -> Iterator[str]:
    """Reserve an empty Redis database 1..15; yield its URL; delete its keys afterwards."""
    numbers = list(range(1, 16))
    random.shuffle(numbers)
    token = secrets.token_hex(8)
    for n in numbers:
        client = redis.Redis(host=host, port=port, db=n, socket_timeout=5)
        try:
            if client.dbsize() != 0 or not client.set(lock_key, token, nx=True, ex=3600):
                continue
        except redis.ConnectionError as e:
            unavailable(f"Redis is not reachable at {host}:{port}: {e}")
        try:
            yield f"redis://{host}:{port}/{n}"
        finally:
            if client.get(lock_key) == token.encode():
                for key in client.scan_iter(count=500):
                    if key != lock_key.encode():
                        client.delete(key)
                client.delete(lock_key)
        return
    unavailable(f"no free Redis database at {host}:{port}")


def service_env(
    data_dir: Path,
    database_url: str | None,
    broker_url: str | None,
    **extra: str,
) -> dict[str, str]:
    """Environment for a service subprocess: fast heartbeats and reaping, quiet threads."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("D4C_") or k.startswith("D4C_TEST")
    }
    env |= {
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "D4C_DATA_DIR": str(data_dir),
        "D4C_HEARTBEAT_S": "0.5",
        "D4C_STALE_AFTER_S": "4",
        "D4C_WORKER_REQUEUE_QUEUED_AFTER_S": "3",
        "D4C_WORKER_PROGRESS_INTERVAL_S": "0.2",
        "D4C_WORKER_CANCEL_POLL_S": "0.2",
    }
    if database_url:
        env["D4C_DATABASE_URL"] = database_url
    if broker_url:
        env["D4C_BROKER_URL"] = broker_url
    return env | extra


class Process:
    """A ``d4c ...`` subprocess with its output in a log file (shown when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "d4c_core.cli", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: kill() reaches the pool's children
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL the whole process group (a worker and its pool child)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def insert_job(
    settings: Any,
    recipe: dict[str, Any],
    *,
    arch: str = "d4c-tiny-vit",
    eval_task: str | None = None,
    **values: Any,
) -> str:
    """Insert a queued job row (and its tenant) directly, as ``POST /jobs`` would."""
    with sync_sessionmaker(settings)() as db, db.begin():
        tenant = Tenant(name=f"t-{secrets.token_hex(4)}")
        db.add(tenant)
        db.flush()
        job = Job(
            tenant_id=tenant.id,
            model={"arch": arch, "pretrained": "builtin"},
            recipe=recipe,
            eval_task=eval_task,
            request_hash=secrets.token_hex(32),
            **values,
        )
        db.add(job)
        db.flush()
        return job.id


def job_row(settings: Any, job_id: str) -> Job:
    with sync_sessionmaker(settings)() as db:
        job = db.get(Job, job_id)
        assert job is not None
        return job


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until ``predicate()`` is truthy; return its value; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
