"""A request head that never ends: the client side of the header-flood test and benchmark."""

from __future__ import annotations

import contextlib
import socket

CHUNK = b"a" * 65536


def send_header_flood(sock: socket.socket, size: int) -> int:
    """Send a ``GET /healthz`` whose one header is ``size`` bytes, as fast as the server takes
    it; return the bytes sent before the server cut the connection (or all of them)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < size:
            sock.sendall(CHUNK)
            sent += len(CHUNK)
        sock.sendall(b"\r\n\r\n")
    return sent
