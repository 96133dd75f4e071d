"""The HTTP server ``d4c serve`` runs: uvicorn on httptools, with a cap on request heads.

Why a cap of our own: neither llhttp (under httptools) nor uvicorn's httptools protocol limits
the request line or headers, and both grow a header value or URL chunk by chunk with
``bytes +=``. One unauthenticated 64 MB header thus costs quadratic copying on the event loop
and stalled every other request (``/healthz`` included) for seconds (issue 13). uvicorn's h11
protocol has a limit (``h11_max_incomplete_event_size``) but answers it with a 400 and is
slower; the service keeps httptools (``bench/api_load.py``) and counts head bytes itself.

``HeaderLimitedHttpToolsProtocol`` feeds the parser at most ``max_header_bytes`` of a request
head; a head still incomplete at that point gets ``431 Request Header Fields Too Large`` (an
RFC 9457 body) and the connection is closed, so the rest is never read or buffered. Everything
else is uvicorn's own behaviour.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.api.problems import PROBLEM_BASE, PROBLEM_JSON
from app.core.config import Settings

log = logging.getLogger("d4c.api")

HEADER_TOO_LARGE = PROBLEM_BASE + "header-too-large"


def header_too_large_body(max_header_bytes: int) -> bytes:
    """The 431's problem+json body (the same shape the app answers with)."""
    return json.dumps(
        {
            "type": HEADER_TOO_LARGE,
            "title": "Request header fields too large",
            "status": 431,
            "detail": f"The request line and headers exceed {max_header_bytes} bytes.",
        },
        separators=(",", ":"),
    ).encode()


class HeaderLimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses a request head over ``max_header_bytes``.

    Bytes are counted from the start of each request until its headers are complete. A
    pipelined request whose head begins inside the same read as the previous request's end is
    counted from the next read, so it may reach up to twice the cap before it is refused; the
    cost stays bounded either way, which is the point.
    """

    max_header_bytes: int = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        # Feed at most what is left of the cap while a head is incomplete, so the parser
        # never holds more than the cap of it.
        while data and self._in_head:
            room = self.max_header_bytes - self._head_bytes
            if len(data) <= room:
                chunk, data = data, b""
            else:
                chunk, data = data[:room], data[room:]
            self._head_bytes += len(chunk)
            super().data_received(chunk)
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # a 400 from the parser, a WebSocket upgrade, or the peer went away
            if self._in_head and self._head_bytes >= self.max_header_bytes:
                self._refuse_head()
                return
        if data:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _refuse_head(self) -> None:
        """Answer 431 and close: the rest of the head is never read."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.warning("request head from %s over %d bytes: 431", client, self.max_header_bytes)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head while the previous response is still being written: a 431
            # would land inside that response, so only close.
            self.transport.close()
            return
        body = header_too_large_body(self.max_header_bytes)
        content = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: " + PROBLEM_JSON.encode() + b"\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


def header_limited_protocol(max_header_bytes: int) -> type[HeaderLimitedHttpToolsProtocol]:
    """The protocol class with this cap (uvicorn instantiates ``http=`` itself, per
    connection, so the cap travels as a class attribute)."""
    if max_header_bytes < 1:
        raise ValueError(f"max_header_bytes must be positive, got {max_header_bytes}")
    return type(
        "HeaderLimitedHttpToolsProtocol",
        (HeaderLimitedHttpToolsProtocol,),
        {"max_header_bytes": max_header_bytes},
    )


def run(app: Any, host: str, port: int, settings: Settings) -> None:
    """Serve ``app`` as ``d4c serve`` does: one uvicorn process, httptools with the head cap,
    logging left to ``app.core.logging`` and no access log (the metrics count requests)."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=header_limited_protocol(settings.max_header_bytes),
        log_config=None,
        access_log=False,
    )
