"""Request-head cap (issue 13): ``d4c serve`` answers 431 to a request line + headers over
``D4C_MAX_HEADER_BYTES`` without reading the rest, and ``/healthz`` stays fast meanwhile.

Before the cap, one 64 MB header was read whole (httptools grows it with ``bytes +=``, so the
copying is quadratic on the event loop) and stalled ``/healthz`` for seconds. These tests run
a real ``d4c serve`` subprocess (SQLite, in-memory broker: no worker, nothing to migrate) and
talk to it over raw sockets, so the server under test is the one the service ships.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import httpx
import pytest

from tests.support.flood import send_header_flood
from tests.support.procs import Process, service_env, wait_for
from worker.client import free_port

CAP = 32768  # set through D4C_MAX_HEADER_BYTES, so the test also shows the setting is used
FLOOD_BYTES = 64 << 20  # one header value of 64 MiB, as in the issue
FLOOD_S = 2.0  # how long flood connections keep coming while /healthz is probed
HEALTHZ_MAX_S = 0.5  # the bound every /healthz during the flood must meet
CUT_BEFORE = FLOOD_BYTES // 2  # a refused flood must fail to send before this many bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A ``d4c serve`` on a free loopback port with the cap at ``CAP``; yields the port."""
    root = tmp_path_factory.mktemp("header-limit")
    env = service_env(
        root / "data",
        f"sqlite:///{root / 'd4c.db'}",
        "memory://",
        D4C_MAX_HEADER_BYTES=str(CAP),
        D4C_LOG_LEVEL="WARNING",
    )
    port = free_port()
    proc = Process(["serve", "--host", "127.0.0.1", "--port", str(port)], env, root / "api.log")

    def healthy() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"d4c serve exited:\n{proc.log_tail()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, 90, "d4c serve to answer /healthz", every=0.1)
        yield port
    finally:
        proc.stop()


def head(size: int) -> bytes:
    """A ``GET /healthz`` whose request line + headers are exactly ``size`` bytes."""
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a ``content-length`` body from ``sock.makefile("rb")``
    (buffered, so a second response in the same read is kept for the next call)."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), f"no response: {status_line[:200]!r}"
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, value = line.decode("latin-1").split(":", 1)
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def closed(stream: BinaryIO) -> bool:
    """True when the peer closed the connection (a FIN, or a reset if bytes were unread)."""
    try:
        return stream.read(1) == b""
    except ConnectionResetError:
        return True


@dataclass
class Flood:
    """What one oversized request achieved: bytes the kernel took before the server cut the
    connection, and the response it got."""

    sent: int
    status: int
    content_type: str
    body: bytes


def flood_once(port: int) -> Flood:
    """Send a ``FLOOD_BYTES`` header as fast as the server takes it; read what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sent = send_header_flood(sock, FLOOD_BYTES)
        # Linux keeps what arrived before the server's reset readable.
        status, headers, body = read_response(sock.makefile("rb"))
    return Flood(sent, status, headers.get("content-type", ""), body)


def test_head_at_the_cap_is_served_twice_on_one_connection(server: int) -> None:
    """A head of exactly the cap is a normal request, and the count restarts per request."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        stream = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(head(CAP))
            status, _, body = read_response(stream)
            assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_body_bytes_do_not_count_towards_the_cap(server: int) -> None:
    """A body 4x the cap, sent in one write with its head, is no head: the request and the
    next one on the connection are answered normally."""
    body = b'{"pad": "' + b"a" * (4 * CAP) + b'"}'
    post = b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    post += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(post + head(1024))
        stream = sock.makefile("rb")
        assert read_response(stream)[0] == 401  # no key: refused by the app, not the server
        assert read_response(stream)[0] == 200


def test_head_one_byte_over_the_cap_gets_431_problem_and_close(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(head(CAP + 1))
        stream = sock.makefile("rb")
        status, headers, body = read_response(stream)
        assert closed(stream), "the server must close the connection after a 431"
    assert status == 431
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["type"] == "/problems/header-too-large"
    assert problem["status"] == 431
    assert str(CAP) in problem["detail"]


def test_64mb_header_flood_is_cut_short_and_healthz_stays_fast(server: int) -> None:
    """Flood connections keep coming for ``FLOOD_S``; each gets a 431 long before its 64 MiB
    is sent, and every ``/healthz`` meanwhile answers within ``HEALTHZ_MAX_S``."""
    floods: list[Flood] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def flooder() -> None:
        deadline = time.monotonic() + FLOOD_S
        try:
            while time.monotonic() < deadline:
                floods.append(flood_once(server))
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=flooder, daemon=True)
    latencies: list[float] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{server}", timeout=30) as client:
        client.get("/healthz")  # connect before the flood starts
        thread.start()
        while not done.is_set():
            t0 = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    thread.join(timeout=30)

    if errors:
        raise errors[0]
    assert floods and latencies, "no flood request or /healthz probe finished"
    print(
        f"floods: {len(floods)}, statuses {sorted({f.status for f in floods})}, at most "
        f"{max(f.sent for f in floods)} bytes sent; /healthz n={len(latencies)} median "
        f"{statistics.median(latencies) * 1e3:.1f} ms max {max(latencies) * 1e3:.1f} ms"
    )
    assert [f.status for f in floods] == [431] * len(floods)
    assert {f.content_type for f in floods} == {"application/problem+json"}
    assert json.loads(floods[0].body)["type"] == "/problems/header-too-large"
    assert max(f.sent for f in floods) < CUT_BEFORE, "the server read the whole header"
    assert len(latencies) >= 10
    assert max(latencies) < HEALTHZ_MAX_S
