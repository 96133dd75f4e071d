"""Structured JSON logs on stderr, one object per line, so log shippers need no parsing rules.

Every record logged while a job runs carries ``job_id``, whichever logger wrote it (the
worker, the engine's ``d4c.pipeline``, Celery, a library): a job's whole story is one
``job_id`` query in Loki/CloudWatch. The id lives in a context variable that Celery's
``task_prerun``/``task_postrun`` signals set and clear around each job task, and a filter on
the one handler copies it onto each record. A filter on the *handler* (not a logger) sees
records from every logger, and the signals need no change to the task code. Records that
already name a job (``worker.logs.JobLog``, the heartbeat thread, which runs outside the
task's context) keep their own id.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

_job_id: ContextVar[str | None] = ContextVar("d4c_job_id", default=None)


def current_job_id() -> str | None:
    return _job_id.get()


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Stamp ``job_id`` on every record logged in this context (thread / task)."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


class JobIdFilter(logging.Filter):
    """Adds the current job id to records that do not carry one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            job_id = _job_id.get()
            if job_id is not None:
                record.job_id = job_id
        return True


def _task_prerun(task: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    name = getattr(task, "name", "") or ""
    if not name.startswith("d4c."):
        return
    job_id = (kwargs or {}).get("job_id") or (args[0] if args else None)
    if isinstance(job_id, str):
        _job_id.set(job_id)


def _task_postrun(task: Any = None, **_: Any) -> None:
    if (getattr(task, "name", "") or "").startswith("d4c."):
        _job_id.set(None)


def bind_celery_job_context() -> None:
    """Connect the Celery signals that set/clear the job id around each ``d4c.*`` task.

    Idempotent (fixed ``dispatch_uid``); receivers connected in the parent are inherited by
    prefork children, and prerun/postrun run in the thread that runs the task, so the
    in-process worker's thread gets the id too and the API's request threads never do.
    """
    from celery import signals

    signals.task_prerun.connect(_task_prerun, weak=False, dispatch_uid="d4c.job_id.prerun")
    signals.task_postrun.connect(_task_postrun, weak=False, dispatch_uid="d4c.job_id.postrun")


def json_handler(stream: Any = None) -> logging.Handler:
    """The service's handler: JSON lines with ``ts``, ``level``, ``logger``, ``message``,
    ``job_id`` when a job is running, and any ``extra`` fields."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
        )
    )
    handler.addFilter(JobIdFilter())
    return handler


def configure_logging(level: str = "INFO") -> None:
    """Route the root logger (and uvicorn's) through one JSON handler; idempotent."""
    root = logging.getLogger()
    root.handlers[:] = [json_handler()]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Migration chatter at `d4c serve` start-up is noise, not events.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    bind_celery_job_context()
