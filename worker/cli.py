"""Subcommands this package adds to ``d4c`` (entry-point group ``d4c.cli``):

- ``d4c serve``: the API, plus an in-process worker on the embedded default (``worker.serve``).
- ``d4c worker``: a Celery worker process (one job at a time) plus the reaper.
- ``d4c submit``: a client for the service: submit a job, follow it, download and verify the
  artifact. Without ``--url`` it starts a private ``d4c serve`` (embedded default) for the run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from d4c_core.recipe_cli import add_recipe_args
from worker import serve


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve``, ``worker`` and ``submit`` to the ``d4c`` parser."""
    serve.register(sub)
    w = sub.add_parser("worker", help="run a job worker (one job at a time) and the reaper")
    w.add_argument(
        "--pool",
        default="prefork",
        choices=["prefork", "solo"],
        help="prefork (default): the job runs in a child process, so time limits apply and "
        "a crashed job is redelivered; solo: in this process",
    )
    w.set_defaults(func=_worker)

    s = sub.add_parser(
        "submit", help="submit a quantization job over HTTP, wait, download and verify it"
    )
    s.add_argument(
        "--url",
        default=os.environ.get("D4C_URL"),
        help="service URL (env D4C_URL); default: start a local embedded `d4c serve`",
    )
    s.add_argument("--api-key", default=os.environ.get("D4C_API_KEY"), help="env D4C_API_KEY")
    s.add_argument("--model", default="d4c-tiny-vit", help="open_clip architecture")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--pretrained", help="open_clip tag (default: builtin for built-in archs)")
    src.add_argument("--checkpoint-id", help="id of a checkpoint uploaded with POST /models")
    s.add_argument(
        "--eval-task",
        "--task",
        dest="eval_task",
        metavar="TASK",
        help="built-in zero-shot task for FP vs quantized accuracy (the body's eval_task)",
    )
    s.add_argument("--out", help="download the artifact into this directory")
    s.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job and return (needs --url: a private server would stop)",
    )
    s.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    s.add_argument("--json", action="store_true", help="one-line JSON summary on stdout")
    add_recipe_args(s)
    s.set_defaults(func=_submit)


def _worker(args: argparse.Namespace) -> int:
    from celery import signals

    from app.core.config import get_settings
    from app.core.logging import configure_logging
    from app.db.session import sync_engine
    from app.queue import QUEUE
    from worker.celery_app import celery_app
    from worker.reaper import ReaperThread, start_reaper
    from worker.tasks import default_worker_id

    settings = get_settings()
    configure_logging(settings.log_level)
    if settings.sqlite:  # a local file nobody else migrates (only a server DB needs `d4c db`)
        from app.db.migrate import upgrade

        upgrade(settings)
    reaper: list[ReaperThread] = []

    # The reaper lives in the parent (it outlives any child); started once the pool's
    # children are forked, so they never inherit a running thread.
    @signals.worker_ready.connect(weak=False)
    def _start_reaper(**_: Any) -> None:
        reaper.append(start_reaper(settings))

    @signals.worker_shutdown.connect(weak=False)
    def _stop_reaper(**_: Any) -> None:
        for r in reaper:
            r.stop()

    # A child inherits the parent's pooled DB connections; it must open its own.
    @signals.worker_process_init.connect(weak=False)
    def _child_init(**_: Any) -> None:
        from worker.tasks import warm_up

        sync_engine(settings).dispose(close=False)
        warm_up()

    celery_app().worker_main(
        [
            "worker",
            f"--pool={args.pool}",
            "--concurrency=1",
            f"--hostname={default_worker_id()}",
            f"--queues={QUEUE}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0


def _submit(args: argparse.Namespace) -> int:
    from d4c_core.recipe_cli import recipe_from_args, recipe_overrides
    from worker.client import JobRequest, submit_and_follow

    recipe_from_args(args)  # refuse a bad setting here, naming its flag, before any request
    request = JobRequest(
        model=args.model,
        pretrained=args.pretrained,
        checkpoint_id=args.checkpoint_id,
        recipe=recipe_overrides(args),
        eval_task=args.eval_task,
    )
    return submit_and_follow(
        request,
        url=args.url,
        api_key=args.api_key,
        out=Path(args.out) if args.out else None,
        wait=not args.no_wait,
        timeout=args.timeout,
        as_json=args.json,
    )
