"""Shared plumbing of the service benchmarks (``api_load.py``, ``service_overhead.py``).

Both benchmarks run the service the way it is deployed: separate processes (``d4c serve``,
``d4c worker``, the load generator), a throwaway PostgreSQL database and a free Redis database
index. Everything here cleans up after itself and touches nothing it did not create: the
database is dropped, only the keys of the Redis index it reserved are deleted (never FLUSHALL),
and only the process groups it started are signalled.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "D4C_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_HOST = os.environ.get("D4C_BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("D4C_BENCH_REDIS_PORT", "6379"))
_REDIS_LOCK_KEY = "d4c:bench:lock"


class BenchError(RuntimeError):
    """A precondition of the benchmark failed (no PostgreSQL, server did not start, ...)."""


def pg_admin_url() -> str:
    """A URL of the server's maintenance database: role ``postgres``, else ``root``
    (machines differ in which superuser trust auth lets in)."""
    for url in (PG_ADMIN_URL, PG_ADMIN_URL.replace("postgres@", "root@", 1)):
        try:
            with psycopg.connect(url, connect_timeout=3):
                return url
        except psycopg.OperationalError:
            continue
    raise BenchError(f"PostgreSQL is not reachable at {PG_ADMIN_URL} (as postgres or root)")


@contextlib.contextmanager
def pg_database(prefix: str = "d4c_bench") -> Iterator[str]:
    """Create ``<prefix>_<random>``; yield its SQLAlchemy URL (psycopg); drop it afterwards."""
    admin = pg_admin_url()
    name = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_version() -> str:
    with psycopg.connect(pg_admin_url()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """Reserve an empty Redis database index 1..15 (marked with a ``SET NX`` lock key so a
    parallel run cannot take it); yield its URL; afterwards delete only that index's keys."""
    import redis

    for n in range(15, 0, -1):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=n, socket_timeout=5)
        token = secrets.token_hex(8)
        try:
            if client.dbsize() != 0 or not client.set(_REDIS_LOCK_KEY, token, nx=True, ex=3600):
                continue
        except redis.ConnectionError as e:
            raise BenchError(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}: {e}") from e
        try:
            yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{n}"
        finally:
            if client.get(_REDIS_LOCK_KEY) == token.encode():
                for key in client.scan_iter(count=500):
                    if key != _REDIS_LOCK_KEY.encode():
                        client.delete(key)
                client.delete(_REDIS_LOCK_KEY)
        return
    raise BenchError(f"no empty Redis database index at {REDIS_HOST}:{REDIS_PORT}")


def service_env(**d4c: str | Path) -> dict[str, str]:
    """This environment minus any ``D4C_*`` the caller had set, plus ``d4c`` as
    ``D4C_<KEY>`` variables: a benchmark must not pick up someone's deployment settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("D4C_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.update({f"D4C_{k.upper()}": str(v) for k, v in d4c.items()})
    return env


def d4c_cmd(*args: str) -> list[str]:
    """``d4c ARGS`` through this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "d4c_core.cli", *args]


def run_d4c(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run a ``d4c`` command to completion; return its stdout; raise with its stderr."""
    out = subprocess.run(
        d4c_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"d4c {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


def create_key(env: dict[str, str], tenant: str) -> str:
    """``d4c keys create --tenant T``: the key is the last line of stdout."""
    return run_d4c(env, "keys", "create", "--tenant", tenant).strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A subprocess in its own process group, output to a log file; ``stop()`` signals only
    that group (a ``d4c worker`` and its pool child), never anything by name."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def wait_http(url: str, proc: Proc, timeout: float = 240.0) -> None:
    """Poll ``url`` until it answers 200. The timeout is generous: the API imports torch
    (through the engine's validators) and the machine may be busy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.args} exited {proc.proc.returncode}:\n{proc.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise BenchError(f"{url} not ready after {timeout:.0f} s:\n{proc.log_tail()}")


def git_rev() -> str:
    """``<short sha>`` plus ``+dirty`` when the working tree differs from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{sha}+dirty" if dirty else sha or "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine_lines() -> list[str]:
    """The header every results section starts with: what ran where, when, and how busy the
    machine was (2 shared cores make load the first suspect of a bad number)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}; git rev: `{git_rev()}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}",
        f"- load average at start (1/5/15 min): {load_average()}",
    ]


def write_section(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"(written to {path})", file=sys.stderr)
