"""/jobs: submit, inspect, list, cancel, follow and download quantization jobs."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.ext.asyncio import AsyncSession
from sse_starlette import EventSourceResponse

from app import crud, deletion
from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.files import OpenFileResponse, byte_range
from app.api.problems import (
    FieldError,
    Problem,
    not_found,
    problem_responses,
    validation_problem,
)
from app.db.models import ARTIFACT_NAMES, FINISHED_STATES, ID_PATTERN, Job, JobState
from app.jobspec import request_hash, validate_job
from app.schemas import ArtifactOut, JobCreate, JobOut, JobPage
from d4c_core.vocabulary import ARTIFACT_MEDIA_TYPES

# Malformed ids (NUL, slashes, ...) are a 422 before any query; well-formed unknown ones 404.
JobIdPath = Annotated[str, Path(pattern=ID_PATTERN)]

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger("d4c.api.jobs")

RETRY_AFTER_S = 30


def _replay(job: Job, rhash: str, response: Response) -> Job:
    """Answer a repeated Idempotency-Key: the original job, or 422 if the body differs (the
    IETF Idempotency-Key draft's answer for a reused key; 409 is for a concurrent one)."""
    if job.request_hash != rhash:
        raise Problem(
            422,
            "Idempotency-Key reused",
            "this Idempotency-Key was already used with a different request body",
            type_="idempotency-key-reused",
            errors=[FieldError(field="Idempotency-Key", message="used with another body")],
        )
    response.status_code = 200
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit a quantization job",
    responses={
        200: {"description": "Idempotent replay: the job first created with this key"},
        **problem_responses(401, 409, 413, 422, 429, 503),
        409: problem_responses(409)[409]
        | {"description": "A request with the same Idempotency-Key is in flight; retry"},
        422: problem_responses(422)[422]
        | {"description": "Invalid job, or an Idempotency-Key reused with another body"},
    },
)
async def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant_id: TenantDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
    ] = None,
) -> Job:
    """Validate fully, commit the job row, then enqueue it (the worker reads the row)."""
    rhash = request_hash(body)
    if idempotency_key is not None:
        existing = await crud.get_job_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, rhash, response)

    checkpoint_arch = None
    if body.model.checkpoint_id is not None:
        ck = await crud.get_checkpoint(session, tenant_id, body.model.checkpoint_id)
        checkpoint_arch = ck.arch if ck is not None else None
    spec = await run_in_threadpool(validate_job, body, settings, checkpoint_arch)

    await crud.lock_tenant(session, tenant_id)
    # Again under the lock DELETE /models/{id} also takes: a checkpoint deleted since the check
    # above must not be queued for a worker that would not find it.
    ck_id = body.model.checkpoint_id
    if ck_id is not None and await crud.get_checkpoint(session, tenant_id, ck_id) is None:
        raise validation_problem("model.checkpoint_id", "no such checkpoint")
    active = await crud.count_active_jobs(session, tenant_id)
    if active >= settings.max_active_jobs_per_tenant:
        raise Problem(
            429,
            "Too Many Requests",
            f"{active} jobs are queued or running; the limit per tenant is "
            f"{settings.max_active_jobs_per_tenant}",
            type_="too-many-active-jobs",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    job = await crud.insert_job(session, tenant_id, spec, rhash, idempotency_key)
    if job is None:  # the same key was committed by a concurrent request
        assert idempotency_key is not None
        existing = await crud.get_job_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is None:
            raise Problem(409, "Conflict", "concurrent submission; retry")
        return _replay(existing, rhash, response)

    try:
        await run_in_threadpool(request.app.state.enqueue, job.id)
    except Exception:
        # The row is committed and queued: the worker's reaper re-sends queued jobs the
        # broker never got, so a broker hiccup delays the job instead of failing the request.
        log.warning("enqueue failed; left for the reaper", extra={"job_id": job.id}, exc_info=True)
    response.headers["Location"] = f"/jobs/{job.id}"
    return job


@router.get(
    "",
    response_model=JobPage,
    summary="List the caller's jobs, newest first",
    responses=problem_responses(401, 422, 503),
)
async def list_jobs(
    session: SessionDep,
    tenant_id: TenantDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    after = None
    if cursor is not None:
        try:
            after = crud.decode_cursor(cursor)
        except ValueError:
            raise validation_problem("cursor", "malformed cursor") from None
    items, next_cursor = await crud.list_jobs(session, tenant_id, limit, state, after)
    return {"items": items, "next_cursor": next_cursor}


async def _owned_job(session: SessionDep, tenant_id: str, job_id: str) -> Job:
    job = await crud.get_job(session, tenant_id, job_id)
    if job is None:
        raise not_found("job")
    return job


def artifacts_gone(deleted_at: datetime) -> Problem:
    """410 for the artifact routes of a deleted job: unlike 404, it tells a client that the
    files existed and will not come back (the job record itself remains)."""
    return Problem(
        410,
        "Gone",
        f"the job's artifacts were deleted at {deleted_at.isoformat()} (DELETE /jobs/{{id}} "
        "or the retention period); the job record remains",
        type_="artifacts-deleted",
    )


async def _vanished(session: AsyncSession, job_id: str, what: str) -> Problem:
    """An artifact row or file missing after the job read as not deleted: 410 when a
    concurrent delete took it, else 404."""
    when = await deletion.deleted_at(session, job_id)
    return artifacts_gone(when) if when is not None else not_found(what)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="A job's state, progress, recipe and results",
    responses=problem_responses(401, 404, 422, 503),
)
async def get_job(job_id: JobIdPath, request: Request, tenant_id: TenantDep) -> Any:
    """The hot path clients poll: one SELECT of the shown columns, no ORM object, no
    transaction (``app.db.job_reader``); FastAPI validates the row into ``JobOut``."""
    row = await request.app.state.job_reader(tenant_id, job_id)
    if row is None:
        raise not_found("job")
    return row


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job (cooperative: a running job stops at the next unit boundary)",
    responses=problem_responses(401, 404, 409, 413, 422, 503),
)
async def cancel_job(job_id: JobIdPath, session: SessionDep, tenant_id: TenantDep) -> Job:
    job = await _owned_job(session, tenant_id, job_id)
    if job.state in FINISHED_STATES:
        raise Problem(409, "Conflict", f"job already {job.state}", type_="job-finished")
    job = await crud.request_cancel(session, job)
    if job.state in FINISHED_STATES and job.state != "cancelled":
        raise Problem(409, "Conflict", f"job already {job.state}", type_="job-finished")
    return job


