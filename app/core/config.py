"""Service settings, read once from the environment (prefix ``D4C_``).

Everything defaults to the embedded deployment (SQLite + a filesystem broker under one data
directory) so ``d4c serve`` works on a fresh machine; a real deployment only sets
``D4C_DATABASE_URL`` and ``D4C_BROKER_URL``. The API and the worker read the same object, so
the limits a client is validated against are the limits the worker enforces.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Deployment configuration; every field can be set as ``D4C_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="D4C_", extra="ignore")

    data_dir: Path = Path("d4c-data")
    # None -> SQLite under data_dir (the embedded default).
    database_url: str | None = None
    # None -> kombu's filesystem transport under data_dir/broker (embedded; see worker/).
    broker_url: str | None = None

    # Limits a client cannot exceed; validated before anything is stored.
    max_active_jobs_per_tenant: int = 4
    max_upload_bytes: int = 2_000_000_000
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
        """True when no broker is configured: the API process also runs the worker."""
        return self.broker_url is None

    def checkpoint_path(self, checkpoint_id: str) -> Path:
        """Where an uploaded checkpoint lives; the id is server-chosen, never a client string."""
        return self.checkpoints_dir / f"{checkpoint_id}.safetensors"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call ``get_settings.cache_clear()``)."""
    return Settings()
