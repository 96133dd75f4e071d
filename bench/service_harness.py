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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import _paths  # noqa: F401  (the repository root on sys.path, for tests.support)
import httpx
import psycopg

from tests.support import pg, redisdb

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "D4C_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_HOST = os.environ.get("D4C_BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("D4C_BENCH_REDIS_PORT", "6379"))


class BenchError(RuntimeError):
    """A precondition of the benchmark failed (no PostgreSQL, server did not start, ...)."""


def _fail(reason: str) -> NoReturn:
    raise BenchError(reason)


def pg_admin_url() -> str:
    return pg.pg_admin_url(PG_ADMIN_URL, unavailable=_fail)


def pg_database(prefix: str = "d4c_bench") -> contextlib.AbstractContextManager[str]:
    """A throwaway PostgreSQL database (dropped afterwards)."""
    return pg.pg_database(pg_admin_url(), prefix)


def pg_version() -> str:
    with psycopg.connect(pg_admin_url()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def redis_database() -> contextlib.AbstractContextManager[str]:
    """A free Redis database index, marked with its own lock key; only its keys are deleted."""
    return redisdb.redis_database(
        "d4c:bench:lock", unavailable=_fail, host=REDIS_HOST, port=REDIS_PORT
    )


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
