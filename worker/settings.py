"""Knobs only the worker reads (prefix ``D4C_WORKER_``).

The shared ``app.core.config.Settings`` holds what API and worker must agree on (paths,
broker, heartbeat and staleness, the job time limit); these tune how the worker itself
behaves and never change what a client may ask for.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    """Every field can be set as ``D4C_WORKER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="D4C_WORKER_", extra="ignore")

    # A job whose worker died this many times is failed instead of requeued again, so a job
    # that kills its worker (OOM, segfault) cannot loop forever.
    max_attempts: int = 3
    # The reaper sweeps this often (None: every ``Settings.heartbeat_s``).
    reaper_interval_s: float | None = None
    # A queued job nobody picked up for this long is re-sent if the broker holds fewer
    # messages than there are such jobs (a broker restarted without persistence).
    requeue_queued_after_s: float = 30.0
    # Progress writes and cancel-flag reads are at most this frequent (they hit the DB).
    progress_interval_s: float = 0.5
    cancel_poll_s: float = 0.5
    # Extra seconds after the job time limit before Celery kills a stuck child process.
    hard_limit_grace_s: float = 300.0
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # Seconds a readiness ping of the broker may take.
    ping_timeout_s: float = 2.0


@lru_cache
def get_worker_settings() -> WorkerSettings:
    """The process-wide worker settings (cached; tests call ``cache_clear()``)."""
    return WorkerSettings()
