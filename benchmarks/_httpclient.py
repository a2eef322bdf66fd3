"""A minimal HTTP/1.1 keep-alive POST client on asyncio streams (httpx costs more CPU than the servers)."""

from __future__ import annotations

import asyncio

__all__ = ("HttpConnection",)


class HttpConnection:
    """One persistent connection; one request at a time (callers keep N connections for N in flight)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """POST ``body`` as JSON; returns (status, response body). Reconnects if the server closed."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        more = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{self.extra}{more}\r\n"
        )
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        # A few searches in C over the lowered head instead of a Python loop over every header
        # line: the client shares the 2 cores with the server, and a per-header cost would bill
        # a server for the headers it sends (splitchat's endpoint sends ~12, a bare route 4).
        lowered = raw.lower()
        length, chunked, close = 0, False, False
        at = lowered.find(b"\r\ncontent-length:")
        if at >= 0:
            length = int(lowered[at + 17 : lowered.index(b"\r\n", at + 2)])
        at = lowered.find(b"\r\ntransfer-encoding:")
        if at >= 0:
            chunked = b"chunked" in lowered[at + 20 : lowered.index(b"\r\n", at + 2)]
        at = lowered.find(b"\r\nconnection:")
        if at >= 0:
            close = lowered[at + 13 : lowered.index(b"\r\n", at + 2)].strip() == b"close"
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            content = b"".join(p[:-2] for p in parts)
        else:
            content = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, content

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
            self.writer = None
