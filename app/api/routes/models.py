"""/models: upload a CLIP checkpoint (safetensors only) for later jobs to quantize.

The body is the raw file (``application/octet-stream``), streamed to a server-named temp file
with a size cap and hashed on the way, then checked with d4c_core's own checks: it must parse
as safetensors (nothing is ever unpickled) and fit the named architecture exactly (names,
shapes, floating dtypes, finite values), checked without building the model. The arch's size
is checked against ``max_model_params`` before the body is read. Anything that fails leaves
neither a file nor a row behind.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from sqlalchemy import select

from app import crud
from app.api import quota
from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.problems import Problem, not_found, problem_responses, validation_problem
from app.core.config import Settings
from app.db.models import ACTIVE_STATES, ID_PATTERN, Checkpoint, Job, new_id, utcnow
from app.schemas import CheckpointOut
from d4c_core.errors import D4CError

# Malformed ids (NUL, slashes, ...) are a 422 before any query; well-formed unknown ones 404.
CheckpointIdPath = Annotated[str, PathParam(pattern=ID_PATTERN)]

router = APIRouter(prefix="/models", tags=["models"])
log = logging.getLogger("d4c.api.models")

ACCEPTED_TYPES = ("application/octet-stream", "application/vnd.safetensors")
# Checks run one at a time: each holds one tensor in memory and a core busy.
_check_limiter = anyio.CapacityLimiter(1)


def check_checkpoint(path: Path, arch: str) -> None:
    """Check ``path`` against ``arch`` (CheckpointError): safetensors header names, shapes and
    float dtypes against the meta-device model, then every tensor finite, read one at a time.
    Neither the model nor the file is materialized, so the request keeps no memory after it.
    """
    from d4c_core.models import check_checkpoint_file

    check_checkpoint_file(path, arch, "uploaded checkpoint")


def _too_large(cap: int) -> Problem:
    return Problem(413, "Content Too Large", f"checkpoint exceeds the upload limit of {cap} bytes")


async def _check_arch(arch: str, max_params: int | None) -> None:
    """422 for an arch open_clip does not know or one over the parameter budget. Sized on the
    meta device, before the body is read or anything is built, so a refused upload costs no
    transfer and no weight memory."""
    from d4c_core.models import ModelSpec, check_model_size

    try:
        ModelSpec(arch)
        await anyio.to_thread.run_sync(check_model_size, arch, max_params)
    except D4CError as e:
        raise validation_problem("arch", str(e)) from None


def _check_body_headers(request: Request, cap: int) -> str | None:
    """415 for anything but a raw file body, 413 for a declared length over ``cap``: both are
    answered from the headers, before a byte of the body is read. Returns the declared
    ``Content-Length`` (None when absent) for the quota check."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ACCEPTED_TYPES:
        raise Problem(
            415,
            "Unsupported Media Type",
            "send the .safetensors file as the raw body with Content-Type: "
            "application/octet-stream (not multipart)",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _too_large(cap)
    return declared


async def _receive_body(
    request: Request, tmp: Path, settings: Settings, used: int
) -> tuple[int, str]:
    """Stream the body into ``tmp``, hashing on the way; returns its size and sha256 hex.

    A declared length can lie (or be absent), so the upload cap and the tenant's quota are
    enforced on the bytes that actually arrive, cutting the stream as soon as either is
    passed. The caller removes ``tmp`` whatever happens.
    """
    cap = settings.max_upload_bytes
    digest = hashlib.sha256()
    size = 0
    async with await anyio.open_file(tmp, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise _too_large(cap)
            quota.check_streamed(settings, used, size)
            digest.update(chunk)
            await f.write(chunk)
    return size, digest.hexdigest()


async def _check_received_file(tmp: Path, arch: str, size: int) -> None:
    """422 for an empty body or a file that is not a safetensors checkpoint fitting ``arch``;
    the check runs in a thread, one at a time (``_check_limiter``)."""
    if size == 0:
        raise validation_problem("body", "empty upload")
    try:
        await anyio.to_thread.run_sync(check_checkpoint, tmp, arch, limiter=_check_limiter)
    except D4CError as e:
        raise validation_problem("body", str(e)) from None


@router.post(
    "",
    status_code=201,
    response_model=CheckpointOut,
    summary="Upload a safetensors checkpoint for an open_clip architecture",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
    responses=problem_responses(401, 413, 415, 422, 503),
)
async def upload_model(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant_id: TenantDep,
    settings: SettingsDep,
    arch: Annotated[str, Query(min_length=1, max_length=200, examples=["d4c-tiny-vit"])],
) -> Checkpoint:
    await _check_arch(arch, settings.max_model_params)
    declared = _check_body_headers(request, settings.max_upload_bytes)
    used = await quota.used_before_upload(request, tenant_id, settings, declared)

    checkpoint_id = new_id()
    folder = settings.checkpoints_dir
    await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = folder / f".upload-{checkpoint_id}.part"
    final = settings.checkpoint_path(checkpoint_id)
    try:
        size, sha256 = await _receive_body(request, tmp, settings, used)
        await _check_received_file(tmp, arch, size)
        await quota.reserve(session, tenant_id, settings, size)
        await anyio.Path(tmp).rename(final)
        row = Checkpoint(
            id=checkpoint_id,
            tenant_id=tenant_id,
            arch=arch,
            sha256=sha256,
            size_bytes=size,
            created_at=utcnow(),
        )
        session.add(row)
        await session.commit()
    except BaseException:
        # Whatever failed (bad file, client gone, DB down), keep nothing.
        await anyio.Path(tmp).unlink(missing_ok=True)
        await anyio.Path(final).unlink(missing_ok=True)
        raise
    response.headers["Location"] = f"/models/{checkpoint_id}"
    return row


@router.get(
    "/{checkpoint_id}",
    response_model=CheckpointOut,
    summary="An uploaded checkpoint's arch, size and sha256",
    responses=problem_responses(401, 404, 422, 503),
)
async def get_model(
    checkpoint_id: CheckpointIdPath, session: SessionDep, tenant_id: TenantDep
) -> Any:
    ck = await crud.get_checkpoint(session, tenant_id, checkpoint_id)
    if ck is None:
        raise not_found("checkpoint")
    return ck


async def _active_jobs_using(session: SessionDep, tenant_id: str, checkpoint_id: str) -> list[str]:
    """Ids of the tenant's queued or running jobs whose model is this checkpoint (a few)."""
    rows = await session.scalars(
        select(Job.id)
        .where(
            Job.tenant_id == tenant_id,
            Job.state.in_(ACTIVE_STATES),
            Job.model["checkpoint_id"].as_string() == checkpoint_id,
        )
        .order_by(Job.created_at)
        .limit(5)
    )
    return list(rows)


@router.delete(
    "/{checkpoint_id}",
    status_code=204,
    summary="Delete an uploaded checkpoint (frees its bytes of the tenant's upload quota)",
    responses={204: {"description": "Deleted"}, **problem_responses(401, 404, 409, 422, 503)},
)
async def delete_model(
    checkpoint_id: CheckpointIdPath,
    session: SessionDep,
    tenant_id: TenantDep,
    settings: SettingsDep,
) -> Response:
    """409 while a queued or running job of the tenant uses it: a worker reads the file when
    the job starts, and again when a requeued job resumes.

    Checked and deleted under the tenant lock ``POST /jobs`` takes, so a job submitted at the
    same moment is either seen here (409) or finds the checkpoint gone (422). The file goes
    before the row commits: a failed commit leaves a row whose retried DELETE finishes the
    job, where the other order could leave a file nothing points to, never freed. A job
    submitted with this id later is 422 "no such checkpoint".
    """
    await crud.lock_tenant(session, tenant_id)
    ck = await crud.get_checkpoint(session, tenant_id, checkpoint_id)
    if ck is None:
        raise not_found("checkpoint")
    users = await _active_jobs_using(session, tenant_id, ck.id)
    if users:
        raise Problem(
            409,
            "Conflict",
            f"checkpoint is used by queued or running jobs ({', '.join(users)}): cancel them "
            "or wait until they finish",
            type_="checkpoint-in-use",
        )
    await anyio.Path(settings.checkpoint_path(ck.id)).unlink(missing_ok=True)
    await session.delete(ck)
    await session.commit()
    log.info("checkpoint deleted", extra={"checkpoint_id": ck.id, "size_bytes": ck.size_bytes})
    return Response(status_code=204)
