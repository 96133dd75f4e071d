"""RFC 9457 problem details: the one error shape every endpoint answers with.

Route code raises ``Problem``; the handlers here turn it, FastAPI's validation errors,
Starlette's HTTP errors and database outages into ``application/problem+json`` so a client
never has to parse a traceback or a framework-specific body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # Union members show up as an extra loc element (e.g. bits.str / bits.BitsIn): drop them.
    return ".".join(p for p in parts if not p[:1].isupper() and p not in ("str", "int")) or "body"


def _message(err: dict[str, Any]) -> str:
    return str(err.get("msg", "invalid"))


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
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def install_handlers(app: FastAPI) -> None:
    """Register the problem+json handlers on ``app``."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            FieldError(field=_loc(tuple(e["loc"])), message=_message(e)) for e in exc.errors()
        ]
        # One entry per field: a union's alternatives each report on the same field.
        seen: dict[str, FieldError] = {}
        for e in errors:
            seen.setdefault(e.field, e)
        uniq = list(seen.values())
        detail = "; ".join(f"{e.field}: {e.message}" for e in uniq)
        p = Problem(422, "Invalid request", detail, type_="validation", errors=uniq)
        return problem_response(p, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
            # FastAPI answers a JSON syntax error with a 422 but a body that is not even
            # UTF-8 with a bare 400; both are "the body is not JSON": one answer, as documented.
            p = validation_problem("body", "the request body is not valid UTF-8 JSON")
            return problem_response(p, request)
        title = _STATUS_TITLES.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        p = Problem(exc.status_code, title, detail, headers=dict(exc.headers or {}) or None)
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
