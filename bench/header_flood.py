"""``/healthz`` latency while 64 MiB request headers are sent to ``d4c serve`` (issue 13).

    python bench/header_flood.py [--window 5] [--flood-mib 64] [--port P]

Run from a checkout's root: it starts that checkout's ``d4c serve`` (SQLite, in-memory broker,
so no worker shares the process) on a free loopback port. First ``/healthz`` is probed alone
for the window (the floor), then again while one client thread sends requests whose one header
is ``--flood-mib`` MiB, back to back on fresh connections, 64 KiB ``sendall`` at a time as fast
as the server takes them, until the window is over (a flood still being sent then is finished).
The probe is one keep-alive ``httpx`` client, one ``GET /healthz`` every 20 ms. Prints one JSON
object: per phase the probe count, median / p99 / max latency, and for the flood phase how many
floods ran, their status codes and the most bytes one flood got into the socket before the
server cut it. Running it in a checkout without the cap (``git worktree``/clone of an older
commit) gives the "before" row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _paths  # noqa: F401  (tests.support on the path)
import httpx

from tests.support.flood import send_header_flood


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (a reported value is one that occurred)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, root: Path) -> subprocess.Popen[bytes]:
    """This checkout's ``d4c serve``; returns once ``/healthz`` answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("D4C_")}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "D4C_DATA_DIR": str(root / "data"),
        "D4C_DATABASE_URL": f"sqlite:///{root / 'd4c.db'}",
        "D4C_BROKER_URL": "memory://",
        "D4C_LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-m", "d4c_core.cli", "serve", "--host", "127.0.0.1"]
    log = (root / "serve.log").open("wb")
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"d4c serve exited: {(root / 'serve.log').read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        time.sleep(0.2)
    proc.kill()
    sys.exit("d4c serve did not answer /healthz within 120 s")


def flood_once(port: int, size: int) -> dict[str, Any]:
    """One request with a ``size``-byte header: bytes sent before a cut, the status back."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sent = send_header_flood(sock, size)
        try:
            first = sock.recv(64)
        except OSError:
            first = b""
    status = int(first.split()[1]) if first.startswith(b"HTTP/") else 0
    return {"sent": sent, "status": status}


def probe(port: int, window: float, size: int | None) -> dict[str, Any]:
    """Probe ``/healthz`` for ``window`` s, with floods of ``size`` bytes running if given."""
    floods: list[dict[str, Any]] = []
    done = threading.Event()
    deadline = time.monotonic() + window

    def flooder() -> None:
        try:
            while time.monotonic() < deadline:
                floods.append(flood_once(port, size or 0))
        finally:
            done.set()

    latencies: list[float] = []
    start = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        client.get("/healthz")
        if size:
            threading.Thread(target=flooder, daemon=True).start()
        while not done.is_set() if size else time.monotonic() < deadline:
            t0 = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    out: dict[str, Any] = {
        "seconds": round(time.monotonic() - start, 1),
        "probes": len(latencies),
        "median_ms": round(percentile(latencies, 50) * 1e3, 1),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 1),
        "max_ms": round(max(latencies) * 1e3, 1),
    }
    if size:
        statuses = sorted({f["status"] for f in floods})
        out |= {"floods": len(floods), "statuses": statuses}
        out["max_bytes_sent"] = max(f["sent"] for f in floods)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=5.0, help="seconds per phase")
    ap.add_argument("--flood-mib", type=int, default=64)
    ap.add_argument("--port", type=int, default=0, help="default: a free one")
    args = ap.parse_args()
    port = args.port or free_port()
    with tempfile.TemporaryDirectory(prefix="d4c-flood-") as tmp:
        proc = start_server(port, Path(tmp))
        try:
            result = {
                "alone": probe(port, args.window, None),
                "flood": probe(port, args.window, args.flood_mib << 20),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