@router.get(
    "/{job_id}/events",
    summary="Progress as server-sent events until the job ends",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`progress` events, then one `end` event",
            "content": {"text/event-stream": {}},
        },
        **problem_responses(401, 404, 422, 503),
    },
)
async def job_events(
    job_id: JobIdPath,
    request: Request,
    session: SessionDep,
    tenant_id: TenantDep,
    settings: SettingsDep,
) -> EventSourceResponse:
    """Poll the job row (the source of truth) and emit an event whenever it changes."""
    await _owned_job(session, tenant_id, job_id)
    await session.close()  # do not pin a pooled connection for the stream's lifetime
    factory = request.app.state.sessionmaker

    async def events() -> AsyncIterator[dict[str, str]]:
        last: tuple[Any, ...] | None = None
        while True:
            async with factory() as s:
                job = await crud.get_job(s, tenant_id, job_id)
            if job is None:
                return
            snap = (job.state, job.stage, job.progress, job.cancel_requested)
            if snap != last:
                last = snap
                yield {"event": "progress", "data": JobOut.model_validate(job).model_dump_json()}
            if job.state in FINISHED_STATES:
                yield {"event": "end", "data": JobOut.model_validate(job).model_dump_json()}
                return
            await asyncio.sleep(settings.events_poll_s)

    return EventSourceResponse(events(), ping=15)


