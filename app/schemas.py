"""Request and response bodies of the HTTP API (pydantic v2).

The request models check shape and types only; meaning (does the arch exist, is the method
valid for the tower, are the budgets within the deployment's limits) is decided by
``app.jobspec`` with d4c_core's own validators, so the API can never accept a job the engine
would reject.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
CalibMethod = Literal["noise", "real", "bns", "pse", "d4c"]
Component = Literal["pgsi", "scg", "pae"]

# Server-chosen ids (uuid4 hex; the storage layout allows this wider set). Anything else is
# refused before it reaches a query: PostgreSQL rejects NUL in text, which would otherwise
# surface as a database error.
ID_PATTERN = r"^[0-9A-Za-z_-]{1,64}$"
# A prompt is stored in the job's JSON recipe: no control characters (PostgreSQL's JSONB
# refuses \u0000), and a bounded length.
PromptText = Annotated[str, Field(max_length=1000, pattern=r"^[^\x00-\x1f\x7f]*$")]


class _Strict(BaseModel):
    # Unknown fields are errors: a typo must not silently become a default.
    model_config = ConfigDict(extra="forbid")


class ModelIn(_Strict):
    arch: str = Field(min_length=1, max_length=200, examples=["d4c-tiny-vit"])
    pretrained: str | None = Field(
        None, max_length=200, description='open_clip tag, or "builtin" for the shipped tiny models'
    )
    checkpoint_id: str | None = Field(
        None, max_length=64, pattern=ID_PATTERN, description="id returned by POST /models"
    )


class BitsIn(_Strict):
    weights: int
    activations: int


class CalibrationIn(_Strict):
    method: CalibMethod = "noise"
    num_images: int = Field(128, ge=1)
    num_prompts: int | None = Field(None, ge=1)
    components: list[Component] | None = Field(
        None, description="D4C ablation (d4c only); pgsi is always on"
    )
    synth_iters: int | None = Field(None, ge=0, description="bns/pse/d4c synthesis iterations")
    synth_batch: int | None = Field(None, ge=1)
    per_batch_adam: bool | None = None
    recon_iters: int | None = Field(None, ge=0, description="AdaRound/LSQ iterations per unit")


class PromptsIn(_Strict):
    classnames: list[PromptText] = Field(default_factory=list)
    templates: list[PromptText] = Field(default_factory=list, examples=[["a photo of a {c}."]])


class QuantIn(_Strict):
    """Engine search sizes (``d4c_core.recipe.QuantRecipe`` fields of the same names).

    Omitted fields keep the engine's reference defaults. They exist so a client can size a
    job to its hardware (a test-sized job spends most of its time in range init otherwise);
    upper limits come from the deployment's settings and are checked in ``app.jobspec``.
    Strict types: ``true`` or ``"8"`` is an error, not a silently coerced size.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    range_init_images: int | None = Field(
        None, ge=1, description="calibration images the range-init MSE search runs on"
    )
    range_init_prompts: int | None = Field(
        None, ge=1, description="calibration prompts the range-init MSE search runs on"
    )
    mse_max_samples: int | None = Field(
        None, ge=1, description="values per row the range search scores on"
    )
    mse_candidates: int | None = Field(None, ge=1, description="candidate ranges per tensor")
    recon_batch: int | None = Field(None, ge=1, description="AdaRound/LSQ mini-batch size")
    text_mlp_bits: int | None = Field(
        None, ge=2, le=8, description="bits of the text-encoder MLPs (weights and activations)"
    )


class JobCreate(_Strict):
    model: ModelIn
    bits: str | BitsIn = Field("w4a8", examples=["w4a8", {"weights": 4, "activations": 8}])
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    quant: QuantIn | None = None
    prompts: PromptsIn | None = None
    eval_task: str | None = Field(None, max_length=100, examples=["object10"])
    seed: int = Field(0, ge=0, lt=2**31)


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
