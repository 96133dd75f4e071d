"""The Celery app, configured from ``Settings``: Redis in a deployment, a broker-less
filesystem transport in the embedded default.

The job database is the source of truth, so there is no result backend: the broker only
carries job ids. Delivery is at-least-once (late acks, a requeue when the worker process
dies); the task claims the job row atomically, so a duplicate delivery is a cheap no-op, and
the pipeline's work dir makes a redelivered job resume rather than start over.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings
from worker.settings import WorkerSettings, get_worker_settings

QUEUE = "d4c.jobs"
TASK_NAME = "d4c.run_job"


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


def broker_settings(settings: Settings, wsettings: WorkerSettings) -> dict[str, Any]:
    """``broker_url`` and transport options for the configured broker."""
    if settings.embedded:
        return {
            "broker_url": "filesystem://",
            "broker_transport_options": filesystem_transport_options(settings)
            | {"polling_interval": 0.5},
        }
    # Redis redelivers an unacked message after the visibility timeout; it must exceed the
    # longest job a worker may legitimately hold, or a healthy long job would run twice.
    visibility = int(settings.job_time_limit_s + 2 * wsettings.hard_limit_grace_s)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "socket_connect_timeout": wsettings.ping_timeout_s,
            "socket_timeout": 30,
        },
    }


def make_celery(settings: Settings, wsettings: WorkerSettings) -> Celery:
    """A new, fully configured Celery app (workers import ``worker.tasks`` through it)."""
    app = Celery("d4c", include=["worker.tasks"])
    app.conf.update(
        **broker_settings(settings, wsettings),
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_routes={TASK_NAME: {"queue": QUEUE}},
        # At-least-once: ack after the task returns; a dead child process puts it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One job per worker process, and no job waiting behind it in a busy worker's buffer
        # (a waiting job there could not be picked up by an idle worker).
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # The task's own deadline fails the job at a unit boundary with a clear error; the
        # hard limit only kills a child stuck inside one unit for much longer.
        task_soft_time_limit=settings.job_time_limit_s + wsettings.hard_limit_grace_s / 2,
        task_time_limit=settings.job_time_limit_s + wsettings.hard_limit_grace_s,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        # The cancel flag lives in the DB; revoking (or terminating) a running job is never
        # how a job stops, so Celery's revoke bookkeeping is not needed.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def celery_app() -> Celery:
    """The process-wide app for the current settings (a new one if tests change them)."""
    settings, wsettings = get_settings(), get_worker_settings()
    key = settings.model_dump_json() + wsettings.model_dump_json()
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = make_celery(settings, wsettings)
        return app
