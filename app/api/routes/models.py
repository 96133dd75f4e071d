"""/models: upload a CLIP checkpoint (safetensors only) for later jobs to quantize.

The body is the raw file (``application/octet-stream``), streamed to a server-named temp file
with a size cap and hashed on the way, then checked with d4c_core's own loader: it must parse
as safetensors (nothing is ever unpickled) and load strictly into the named architecture.
Anything that fails leaves neither a file nor a row behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam

from app import crud
from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.problems import Problem, not_found, problem_responses, validation_problem
from app.db.models import Checkpoint, new_id, utcnow
from app.schemas import ID_PATTERN, CheckpointOut
from d4c_core.errors import D4CError

# Malformed ids (NUL, slashes, ...) are a 422 before any query; well-formed unknown ones 404.
CheckpointIdPath = Annotated[str, PathParam(pattern=ID_PATTERN)]

router = APIRouter(prefix="/models", tags=["models"])

ACCEPTED_TYPES = ("application/octet-stream", "application/vnd.safetensors")
# One checkpoint is held in memory while it is checked; more at once could exhaust RAM.
_check_limiter = anyio.CapacityLimiter(1)


def check_checkpoint(path: Path, arch: str) -> None:
    """Parse ``path`` as safetensors and load it strictly into ``arch`` (CheckpointError)."""
    from d4c_core.models import create_architecture, load_state_into, read_checkpoint

    state = read_checkpoint(path)
    load_state_into(create_architecture(arch), state, "uploaded checkpoint")


def _too_large(cap: int) -> Problem:
    return Problem(413, "Content Too Large", f"checkpoint exceeds the upload limit of {cap} bytes")


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
    from d4c_core.models import ModelSpec

    try:
        ModelSpec(arch)
    except D4CError as e:
        raise validation_problem("arch", str(e)) from None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ACCEPTED_TYPES:
        raise Problem(
            415,
            "Unsupported Media Type",
            "send the .safetensors file as the raw body with Content-Type: "
            "application/octet-stream (not multipart)",
        )
    cap = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _too_large(cap)

    checkpoint_id = new_id()
    folder = settings.checkpoints_dir
    await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = folder / f".upload-{checkpoint_id}.part"
    final = settings.checkpoint_path(checkpoint_id)
    digest = hashlib.sha256()
    size = 0
    try:
        async with await anyio.open_file(tmp, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise _too_large(cap)
                digest.update(chunk)
                await f.write(chunk)
        if size == 0:
            raise validation_problem("body", "empty upload")
        try:
            await anyio.to_thread.run_sync(check_checkpoint, tmp, arch, limiter=_check_limiter)
        except D4CError as e:
            raise validation_problem("body", str(e)) from None
        await anyio.Path(tmp).rename(final)
        row = Checkpoint(
            id=checkpoint_id,
            tenant_id=tenant_id,
            arch=arch,
            sha256=digest.hexdigest(),
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
