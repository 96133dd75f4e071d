"""Request and response bodies of the HTTP API (pydantic v2).

A job's settings are the engine's own ``Recipe`` (validated by its declarations, errors named
by path); what depends on the model or the deployment (does the arch exist, is the method
valid for the tower, are the budgets within the limits) is decided by ``app.jobspec``, so the
API can never accept a job the engine would reject.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.db.models import ID_PATTERN, JobState
from d4c_core.recipe import Recipe


class _Strict(BaseModel):
    # Unknown fields are errors: a typo must not silently become a default. Strict types:
    # ``true`` or ``"10"`` for a number is an error, not a silently coerced value.
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelIn(_Strict):
    arch: str = Field(min_length=1, max_length=200, examples=["d4c-tiny-vit"])
    pretrained: str | None = Field(
        None, max_length=200, description='open_clip tag, or "builtin" for the shipped tiny models'
    )
    checkpoint_id: str | None = Field(
        None, max_length=64, pattern=ID_PATTERN, description="id returned by POST /models"
    )


class JobCreate(_Strict):
    """A job: which model, the recipe, and optionally a built-in task to score it on.

    ``recipe`` is the engine's ``Recipe`` itself, exactly the JSON an artifact's
    ``manifest.json`` stores: submitting a manifest's ``model`` and ``recipe`` reproduces
    that job. Omitted recipe fields take the engine's defaults.
    """

    model: ModelIn
    recipe: Recipe = Field(
        default_factory=Recipe,
        examples=[
            {
                "quant": {"weight_bits": 4, "act_bits": 8, "recon_iters": 200},
                "calibration": {"method": "noise", "num_images": 128},
            }
        ],
    )
    eval_task: str | None = Field(
        None,
        max_length=100,
        examples=["object10"],
        description="built-in zero-shot task: FP vs quantized accuracy in the job's metrics",
    )


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    state: JobState
    stage: str | None
    progress: float
    model: dict[str, Any]
    recipe: dict[str, Any]
    eval_task: str | None
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deleted_at: datetime | None = Field(
        None,
        description="when the job's artifacts were deleted (DELETE /jobs/{id} or the "
        "retention period); from then on its artifact routes answer 410",
    )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    size_bytes: int
    sha256: str


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    checkpoint_id: str = Field(validation_alias="id")
    arch: str
    sha256: str
    size_bytes: int
    created_at: datetime


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok"] = "ok"
    database: str
    broker: str
