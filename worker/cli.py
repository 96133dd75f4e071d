"""Subcommands this package adds to ``d4c`` (entry-point group ``d4c.cli``):

- ``d4c worker``: a Celery worker process (one job at a time) plus the reaper.
- ``d4c submit``: a client for the service: submit a job, follow it, download and verify the
  artifact. Without ``--url`` it starts a private ``d4c serve`` (embedded default) for the run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``worker`` and ``submit`` to the ``d4c`` parser."""
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
    s.add_argument("--bits", default="w4a8")
    s.add_argument("--calib", default="noise", choices=["noise", "bns", "pse", "d4c"])
    s.add_argument("--images", type=int, default=128, help="calibration images")
    s.add_argument("--prompts", type=int, help="calibration prompts (default: the engine's)")
    s.add_argument("--recon-iters", type=int, help="reconstruction iterations per unit")
    s.add_argument("--task", help="built-in zero-shot task for FP vs quantized accuracy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="download the artifact into this directory")
    s.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job and return (needs --url: a private server would stop)",
    )
    s.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    s.add_argument("--json", action="store_true", help="one-line JSON summary on stdout")
    s.set_defaults(func=_submit)


def _worker(args: argparse.Namespace) -> int:
    from celery import signals

    from app.core.config import get_settings
    from app.core.logging import configure_logging
    from app.db.session import sync_engine
    from worker.celery_app import QUEUE, celery_app
    from worker.reaper import ReaperThread, start_reaper
    from worker.settings import get_worker_settings
    from worker.tasks import default_worker_id

    settings, wsettings = get_settings(), get_worker_settings()
    configure_logging(settings.log_level)
    if settings.database_url is None:  # embedded SQLite: nobody else migrates it
        from app.db.migrate import upgrade

        upgrade(settings)
    reaper: list[ReaperThread] = []

    # The reaper lives in the parent (it outlives any child); started once the pool's
    # children are forked, so they never inherit a running thread.
    @signals.worker_ready.connect(weak=False)
    def _start_reaper(**_: Any) -> None:
        reaper.append(start_reaper(settings, wsettings))

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
    from worker.client import JobRequest, submit_and_follow

    request = JobRequest(
        model=args.model,
        pretrained=args.pretrained,
        checkpoint_id=args.checkpoint_id,
        bits=args.bits,
        calib=args.calib,
        images=args.images,
        prompts=args.prompts,
        recon_iters=args.recon_iters,
        task=args.task,
        seed=args.seed,
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
