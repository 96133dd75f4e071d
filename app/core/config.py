"""Service settings, read once from the environment (prefix ``D4C_``).

Everything defaults to the embedded deployment (SQLite + a filesystem broker under one data
directory) so ``d4c serve`` works on a fresh machine; a real deployment only sets
``D4C_DATABASE_URL`` and ``D4C_BROKER_URL``. The API and the worker read the same object, so
the limits a client is validated against are the limits the worker enforces; the worker's own
tuning (``worker_*``, env ``D4C_WORKER_*``) lives here too, so there is one settings object.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Deployment configuration; every field can be set as ``D4C_<FIELD>``."""

    # populate_by_name: a field with an env alias (``broker_timeout_s``) is still settable by
    # its name in code.
    model_config = SettingsConfigDict(env_prefix="D4C_", extra="ignore", populate_by_name=True)

    data_dir: Path = Path("d4c-data")
    # None -> SQLite under data_dir (the embedded default).
    database_url: str | None = None
    # None -> kombu's filesystem transport under data_dir/broker (``embedded``; app/queue.py).
    broker_url: str | None = None

    # Limits a client cannot exceed; validated before anything is stored.
    max_active_jobs_per_tenant: int = 4
    max_upload_bytes: int = 2_000_000_000
    # Parameters of the architecture a job or upload names, counted without allocating
    # weights, before anything is built (API and worker). The default admits ViT-L-14
    # (427.6M) and refuses ViT-H-14 (986M) and ViT-bigG-14 (2.54B).
    max_model_params: int = 500_000_000
    # Bytes of uploaded checkpoints one tenant may keep stored at once (DELETE /models/{id}
    # frees them); an upload that would pass it is refused with 413 before it is kept.
    max_upload_bytes_per_tenant: int = Field(10_000_000_000, ge=0)
    # Any other request body (JSON); a job body is a few KB.
    max_json_bytes: int = 1_048_576
    max_images: int = 1024
    max_recon_iters: int = 20000
    max_synth_iters: int = 3000
    max_prompts: int = 2000
    # Range-init search sizes (``quant`` in a job body); 10x the engine's defaults.
    max_mse_candidates: int = 1000
    max_mse_samples: int = 5120
    job_time_limit_s: int = 6 * 3600
    heartbeat_s: float = 10
    stale_after_s: float = 60

    # Request line + headers, in bytes: a longer head is answered 431 before it is read
    # (app/server.py); 64 KiB is twice nginx's default (4 buffers of 8 KiB).
    max_header_bytes: int = 65536

    # Finished jobs' artifacts and work dirs are deleted this many days after they finished
    # (by the reaper in every worker; the job row stays as a tombstone). None keeps them.
    retention_days: float | None = Field(None, gt=0)

    # Seconds a broker connection attempt may take: readiness pings, queue depth, Redis
    # connects. (Also read from the older name ``D4C_WORKER_PING_TIMEOUT_S``.)
    broker_timeout_s: float = Field(
        2.0, validation_alias=AliasChoices("D4C_BROKER_TIMEOUT_S", "D4C_WORKER_PING_TIMEOUT_S")
    )

    # Worker tuning (``D4C_WORKER_*``): how a worker behaves, never what a client may ask for.
    # A job whose worker died this many times is failed instead of requeued again, so a job
    # that kills its worker (OOM, segfault) cannot loop forever.
    worker_max_attempts: int = 3
    # The reaper sweeps this often (None: every ``heartbeat_s``).
    worker_reaper_interval_s: float | None = None
    # A queued job nobody picked up for this long is re-sent if the broker holds fewer
    # messages than there are such jobs (a broker restarted without persistence).
    worker_requeue_queued_after_s: float = 30.0
    # Progress writes and cancel-flag reads are at most this frequent (they hit the DB).
    worker_progress_interval_s: float = 0.5
    worker_cancel_poll_s: float = 0.5
    # Extra seconds after the job time limit before Celery kills a stuck child process.
    worker_hard_limit_grace_s: float = 300.0
    # "auto": CUDA when available, else CPU.
    worker_device: str = "auto"

    # API tuning.
    api_key_cache_ttl_s: float = 30.0
    events_poll_s: float = 0.5
    log_level: str = "INFO"

    # GET /metrics (see app/metrics.py): on and unauthenticated by default, since it carries
    # counts and worker host names, never a tenant's data; a token makes Prometheus send
    # ``Authorization: Bearer <token>``; disabling removes the route.
    metrics_enabled: bool = True
    metrics_token: SecretStr | None = None

    @property
    def db_url(self) -> str:
        """The configured database URL, or the embedded SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'd4c.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def embedded(self) -> bool:
        """The embedded default: no broker configured, so messages go through kombu's
        filesystem transport under ``broker_dir`` and ``d4c serve`` runs the worker in its
        own process (``worker.inprocess``). This is the one meaning of "embedded"."""
        return self.broker_url is None

    @property
    def sqlite(self) -> bool:
        """The job database is a SQLite file (by default the one under ``data_dir``): local
        to this machine, so the commands that open it migrate it themselves; only a server
        database needs ``d4c db upgrade``."""
        return self.db_url.startswith("sqlite")

    def checkpoint_path(self, checkpoint_id: str) -> Path:
        """Where an uploaded checkpoint lives; the id is server-chosen, never a client string."""
        return self.checkpoints_dir / f"{checkpoint_id}.safetensors"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call ``get_settings.cache_clear()``)."""
    return Settings()
