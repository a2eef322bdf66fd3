"""A minimal WebSocket client: wsproto (sans-I/O) over an anyio TCP stream.

It runs on asyncio and trio alike (the ``websockets`` library is asyncio-only). It does exactly
what the gateway client needs: handshake, whole text/binary messages, ping/pong, close codes.
Sends are serialised by a lock; reads are meant for one reader task at a time.
"""

from __future__ import annotations

import ssl
from collections import deque
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = ("ConnectionClosed", "HandshakeRejected", "WebSocket")

_READ_SIZE = 65536
ABNORMAL_CLOSURE = 1006  # RFC 6455: no close frame was received (never sent on the wire)


class ConnectionClosed(Exception):
    """The WebSocket is closed; ``code`` is the peer's close code, or 1006 if the socket just died."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class HandshakeRejected(Exception):
    """The server answered the upgrade request with an HTTP status instead of 101."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"WebSocket upgrade rejected with HTTP {status_code}")
        self.status_code = status_code


class WebSocket:
    """An open client WebSocket. Create it with :meth:`connect`."""

    def __init__(self, stream: anyio.abc.ByteStream, ws: WSConnection, max_message_bytes: int) -> None:
        self._stream = stream
        self._ws = ws
        self._max_message_bytes = max_message_bytes
        self._events: deque[Event] = deque()
        self._send_lock = anyio.Lock()
        self._parts: list[bytes | bytearray | str] = []
        self._size = 0
        self._closed: ConnectionClosed | None = None
        self._closed_event = anyio.Event()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> WebSocket:
        """Open a TCP (or TLS for ``wss``) connection to ``url`` and perform the handshake.

        Raises ``OSError`` for connection failures, :class:`HandshakeRejected` for a non-101
        answer and :class:`ConnectionClosed` if the socket dies during the handshake. Wrap the
        call in a timeout: a server that accepts TCP but never answers would block it.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        tls = parts.scheme == "wss"
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        stream: anyio.abc.ByteStream
        if tls:
            stream = await anyio.connect_tcp(
                parts.hostname, port, tls=True, ssl_context=ssl_context, tls_standard_compatible=False
            )
        else:
            stream = await anyio.connect_tcp(parts.hostname, port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            host = parts.netloc.rpartition("@")[2]
            extra = [(k.encode(), v.encode()) for k, v in headers or []]
            socket = cls(stream, ws, max_message_bytes)
            try:
                await stream.send(ws.send(Request(host=host, target=target, extra_headers=extra)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise ConnectionClosed(ABNORMAL_CLOSURE, "connection lost during handshake") from exc
            await socket._handshake()
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return socket

    async def _handshake(self) -> None:
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    raise HandshakeRejected(event.status_code)
                if isinstance(event, RejectData):
                    continue
            await self._read_more()

    async def _read_more(self) -> None:
        try:
            data = await self._stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            data = None
        try:
            self._ws.receive_data(data)
            self._events.extend(self._ws.events())
        except RemoteProtocolError as exc:
            raise ConnectionClosed(1002, f"protocol error: {exc}") from exc
        if data is None and not self._events:
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection lost")

    async def receive(self) -> str | bytes:
        """Return the next whole message; raise :class:`ConnectionClosed` when the socket closes."""
        if self._closed is not None:
            raise self._closed
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, TextMessage | BytesMessage):
                    self._size += len(event.data)
                    if self._size > self._max_message_bytes:
                        await self.close(1009, "message too big")
                        raise ConnectionClosed(1009, "message too big")
                    self._parts.append(event.data)
                    if event.message_finished:
                        parts, self._parts, self._size = self._parts, [], 0
                        if isinstance(event, TextMessage):
                            return "".join(p for p in parts if isinstance(p, str))
                        return b"".join(p for p in parts if isinstance(p, bytes | bytearray))
                elif isinstance(event, Ping):
                    await self._send_event(event.response())
                elif isinstance(event, CloseConnection):
                    self._closed = ConnectionClosed(event.code, event.reason or "")
                    self._closed_event.set()
                    if self._ws.state == ConnectionState.REMOTE_CLOSING:
                        await self._send_event(event.response())
                    await anyio.aclose_forcefully(self._stream)
                    raise self._closed
            try:
                await self._read_more()
            except ConnectionClosed as exc:
                self._closed = exc
                self._closed_event.set()
                await anyio.aclose_forcefully(self._stream)
                raise

    async def _send_event(self, event: Event) -> None:
        async with self._send_lock:
            try:
                data = self._ws.send(event)
                await self._stream.send(data)
            except LocalProtocolError as exc:
                raise ConnectionClosed(
                    self._closed.code if self._closed else ABNORMAL_CLOSURE, str(exc)
                ) from exc
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(ABNORMAL_CLOSURE, "connection lost") from exc

    async def send(self, message: str | bytes) -> None:
        """Send one text (``str``) or binary (``bytes``) message."""
        if self._closed is not None:
            raise self._closed
        if isinstance(message, str):
            await self._send_event(TextMessage(data=message))
        else:
            await self._send_event(BytesMessage(data=message))

    async def close(self, code: int = 1000, reason: str = "", *, timeout: float = 2.0) -> None:
        """Send a close frame (bounded by ``timeout``: a stalled peer cannot hold us) and drop the socket.

        The peer's close reply is not awaited: the gateway client reconnects right away and the
        close code already told the server whether the session ends (1000) or stays resumable.
        """
        try:
            if self._closed is None and self._ws.state == ConnectionState.OPEN:
                with anyio.move_on_after(timeout):
                    await self._send_event(CloseConnection(code=code, reason=reason))
        except ConnectionClosed:
            pass
        finally:
            if self._closed is None:
                self._closed = ConnectionClosed(code, reason)
            self._closed_event.set()
            await anyio.aclose_forcefully(self._stream)

    async def send_close(self, code: int = 1000, reason: str = "", *, timeout: float = 2.0) -> None:
        """Start the close handshake only: the reader task sees the peer's reply and ends.

        Use it when another task is reading; :meth:`wait_closed` waits for the reply. Closing
        the socket while unread data is pending would make the kernel send a RST, which can make
        the peer discard the close frame itself.
        """
        if self._closed is None and self._ws.state == ConnectionState.OPEN:
            with anyio.move_on_after(timeout):
                try:
                    await self._send_event(CloseConnection(code=code, reason=reason))
                except ConnectionClosed:
                    pass

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (peer's close frame seen, or the socket died)."""
        await self._closed_event.wait()

    async def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        if self._closed is None:
            self._closed = ConnectionClosed(ABNORMAL_CLOSURE, "aborted")
        self._closed_event.set()
        await anyio.aclose_forcefully(self._stream)