@router.get(
    "/{job_id}/artifacts",
    response_model=list[ArtifactOut],
    summary="Name, size and sha256 of each file a finished job produced",
    responses=problem_responses(401, 404, 409, 410, 422, 503),
)
async def list_artifacts(job_id: JobIdPath, session: SessionDep, tenant_id: TenantDep) -> Any:
    job = await _owned_job(session, tenant_id, job_id)
    _check_artifacts_exist(job)
    return await crud.list_artifacts(session, job.id)


def _check_artifacts_exist(job: Job) -> None:
    """The listing and a download answer alike: 410 once deleted, 409 until finished."""
    if job.deleted_at is not None:
        raise artifacts_gone(job.deleted_at)
    if job.state not in FINISHED_STATES:
        raise Problem(
            409,
            "Conflict",
            f"job is {job.state}; artifacts exist once it has finished",
            type_="job-not-finished",
        )


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download one artifact (sha256 in ETag and Repr-Digest)",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The file",
            "content": {t: {} for t in set(ARTIFACT_MEDIA_TYPES.values())},
        },
        206: {"description": "One byte range (`Range`, honoured when `If-Range` matches)"},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **problem_responses(401, 404, 409, 410, 416, 422, 503),
    },
)
async def download_artifact(
    job_id: JobIdPath,
    name: str,
    session: SessionDep,
    tenant_id: TenantDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_range: Annotated[str | None, Header()] = None,
) -> Response:
    job = await _owned_job(session, tenant_id, job_id)
    if name not in ARTIFACT_NAMES:
        raise not_found("artifact")
    _check_artifacts_exist(job)
    art = await crud.get_artifact(session, job.id, name)
    if art is None:
        raise await _vanished(session, job.id, "artifact")
    await session.close()

    from app.storage import ArtifactStore

    # The path comes from the storage layout and the DB row's name, never the URL.
    store = ArtifactStore(settings)
    etag = f'"{art.sha256}"'
    headers = {
        "ETag": etag,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(art.sha256)).decode()}:",
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    span = byte_range(range_, if_range, etag, art.size_bytes)
    try:  # opened here, not after returning: see app/api/files.py
        file = await asyncio.to_thread(store.open, job.id, art.name)
    except FileNotFoundError:
        raise await _vanished(session, job.id, "artifact file") from None
    return OpenFileResponse(
        file,
        media_type=ARTIFACT_MEDIA_TYPES[art.name],
        filename=art.name,
        headers=headers,
        span=span,
    )


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Delete a finished job's artifacts and work dir (the job record stays)",
    responses={
        204: {"description": "Deleted, now or by an earlier request (idempotent)"},
        **problem_responses(401, 404, 409, 422, 503),
    },
)
async def delete_job(
    job_id: JobIdPath, session: SessionDep, tenant_id: TenantDep, settings: SettingsDep
) -> Response:
    """Tombstone the job, then remove its files (``app.deletion`` says why in that order).

    Afterwards ``GET /jobs/{id}`` shows ``deleted_at`` and the artifact routes answer 410.
    A queued or running job is 409: cancel it first, then delete it once it has finished.
    Repeating the request is 204 again, and finishes a purge an earlier one left undone.
    """
    row = await deletion.tombstone(session, tenant_id, job_id)
    if row is None:
        raise not_found("job")
    if row.deleted_at is None:  # still queued or running: nothing was changed
        raise Problem(
            409,
            "Conflict",
            f"job is {row.state}; cancel it (POST /jobs/{job_id}/cancel) and delete it once "
            "it has finished",
            type_="job-active",
        )
    if row.purged_at is None:  # paths from the row's id, never the URL's
        await deletion.purge(session, settings, row.id)
    return Response(status_code=204)
