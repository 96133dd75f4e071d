"""``d4c`` subprocesses with their output in a log file, the environment a service subprocess
runs under, and polling: what every test that starts a real server or worker needs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# How a missing shared service surfaces: a skip in tests, an error in benchmarks.
Unavailable = Callable[[str], NoReturn]


def skip(reason: str) -> NoReturn:
    """Skip the current test (the default ``Unavailable``); pytest is imported only here so
    benchmarks that pass their own ``unavailable`` never need it."""
    import pytest

    pytest.skip(reason)


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


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until ``predicate()`` is truthy; return its value; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
