"""RFC 9457 problem details: the one error shape every endpoint answers with.

Route code raises ``Problem``; the handlers here turn it, FastAPI's validation errors,
Starlette's HTTP errors and database outages into ``application/problem+json`` so a client
never has to parse a traceback or a framework-specific body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

log = logging.getLogger("d4c.api")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "/problems/"


class FieldError(BaseModel):
    field: str = Field(
        description="Dotted path of the offending field, e.g. calibration.num_images"
    )
    message: str


class ProblemDetail(BaseModel):
    """RFC 9457 problem details (extension members: ``errors``)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None


class Problem(Exception):
    """An error the client can act on; rendered as problem+json."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type_: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = PROBLEM_BASE + type_ if type_ else "about:blank"
        self.errors = errors
        self.headers = headers

    def body(self, instance: str | None = None) -> dict[str, Any]:
        return ProblemDetail(
            type=self.type,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
        ).model_dump(exclude_none=True)


def validation_problem(field: str, message: str) -> Problem:
    """422 naming one offending field (the common case for a bad job request)."""
    return Problem(
        422,
        "Invalid request",
        f"{field}: {message}",
        type_="validation",
        errors=[FieldError(field=field, message=message)],
    )


def not_found(what: str = "resource") -> Problem:
    # Same answer for "missing" and "another tenant's": existence must not leak.
    return Problem(404, "Not Found", f"{what} not found")


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(request.url.path if request is not None else None),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


def _loc(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    where = parts.pop(0) if parts and parts[0] in ("body", "query", "path", "header") else "body"
    if where != "body":  # a parameter's own name (e.g. the header Idempotency-Key)
        return ".".join(parts) or where
    # Union members show up as an extra loc element (e.g. bits.str / bits.BitsIn): drop them.
    return ".".join(p for p in parts if not p[:1].isupper() and p not in ("str", "int")) or "body"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path, for a 405's ``Allow``.

    Starlette answers with the methods of the first route whose path matched, so ``/jobs``
    (GET and POST are two routes) would claim only one of them.
    """
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _leaf_routes(routes: list[Any]) -> Iterator[Any]:
    """The routes of an app, with included routers opened (FastAPI wraps each one; ours are
    included without an extra prefix, so their routes' own paths are the served ones)."""
    for route in routes:
        router = getattr(route, "original_router", None)
        if router is None:
            yield route
        else:
            yield from _leaf_routes(router.routes)


def _message(err: dict[str, Any]) -> str:
    return str(err.get("msg", "invalid"))


def _field_error(err: dict[str, Any]) -> FieldError:
    """One pydantic error as a ``FieldError``. An engine error that knows its own field path
    (a ``RecipeError`` raised while validating the body's recipe) extends the location."""
    field, message = _loc(tuple(err["loc"])), _message(err)
    cause = (err.get("ctx") or {}).get("error")
    sub = getattr(cause, "field", None)
    if sub:
        field = f"{field}.{sub}" if field != "body" else sub
        message = str(cause).removeprefix(f"{sub}: ")
    return FieldError(field=field, message=message)


# FastAPI's detail for a body it could not decode (fastapi.routing); matched to re-answer it.
_BODY_PARSE_ERROR = "There was an error parsing the body"

_STATUS_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    410: "Gone",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def _problem(request: Request, exc: Problem) -> JSONResponse:
    return problem_response(exc, request)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_field_error(e) for e in exc.errors()]
    # One entry per field: a union's alternatives each report on the same field.
    seen: dict[str, FieldError] = {}
    for e in errors:
        seen.setdefault(e.field, e)
    uniq = list(seen.values())
    detail = "; ".join(f"{e.field}: {e.message}" for e in uniq)
    p = Problem(422, "Invalid request", detail, type_="validation", errors=uniq)
    return problem_response(p, request)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        # FastAPI answers a JSON syntax error with a 422 but a body that is not even
        # UTF-8 with a bare 400; both are "the body is not JSON": one answer, as documented.
        p = validation_problem("body", "the request body is not valid UTF-8 JSON")
        return problem_response(p, request)
    title = _STATUS_TITLES.get(exc.status_code, "Error")
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    p = Problem(exc.status_code, title, detail, headers=headers or None)
    return problem_response(p, request)


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # The client hung up mid-body (routes clean up what they started): its doing, not a
    # server fault, so no traceback and no 5xx in the access log.
    log.info("client disconnected mid-request", extra={"path": request.url.path})
    p = Problem(
        400,
        "Bad Request",
        "the connection closed before the request body was complete",
        type_="client-disconnected",
    )
    return problem_response(p, request)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "dependency unavailable",
        extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"[:500]},
    )
    p = Problem(
        503,
        "Service Unavailable",
        "the job database is unreachable; retry later",
        type_="unavailable",
        headers={"Retry-After": "5"},
    )
    return problem_response(p, request)


def install_handlers(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""
    app.add_exception_handler(Problem, _problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_gone)  # type: ignore[arg-type]
    # Database outages surface as SQLAlchemy errors, or as raw socket errors / timeouts
    # from the async driver while connecting.
    app.add_exception_handler(SQLAlchemyError, _unavailable)
    app.add_exception_handler(OSError, _unavailable)
    app.add_exception_handler(TimeoutError, _unavailable)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entry declaring problem+json bodies for ``statuses``."""
    schema = {"$ref": "#/components/schemas/ProblemDetail"}
    return {
        s: {
            "description": _STATUS_TITLES.get(s, "Error"),
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for s in statuses
    }
