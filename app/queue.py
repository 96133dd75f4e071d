"""The queue port: how the service reaches the broker. Everything that names the broker, the
queue or the task lives here, once; ``worker/`` builds its Celery app on top of it.

- ``broker_settings(settings)``: the broker URL and transport options, Redis in a deployment
  or kombu's filesystem transport under ``data_dir/broker`` on the embedded default.
- ``send(job_id)``: hand a job id to the workers, by task *name* (``send_task``), so the API
  never imports the task code (nor, through it, torch and the engine).
- ``ping()``: the readiness probe; ``depth()``: messages waiting in the job queue, the one
  definition ``GET /metrics`` and the reaper both read.

The job database is the source of truth; the broker only carries job ids. A failed send is not
an error for the client: the row is already committed, and the reaper re-sends queued jobs the
broker lost or never got (``worker.reaper``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError

from app.core.config import Settings, get_settings

log = logging.getLogger("d4c.queue")

QUEUE = "d4c.jobs"
TASK_NAME = "d4c.run_job"

# Broker errors surface as kombu errors or plain socket/OS errors depending on the transport.
BROKER_ERRORS = (KombuError, OSError, TimeoutError)


def filesystem_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's filesystem transport under ``data_dir/broker``: messages are files, so the
    embedded default needs no server and several local processes can share one queue."""
    root = settings.broker_dir
    folders = {"queue": root / "queue", "control": root / "control"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "control_folder": str(folders["control"]),
        "store_processed": False,
    }


def broker_settings(settings: Settings) -> dict[str, Any]:
    """``broker_url`` and transport options for the configured broker."""
    if settings.embedded:
        return {
            "broker_url": "filesystem://",
            "broker_transport_options": filesystem_transport_options(settings)
            | {"polling_interval": 0.5},
        }
    # Redis redelivers an unacked message after the visibility timeout; it must exceed the
    # longest job a worker may legitimately hold, or a healthy long job would run twice.
    visibility = int(settings.job_time_limit_s + 2 * settings.worker_hard_limit_grace_s)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "socket_connect_timeout": settings.broker_timeout_s,
            "socket_timeout": 30,
        },
    }


def message_settings(settings: Settings) -> dict[str, Any]:
    """Celery configuration both ends must agree on: broker, routing, serialization, and no
    result backend (the job row is the result)."""
    return {
        **broker_settings(settings),
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
    }


_senders: dict[str, Celery] = {}
_senders_lock = threading.Lock()


def _sender(settings: Settings) -> Celery:
    """A send-only Celery app per settings (a new one if tests change them). Not set as the
    current app, so a worker in the same process keeps its own."""
    key = settings.model_dump_json()
    with _senders_lock:
        app = _senders.get(key)
        if app is None:
            app = Celery("d4c-queue", set_as_current=False)
            app.conf.update(**message_settings(settings))
            _senders[key] = app
        return app


def send(job_id: str, settings: Settings | None = None) -> bool:
    """Send ``job_id`` to the workers; False (logged) when the broker is unreachable."""
    app = _sender(settings or get_settings())
    try:
        app.send_task(
            TASK_NAME,
            args=[job_id],
            queue=QUEUE,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )
    except BROKER_ERRORS:
        log.warning("enqueue failed; the reaper will resend", extra={"job_id": job_id})
        return False
    return True


def ping(timeout: float | None = None, settings: Settings | None = None) -> bool:
    """True when the broker answers within ``timeout`` seconds (readiness probe)."""
    settings = settings or get_settings()
    timeout = settings.broker_timeout_s if timeout is None else timeout
    try:
        with _sender(settings).connection_for_write(connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
            client = getattr(conn.default_channel, "client", None)
            if client is not None and hasattr(client, "ping"):  # Redis: a real round trip
                client.ping()
    except BROKER_ERRORS:
        return False
    return True


def depth(timeout: float | None = None, settings: Settings | None = None) -> int:
    """Messages waiting in the job queue (not those workers hold). Fails fast, with a connect
    timeout and no retries (a plain kombu connection would retry for as long as the broker is
    down), so a scrape or the reaper's other duties go on."""
    settings = settings or get_settings()
    timeout = settings.broker_timeout_s if timeout is None else timeout
    with _sender(settings).connection_for_write(connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=0, timeout=timeout)
        ok = conn.default_channel.queue_declare(queue=QUEUE, passive=False)
        return int(ok.message_count)
