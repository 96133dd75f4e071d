"""Turn a ``JobCreate`` body into the exact ``model`` / ``recipe`` JSON a worker will run.

The recipe arrives already validated by its own declarations (``d4c_core.recipe``); what is
checked here needs the model or the deployment: d4c_core's ModelSpec and check_method, and the
budget caps the recipe declares. A job is rejected with a 422 naming the field by its path
before anything is stored. The recipe stored is ``Recipe.to_dict()`` of the parsed object: the
worker's ``Recipe.from_dict`` sees exactly what was validated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from app.api.problems import validation_problem
from app.core.config import Settings
from app.schemas import JobCreate
from d4c_core.calibration import check_method
from d4c_core.errors import D4CError
from d4c_core.models import BUILTIN_TAG, ModelSpec, check_model_size, check_weights_obtainable
from d4c_core.recipe import Budget, Recipe, field_metadata, walk_fields


@dataclass(frozen=True)
class ValidatedJob:
    model: dict[str, Any]
    recipe: dict[str, Any]
    eval_task: str | None


def request_hash(body: JobCreate) -> str:
    """sha256 of the canonical request (defaults filled in), for Idempotency-Key comparison."""
    canon = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _eval_task_names() -> tuple[str, ...]:
    from d4c_core.testbed.tasks import tasks

    return tuple(tasks())


def validate_job(body: JobCreate, settings: Settings, checkpoint_arch: str | None) -> ValidatedJob:
    """Validate what the recipe's own declarations cannot: the model, the method for its
    towers, the deployment's budgets, the task. Raise a 422 ``Problem`` naming the field.

    ``checkpoint_arch`` is the arch of the caller's checkpoint ``body.model.checkpoint_id``
    (looked up by the caller, None when there is no such checkpoint for this tenant).
    CPU-bound (open_clip registry lookups): call it from a worker thread.
    """
    model = _validate_model(body, settings, checkpoint_arch)
    recipe = body.recipe
    method = recipe.calibration.method
    if method == "real":
        raise validation_problem(
            "recipe.calibration.method",
            "'real' calibration reads an image folder on the server and is not offered over "
            "HTTP; use noise, bns, pse or d4c (or run `d4c quantize --calib-dir` locally)",
        )
    try:
        check_method(body.model.arch, method)
    except D4CError as e:
        raise validation_problem("recipe.calibration.method", str(e)) from None
    over = next(budget_violations(recipe, settings), None)
    if over is not None:
        path, value, limit = over
        raise validation_problem(
            f"recipe.{path}", f"{value} exceeds this deployment's limit of {limit}"
        )
    if body.eval_task is not None and body.eval_task not in _eval_task_names():
        raise validation_problem(
            "eval_task",
            f"unknown task {body.eval_task!r}; one of {', '.join(_eval_task_names())}",
        )
    return ValidatedJob(model=model, recipe=recipe.to_dict(), eval_task=body.eval_task)


def budget_violations(recipe: Recipe, settings: Settings) -> Iterator[tuple[str, int, int]]:
    """(path, value, limit) of each recipe field over its deployment cap ``max_<budget>``.

    The caps apply to the fields the recipe declares a ``Budget`` on, so a new costly field
    is capped by declaring it there. A list counts its length; an ``if_set`` field only when
    the client chose it (its default is sliced from an already capped set).
    """
    for path, owner, name in walk_fields(Recipe):
        budget = field_metadata(owner, name, Budget)
        if budget is None:
            continue
        *parents, _ = path.split(".")
        part: Any = recipe
        for p in parents:
            part = getattr(part, p)
        if budget.if_set and name not in part.model_fields_set:
            continue
        value = getattr(part, name)
        amount = len(value) if isinstance(value, tuple) else value
        limit = getattr(settings, f"max_{budget.name}")
        if amount > limit:
            yield path, amount, limit


def _validate_model(
    body: JobCreate, settings: Settings, checkpoint_arch: str | None
) -> dict[str, Any]:
    """The ``model`` JSON to store: the arch exists and fits the budget, and its weights
    (tag or the tenant's checkpoint of that arch) can be had."""
    m = body.model
    if m.pretrained is not None and m.checkpoint_id is not None:
        raise validation_problem("model", "give either pretrained or checkpoint_id, not both")
    try:
        ModelSpec(m.arch)
        # sized on the meta device (no weights); before anything else looks at the arch
        check_model_size(m.arch, settings.max_model_params)
    except D4CError as e:
        raise validation_problem("model.arch", str(e)) from None
    try:
        spec = ModelSpec(m.arch, pretrained=m.pretrained)
        if m.pretrained not in (None, BUILTIN_TAG):
            check_weights_obtainable(spec)
    except D4CError as e:
        raise validation_problem("model.pretrained", str(e)) from None
    if m.checkpoint_id is None:
        return {"arch": m.arch, "pretrained": m.pretrained}
    if checkpoint_arch is None:
        raise validation_problem("model.checkpoint_id", "no such checkpoint")
    if checkpoint_arch != m.arch:
        raise validation_problem(
            "model.checkpoint_id", f"checkpoint was uploaded for {checkpoint_arch}, not {m.arch}"
        )
    return {"arch": m.arch, "checkpoint_id": m.checkpoint_id}
