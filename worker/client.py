"""``d4c submit``: the service's own client, as an MLOps pipeline would use it.

Submits a job, follows it to the end, downloads every artifact and checks each file's sha256
three ways (the artifact listing, the download's ``ETag``, the artifact's own manifest), then
prints FP vs quantized accuracy. Without a URL it runs a private ``d4c serve`` on a free
loopback port (embedded default: SQLite, filesystem broker, in-process worker) and stops it
afterwards, so one command exercises the whole service on a fresh machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.db.models import FINISHED_STATES
from d4c_core.errors import D4CError

SERVER_START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class JobRequest:
    model: str
    pretrained: str | None
    checkpoint_id: str | None
    # Recipe JSON with only the fields the caller chose (the server fills in the defaults):
    # ``d4c_core.recipe_cli.recipe_overrides`` of the command line, or a manifest's recipe.
    recipe: dict[str, Any]
    eval_task: str | None

    def body(self) -> dict[str, Any]:
        """The ``POST /jobs`` body."""
        model: dict[str, Any] = {"arch": self.model}
        if self.checkpoint_id:
            model["checkpoint_id"] = self.checkpoint_id
        else:
            model["pretrained"] = self.pretrained or _default_pretrained(self.model)
        body: dict[str, Any] = {"model": model, "recipe": self.recipe}
        if self.eval_task:
            body["eval_task"] = self.eval_task
        return body


def _default_pretrained(arch: str) -> str | None:
    from d4c_core.models import BUILTIN_ARCHS, BUILTIN_TAG

    return BUILTIN_TAG if arch in BUILTIN_ARCHS else None


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _d4c(*args: str) -> list[str]:
    return [sys.executable, "-m", "d4c_core.cli", *args]


@contextlib.contextmanager
def local_server(log_path: Path) -> Iterator[tuple[str, str]]:
    """Run ``d4c serve`` (embedded default, this environment's settings) on a free port;
    yield its URL and a fresh API key; stop it on exit."""
    out = subprocess.run(
        _d4c("keys", "create", "--tenant", "d4c-submit"),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise D4CError(f"could not create an API key: {out.stderr.strip()[-500:]}")
    key = out.stdout.strip().splitlines()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            _d4c("serve", "--host", "127.0.0.1", "--port", str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(url, proc, log_path)
        yield url, key
    finally:
        _stop(proc)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise D4CError(f"`d4c serve` exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise D4CError(f"`d4c serve` was not ready after {SERVER_START_TIMEOUT_S:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # graceful: the worker hands back a running job
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _problem(r: httpx.Response) -> str:
    try:
        body = r.json()
        return f"{r.status_code} {body.get('title', '')}: {body.get('detail', '')}"
    except ValueError:
        return f"{r.status_code} {r.text[:200]}"


def follow(client: httpx.Client, job_id: str, timeout: float, quiet: bool) -> dict[str, Any]:
    """Poll the job until it ends; progress lines on stderr."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        r = client.get(f"/jobs/{job_id}")
        if r.status_code != 200:
            raise D4CError(f"GET /jobs/{job_id}: {_problem(r)}")
        job = r.json()
        line = (job["state"], job.get("stage"), round(100 * (job.get("progress") or 0), 1))
        if line != last and not quiet:
            print(f"[{line[2]:5.1f}%] {line[0]} {line[1] or ''}", file=sys.stderr, flush=True)
            last = line
        if job["state"] in FINISHED_STATES:
            return job
        if time.monotonic() > deadline:
            raise D4CError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
        time.sleep(1.0)


def download(client: httpx.Client, job_id: str, out: Path) -> dict[str, str]:
    """Download every artifact into ``out`` (replaced as a whole); return name → sha256,
    each checked against the listing and the response's ETag, then the manifest."""
    from d4c_core.artifacts import verify

    r = client.get(f"/jobs/{job_id}/artifacts")
    if r.status_code != 200:
        raise D4CError(f"GET /jobs/{job_id}/artifacts: {_problem(r)}")
    listing = r.json()
    items = listing["items"] if isinstance(listing, dict) else listing
    tmp = out.parent / f".{out.name}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    digests: dict[str, str] = {}
    for item in items:
        name, want = item["name"], item["sha256"]
        h = hashlib.sha256()
        with client.stream("GET", f"/jobs/{job_id}/artifacts/{name}") as resp:
            if resp.status_code != 200:
                raise D4CError(f"download {name}: {_problem(resp)}")
            etag = resp.headers.get("etag", "").strip('"').removeprefix("W/").strip('"')
            with (tmp / Path(name).name).open("wb") as f:
                for chunk in resp.iter_bytes():
                    h.update(chunk)
                    f.write(chunk)
        got = h.hexdigest()
        if got != want or (etag and etag != want):
            raise D4CError(f"{name}: sha256 {got} does not match the listing/ETag ({want})")
        digests[name] = got
    verify(tmp)  # the manifest's own checksums agree with the files
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return digests


def submit_and_follow(
    request: JobRequest,
    url: str | None,
    api_key: str | None,
    out: Path | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> int:
    """Run ``d4c submit``; 0 when the job succeeded (and downloaded), 1 when it did not."""
    if url is None:
        if not wait:
            raise D4CError("--no-wait needs --url: the private server stops when this exits")
        from app.core.config import get_settings

        log_path = get_settings().data_dir / "submit-serve.log"
        with local_server(log_path) as (local_url, key):
            return _run(request, local_url, key, out, True, timeout, as_json)
    if not api_key:
        raise D4CError("--url needs an API key (--api-key or D4C_API_KEY)")
    return _run(request, url, api_key, out, wait, timeout, as_json)


def _run(
    request: JobRequest,
    url: str,
    api_key: str,
    out: Path | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> int:
    headers = {"Authorization": f"Bearer {api_key}"}
    t0 = time.monotonic()
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        r = client.post("/jobs", json=request.body())
        if r.status_code != 202:
            raise D4CError(f"POST /jobs: {_problem(r)}")
        job = r.json()
        if not wait:
            print(json.dumps(job))
            return 0
        job = follow(client, job["id"], timeout, quiet=as_json)
        summary: dict[str, Any] = {
            "job_id": job["id"],
            "state": job["state"],
            "seconds": round(time.monotonic() - t0, 1),
            "metrics": job.get("metrics"),
            "error": job.get("error"),
        }
        if job["state"] == "succeeded":
            target = out or Path("out") / job["id"]
            summary["out"] = str(target)
            summary["sha256"] = download(client, job["id"], target)
    _print_summary(summary, as_json)
    return 0 if summary["state"] == "succeeded" else 1


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    print(f"job {summary['job_id']}: {summary['state']} in {summary['seconds']} s")
    if summary["error"]:
        print(f"error: {summary['error'].get('title')}: {summary['error'].get('detail')}")
        return
    zs = (summary["metrics"] or {}).get("zero_shot")
    if zs:
        print(
            f"{zs['task']} top-1: FP {zs['fp']['top1']:.2f}%  quantized "
            f"{zs['quantized']['top1']:.2f}%  (delta {zs['delta_top1']:+.2f})"
        )
    if "out" in summary:
        digest = summary["sha256"].get("model.safetensors")
        print(f"downloaded to {summary['out']}")
        print(f"model.safetensors sha256 {digest} (verified: listing, ETag, manifest)")
