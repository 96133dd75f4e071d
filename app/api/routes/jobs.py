"""/jobs: submit, inspect, list, cancel, follow and download quantization jobs."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sse_starlette import EventSourceResponse

from app import crud
from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.problems import Problem, not_found, problem_responses, validation_problem
from app.db.models import ARTIFACT_NAMES, FINISHED_STATES, Job
from app.jobspec import request_hash, validate_job
from app.schemas import ID_PATTERN, ArtifactOut, JobCreate, JobOut, JobPage, JobState

# Malformed ids (NUL, slashes, ...) are a 422 before any query; well-formed unknown ones 404.
JobIdPath = Annotated[str, Path(pattern=ID_PATTERN)]

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger("d4c.api.jobs")

RETRY_AFTER_S = 30
MEDIA_TYPES = {
    "model.safetensors": "application/octet-stream",
    "manifest.json": "application/json",
    "report.json": "application/json",
    "calibration.png": "image/png",
}


def _replay(job: Job, rhash: str, response: Response) -> Job:
    """Answer a repeated Idempotency-Key: the original job, or 422 if the body differs."""
    if job.request_hash != rhash:
        raise validation_problem(
            "Idempotency-Key", "this key was already used with a different request body"
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
    responses=problem_responses(401, 404, 422, 503),
)
async def list_artifacts(job_id: JobIdPath, session: SessionDep, tenant_id: TenantDep) -> Any:
    job = await _owned_job(session, tenant_id, job_id)
    return await crud.list_artifacts(session, job.id)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download one artifact (sha256 in ETag and Repr-Digest)",
    response_class=FileResponse,
    responses={
        200: {"description": "The file", "content": {t: {} for t in set(MEDIA_TYPES.values())}},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **problem_responses(401, 404, 409, 422, 503),
    },
)
async def download_artifact(
    job_id: JobIdPath,
    name: str,
    session: SessionDep,
    tenant_id: TenantDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    job = await _owned_job(session, tenant_id, job_id)
    if name not in ARTIFACT_NAMES:
        raise not_found("artifact")
    if job.state not in FINISHED_STATES:
        raise Problem(409, "Conflict", f"job is {job.state}; artifacts exist once it has finished")
    art = await crud.get_artifact(session, job.id, name)
    if art is None:
        raise not_found("artifact")
    await session.close()

    from app.storage import ArtifactStore

    # The path comes from the storage layout and the DB row's name, never the URL.
    path = ArtifactStore(settings).path(job.id, art.name)
    etag = f'"{art.sha256}"'
    headers = {
        "ETag": etag,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(art.sha256)).decode()}:",
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    if not await asyncio.to_thread(path.is_file):
        raise not_found("artifact file")
    return FileResponse(path, media_type=MEDIA_TYPES[art.name], filename=art.name, headers=headers)
