"""The FastAPI application: ``create_app(settings)`` wires settings, DB, auth and routes.

Collaborators that reach other processes (the queue, the broker probe, the queue depth) are
injectable so tests can run the API without a broker; by default they are the queue port's
(``app.queue``), bound to the app's settings.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import Histogram
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import queue
from app.api.problems import (
    PROBLEM_JSON,
    Problem,
    ProblemDetail,
    install_handlers,
    problem_responses,
)
from app.api.routes import health, jobs, models
from app.core.config import Settings, get_settings
from app.core.security import KeyCache
from app.db.job_reader import job_reader
from app.db.session import async_engine, async_session_factory, autocommit_engine
from app.metrics import UNMATCHED_ROUTE, make_metrics
from app.metrics import router as metrics_router

access_log = logging.getLogger("d4c.access")


# A read slower than this is logged even when successful.
SLOW_REQUEST_S = 1.0


class AccessLog:
    """One latency observation per request, and a structured log line for each that changed
    something, failed or was slow.

    Successful ``GET``/``HEAD`` requests (mostly clients polling their jobs) are counted in
    the latency histogram only: a log line each would be most of the log volume and ~10 % of
    the hot path's CPU (measured under wrk), and says nothing the histogram does not. Without
    the histogram (metrics disabled) every request is logged.

    Pure ASGI (no body buffering) and one layer for both, since it sits on every request's
    path. The histogram is labelled by the route *template*, read from ``scope["route"]``
    after the router matched (it updates the shared scope in place); a request no route
    matched is ``unmatched``, never its raw path. A server-sent-events stream counts its
    whole lifetime (``/jobs/{job_id}/events``): filter that route out of latency alerts.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram | None = None) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            seconds = time.perf_counter() - start
            if self.histogram is not None:
                route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
                self.histogram.labels(scope["method"], route, str(status)).observe(seconds)
            quiet = (
                self.histogram is not None
                and scope["method"] in ("GET", "HEAD")
                and status < 400
                and seconds < SLOW_REQUEST_S
            )
            if not quiet and access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                    },
                )


class JsonBodyLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 before any route reads them.

    FastAPI reads a JSON body whole into memory before validating it, so without a cap one
    request can hold gigabytes. Job bodies are a few KB (even ``max_prompts`` prompts are well
    under a MiB). The raw-upload route (``POST /models``) streams to disk under its own cap
    (``max_upload_bytes``) and is passed through untouched.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "OPTIONS")
            or scope["path"].startswith(self.exempt)
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        # Small by construction: buffer up to the cap, then replay it to the route.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        problem = Problem(
            413,
            "Content Too Large",
            f"request body exceeds the limit of {self.max_bytes} bytes",
            type_="body-too-large",
        )
        response = JSONResponse(
            problem.body(scope["path"]), status_code=413, media_type=PROBLEM_JSON
        )
        await response(scope, _no_receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out ``messages`` first, then defers to the real one."""
    pending = list(messages)

    async def _receive() -> Message:
        return pending.pop(0) if pending else await receive()

    return _receive


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _lifespan(engine: AsyncEngine) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's startup/shutdown: freeze what startup loaded, then close the job reader and
    the engine, so a stopped app (or a test's) leaves no pooled connection behind."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything loaded at startup (torch, open_clip, the app) is long-lived: keep it out
        # of the collector's generations so a full collection does not walk it mid-request.
        gc.collect()
        gc.freeze()
        yield
        await app.state.job_reader.close()
        await engine.dispose()

    return lifespan


def _init_state(
    app: FastAPI,
    settings: Settings,
    engine: AsyncEngine,
    enqueue: Callable[[str], None] | None,
    broker_ping: Callable[[], Any] | None,
    queue_depth: Callable[[], int | None] | None,
) -> None:
    """Put what the routes share on ``app.state``: the database handles, the key cache, the
    metrics, and the queue collaborators (the given ones, else the queue port's bound to
    ``settings``), so routes reach them per app rather than through module globals."""
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = async_session_factory(engine)
    app.state.read_engine = autocommit_engine(engine)  # one-SELECT requests
    app.state.job_reader = job_reader(engine, app.state.read_engine)  # GET /jobs/{id}
    app.state.key_cache = KeyCache(settings.api_key_cache_ttl_s)
    app.state.enqueue = enqueue or functools.partial(queue.send, settings=settings)
    app.state.broker_ping = broker_ping or functools.partial(queue.ping, settings=settings)
    app.state.queue_depth = queue_depth or functools.partial(queue.depth, settings=settings)
    app.state.metrics = make_metrics()


def _install_routes(app: FastAPI, settings: Settings) -> None:
    """Error handlers, routers and middleware. The body limit is added before the access log,
    so the access log is outermost and also times and logs the 413s the limit answers."""
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.add_middleware(
        JsonBodyLimit, max_bytes=settings.max_json_bytes, exempt_prefixes=("/models",)
    )
    latency = None
    if settings.metrics_enabled:
        app.include_router(metrics_router)
        latency = app.state.metrics.http_latency
    app.add_middleware(AccessLog, histogram=latency)


def _problem_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` documenting every error body as problem+json: the schema FastAPI
    generates describes its own 422 body, which this app never sends. Built once, cached on
    ``app.openapi_schema`` like FastAPI's own."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            _document_problems(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _document_problems(schema: dict[str, Any]) -> None:
    """Add ``ProblemDetail`` (and its sub-schemas) to ``schema``'s components, answer every
    422 with it, and drop FastAPI's own validation-error schemas, which nothing refers to."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps["ProblemDetail"] = ProblemDetail.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    for name, sub in comps["ProblemDetail"].pop("$defs", {}).items():
        comps.setdefault(name, sub)
    # FastAPI documents its own 422 body; ours is problem+json.
    problem_422 = problem_responses(422)[422]
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            if "422" in op.get("responses", {}):
                # Keep a route's own description; FastAPI's default names its body.
                described = op["responses"]["422"].get("description")
                op["responses"]["422"] = problem_422 | (
                    {"description": described}
                    if described not in (None, "Validation Error")
                    else {}
                )
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Callable[[str], None] | None = None,
    broker_ping: Callable[[], Any] | None = None,
    queue_depth: Callable[[], int | None] | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    engine = async_engine(settings)
    app = FastAPI(
        title="d4c-service",
        version="0.1.0",
        summary="Data-free quantization of CLIP models as a job service",
        lifespan=_lifespan(engine),
        # A slash-redirect would be answered before auth, with a Location built from the
        # client's Host header: a wrong path is a plain 404.
        redirect_slashes=False,
    )
    _init_state(app, settings, engine, enqueue, broker_ping, queue_depth)
    _install_routes(app, settings)
    app.openapi = _problem_openapi(app)  # type: ignore[method-assign]
    return app
