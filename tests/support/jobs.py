"""Jobs at test size: the engine's budgets cut to seconds on 2 shared cores, the ``POST /jobs``
body that asks for them, and job rows inserted or read directly (as ``POST /jobs`` and the
worker would), for tests that drive the worker without the API."""

from __future__ import annotations

import secrets
from typing import Any

from app.db.models import Job, Tenant
from app.db.session import sync_sessionmaker

JOB_TIMEOUT_S = 240
FINISHED = ("succeeded", "failed", "cancelled")
ARTIFACTS = ["calibration.png", "manifest.json", "model.safetensors", "report.json"]

# The engine's budgets at test size: seconds on 2 shared cores instead of minutes. Jobs sent
# over HTTP carry the same recipe (``job_body``).
TINY_QUANT: dict[str, Any] = {
    "recon_iters": 2,
    "range_init_images": 8,
    "range_init_prompts": 8,
    "mse_candidates": 10,
    "mse_max_samples": 16,
}
TINY_CALIBRATION: dict[str, Any] = {"method": "noise", "num_images": 8, "num_prompts": 8}


def tiny_recipe(**quant: Any) -> dict[str, Any]:
    """A test-sized ``Recipe.to_dict()`` (``quant`` overrides, e.g. ``recon_iters=200``)."""
    from d4c_core.recipe import Recipe

    return Recipe.from_dict(
        {"quant": TINY_QUANT | quant, "calibration": TINY_CALIBRATION}
    ).to_dict()


def job_body(recon_iters: int, seed: int = 0, exports: tuple[str, ...] = ()) -> dict[str, Any]:
    """A ``POST /jobs`` body for a test-sized d4c-tiny-vit W4A8 job on noise."""
    return {
        "model": {"arch": "d4c-tiny-vit", "pretrained": "builtin"},
        "recipe": {
            "seed": seed,
            "quant": TINY_QUANT | {"weight_bits": 4, "act_bits": 8, "recon_iters": recon_iters},
            "calibration": TINY_CALIBRATION,
            "exports": list(exports),
        },
    }


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
    """The job's row as committed now (a fresh session, so no stale identity map)."""
    with sync_sessionmaker(settings)() as db:
        job = db.get(Job, job_id)
        assert job is not None
        return job
