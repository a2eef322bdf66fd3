"""A tiny loopback TCP proxy for fault injection in end-to-end tests (anyio; asyncio and trio).

``cut()`` resets every open connection on both sides (SO_LINGER 0, so the peers see RST rather
than a polite FIN); ``stall()`` stops forwarding on the connections open right now, in both
directions, while keeping their sockets open (a zombie connection: nothing arrives, nothing
fails; new connections flow normally); ``refuse = True`` resets every new
connection right after accepting it. ``attempt_times`` records when each connection arrived.
"""

from __future__ import annotations

import socket
import struct
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
from anyio.abc import SocketAttribute


def _reset(stream: anyio.abc.SocketStream) -> None:
    sock = stream.extra(SocketAttribute.raw_socket)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` until told otherwise."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.refuse = False
        self.attempt_times: list[float] = []
        self._flowing: dict[tuple[anyio.abc.SocketStream, anyio.abc.SocketStream], anyio.Event] = {}
        self._connections: set[tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]] = set()
        self._cut_scopes: set[anyio.CancelScope] = set()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.SocketListener | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = self._listener.extra(SocketAttribute.local_port)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._listener.serve, self._handle)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task_group is not None and self._listener is not None
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)
        await self._listener.aclose()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def cut(self) -> int:
        """Reset every open connection (both sides); return how many were cut."""
        count = len(self._cut_scopes)
        for client, upstream in list(self._connections):
            _reset(client)
            _reset(upstream)
        for scope in list(self._cut_scopes):
            scope.cancel()
        return count

    def stall(self) -> int:
        """Stop forwarding both ways on every open connection (sockets stay open); return how many."""
        for pair in self._connections:
            if self._flowing[pair].is_set():
                self._flowing[pair] = anyio.Event()
        return len(self._connections)

    def unstall(self) -> None:
        """Forward again on the stalled connections (what was held is delivered)."""
        for event in self._flowing.values():
            event.set()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.attempt_times.append(anyio.current_time())
        if self.refuse:
            _reset(client)
            await client.aclose()
            return
        try:
            upstream = await anyio.connect_tcp(self.target_host, self.target_port)
        except OSError:
            _reset(client)
            await client.aclose()
            return
        pair = (client, upstream)
        self._connections.add(pair)
        self._flowing[pair] = anyio.Event()
        self._flowing[pair].set()
        try:
            with anyio.CancelScope() as scope:
                self._cut_scopes.add(scope)
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(self._pump, pair, client, upstream, task_group.cancel_scope)
                    task_group.start_soon(self._pump, pair, upstream, client, task_group.cancel_scope)
        finally:
            self._cut_scopes.discard(scope)
            self._connections.discard(pair)
            self._flowing.pop(pair).set()
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await upstream.aclose()

    async def _pump(
        self,
        pair: tuple[anyio.abc.SocketStream, anyio.abc.SocketStream],
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        scope: anyio.CancelScope,
    ) -> None:
        try:
            while True:
                data = await src.receive(65536)
                await self._flowing[pair].wait()
                await dst.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()
