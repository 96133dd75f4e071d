"""Serving an artifact from a file the route has already opened.

Starlette's ``FileResponse`` opens the file by path only after the route has returned, and
after it has sent the 200 status line: an artifact deleted in between (``DELETE
/jobs/{id}``, the retention sweep) would end a 200 response with a truncated body, or fail
its ``stat`` with a 500. Here the route opens the file first, so a file already gone is a
clean 404/410 problem, and once open the descriptor stays readable to the end whatever
happens to the path (POSIX unlink semantics), so a started download always completes.

Single byte ranges are served as ``FileResponse`` did (206, ``If-Range`` on the ETag);
several ranges are answered with the whole file, which RFC 9110 allows.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import BinaryIO
from urllib.parse import quote

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.problems import Problem

CHUNK_BYTES = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, if_range: str | None, etag: str, size: int) -> range | None:
    """The one range ``header`` asks for, or None for the whole file.

    Unparseable or multi-range headers and a stale ``If-Range`` fall back to the whole file;
    a range starting past the end is 416.
    """
    if header is None or (if_range is not None and if_range != etag):
        return None
    m = _RANGE.fullmatch(header.replace(" ", ""))
    if m is None or not (m[1] or m[2]):
        return None
    if m[1]:
        start = int(m[1])
        end = min(int(m[2]) + 1, size) if m[2] else size
        if m[2] and int(m[2]) < start:
            return None
    else:
        start, end = max(size - int(m[2]), 0), size
    if start >= size or (not m[1] and int(m[2]) == 0):
        raise Problem(
            416,
            "Range Not Satisfiable",
            f"the file has {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return range(start, end)


class OpenFileResponse(StreamingResponse):
    """Streams ``file`` (open, binary) and closes it however the response ends."""

    def __init__(
        self,
        file: BinaryIO,
        *,
        media_type: str,
        filename: str,
        headers: dict[str, str],
        span: range | None = None,
    ) -> None:
        self.file = file
        st = os.fstat(file.fileno())
        partial = span is not None
        span = span if span is not None else range(0, st.st_size)
        headers = headers | {
            "Content-Length": str(len(span)),
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            "Content-Disposition": f'attachment; filename="{quote(filename)}"',
        }
        if partial:
            headers["Content-Range"] = f"bytes {span.start}-{span.stop - 1}/{st.st_size}"
        super().__init__(
            self._chunks(span),
            status_code=206 if partial else 200,
            headers=headers,
            media_type=media_type,
        )

    async def _chunks(self, span: range) -> AsyncIterator[bytes]:
        await anyio.to_thread.run_sync(self.file.seek, span.start)
        left = len(span)
        while left > 0:
            chunk = await anyio.to_thread.run_sync(self.file.read, min(CHUNK_BYTES, left))
            if not chunk:  # artifacts are immutable once published; never a short body
                raise RuntimeError("artifact file shorter than its size")
            left -= len(chunk)
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.file.close)
