"""Turn a ``JobCreate`` body into the exact ``model`` / ``recipe`` JSON a worker will run.

All meaning is checked here with d4c_core's own validators (ModelSpec, parse_bits, Recipe,
check_method), then against the deployment's budget limits, so a job is rejected with a 422
naming the field before anything is stored. The recipe stored is ``Recipe.to_dict()`` of the
parsed object: the worker's ``Recipe.from_dict`` sees exactly what was validated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from app.api.problems import validation_problem
from app.core.config import Settings
from app.schemas import JobCreate
from d4c_core.errors import D4CError
from d4c_core.models import ModelSpec
from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe, parse_bits

SYNTH_METHODS = ("bns", "pse", "d4c")


@dataclass(frozen=True)
class ValidatedJob:
    model: dict[str, Any]
    recipe: dict[str, Any]
    eval_task: str | None


def request_hash(body: JobCreate) -> str:
    """sha256 of the canonical request, for Idempotency-Key comparison.

    An absent ``quant`` is left out rather than hashed as null, so bodies hash as they did
    before that field existed (keys stored then still match their replays).
    """
    data = body.model_dump(mode="json")
    if data.get("quant") is None:
        data.pop("quant", None)
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _check_method(arch: str, method: str) -> None:
    try:
        from d4c_core.calibration.towers import check_method
    except ImportError:  # older engine without synthesis baselines: Recipe rejects the method
        return
    check_method(arch, method)


def _eval_task_names() -> tuple[str, ...]:
    from d4c_core.testbed.tasks import tasks

    return tuple(tasks())


def validate_job(body: JobCreate, settings: Settings, checkpoint_arch: str | None) -> ValidatedJob:
    """Validate fully; raise a 422 ``Problem`` naming the first offending field.

    ``checkpoint_arch`` is the arch of the caller's checkpoint ``body.model.checkpoint_id``
    (looked up by the caller, None when there is no such checkpoint for this tenant).
    CPU-bound (open_clip registry lookups): call it from a worker thread.
    """
    m = body.model
    # --- model
    if m.pretrained is not None and m.checkpoint_id is not None:
        raise validation_problem("model", "give either pretrained or checkpoint_id, not both")
    try:
        ModelSpec(m.arch, pretrained=m.pretrained)
    except D4CError as e:
        field = (
            "model.pretrained" if "pretrained" in str(e) or "builtin" in str(e) else "model.arch"
        )
        raise validation_problem(field, str(e)) from None
    if m.checkpoint_id is not None:
        if checkpoint_arch is None:
            raise validation_problem("model.checkpoint_id", "no such checkpoint")
        if checkpoint_arch != m.arch:
            raise validation_problem(
                "model.checkpoint_id",
                f"checkpoint was uploaded for {checkpoint_arch}, not {m.arch}",
            )
        model = {"arch": m.arch, "checkpoint_id": m.checkpoint_id}
    else:
        model = {"arch": m.arch, "pretrained": m.pretrained}

    # --- bits
    bits = body.bits if isinstance(body.bits, str) else body.bits.model_dump()
    try:
        w, a = parse_bits(bits)
    except D4CError as e:
        raise validation_problem("bits", str(e)) from None

    # --- calibration
    c = body.calibration
    if c.method == "real":
        raise validation_problem(
            "calibration.method",
            "'real' calibration reads an image folder on the server and is not offered over "
            "HTTP; use noise, bns, pse or d4c (or run `d4c quantize --calib-dir` locally)",
        )
    synth: dict[str, Any] = {}
    for name, key in (
        ("synth_iters", "iters"),
        ("synth_batch", "batch"),
        ("per_batch_adam", "per_batch_adam"),
        ("components", "components"),
    ):
        value = getattr(c, name)
        if value is None:
            continue
        if c.method not in SYNTH_METHODS:
            raise validation_problem(
                f"calibration.{name}", f"applies only to methods {', '.join(SYNTH_METHODS)}"
            )
        if name == "components" and c.method != "d4c":
            raise validation_problem(f"calibration.{name}", "applies only to method d4c")
        synth[key] = list(value) if isinstance(value, list) else value
    cal: dict[str, Any] = {"method": c.method, "num_images": c.num_images}
    if c.num_prompts is not None:
        cal["num_prompts"] = c.num_prompts
    if synth:
        cal["synth"] = synth
    if body.prompts is not None:
        cal["classnames"] = body.prompts.classnames
        cal["templates"] = body.prompts.templates
    try:
        calibration = CalibrationRecipe.from_dict(cal)
    except D4CError as e:
        msg = str(e)
        if "template" in msg:
            field = "prompts.templates"
        elif "component" in msg.lower():
            field = "calibration.components"
        else:
            field = "calibration"
        raise validation_problem(field, msg) from None
    try:
        _check_method(m.arch, c.method)
    except D4CError as e:
        raise validation_problem("calibration.method", str(e)) from None

    quant: dict[str, Any] = {"weight_bits": w, "act_bits": a}
    if c.recon_iters is not None:
        quant["recon_iters"] = c.recon_iters
    if body.quant is not None:
        # QuantIn's fields are QuantRecipe's own names: mapped 1:1, omitted ones stay default.
        quant |= body.quant.model_dump(exclude_none=True)
    try:
        recipe = Recipe(seed=body.seed, quant=QuantRecipe.from_dict(quant), calibration=calibration)
    except D4CError as e:
        raise validation_problem("quant" if body.quant else "calibration", str(e)) from None

    # --- budgets (checked on the parsed recipe, so engine defaults count too)
    _budget("calibration.num_images", recipe.calibration.num_images, settings.max_images)
    _budget("calibration.recon_iters", recipe.quant.recon_iters, settings.max_recon_iters)
    _budget("calibration.num_prompts", recipe.calibration.num_prompts, settings.max_prompts)
    synth_recipe = getattr(recipe.calibration, "synth", None)
    if synth_recipe is not None and recipe.calibration.method in SYNTH_METHODS:
        _budget("calibration.synth_iters", synth_recipe.iters, settings.max_synth_iters)
    # Search sizes a client set. The engine's defaults are not held to these limits: range
    # init slices the calibration set (so it never uses more than num_images / num_prompts,
    # already budgeted), and a deployment that lowers max_images must still accept a job
    # that leaves them alone.
    if body.quant is not None:
        limits = {
            "range_init_images": settings.max_images,
            "range_init_prompts": settings.max_prompts,
            "recon_batch": settings.max_images,
            "mse_candidates": settings.max_mse_candidates,
            "mse_max_samples": settings.max_mse_samples,
        }
        for name, value in body.quant.model_dump(exclude_none=True).items():
            if name in limits:
                _budget(f"quant.{name}", value, limits[name])
    if body.prompts is not None:
        _budget("prompts.classnames", len(body.prompts.classnames), settings.max_prompts)
        _budget("prompts.templates", len(body.prompts.templates), settings.max_prompts)

    # --- evaluation task
    if body.eval_task is not None and body.eval_task not in _eval_task_names():
        raise validation_problem(
            "eval_task",
            f"unknown task {body.eval_task!r}; one of {', '.join(_eval_task_names())}",
        )
    return ValidatedJob(model=model, recipe=recipe.to_dict(), eval_task=body.eval_task)


def _budget(field: str, value: int, limit: int) -> None:
    if value > limit:
        raise validation_problem(field, f"{value} exceeds this deployment's limit of {limit}")
