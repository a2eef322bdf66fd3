"""The gateway's fast path: an asyncio-Protocol WebSocket server driving the same :class:`Gateway`.

Same protocol, same sans-I/O core (:class:`~splitchat._protocol.GatewayConnection`), same hub,
sessions, presence and drain as the ASGI route; only the socket layer differs:

* **No task per connection.** Bytes arrive in ``data_received`` and go straight through the frame
  parser into the core. Only the requests that need the application's async callbacks
  (IDENTIFY/RESUME authentication, channel authorization, hub subscription changes) run in a
  short-lived task, during which the connection stops reading (client frames stay in order and
  nothing is buffered beyond one TCP read). One timer per server enforces every deadline.
* **One write per connection per loop iteration.** Fan-out marks a connection dirty; one
  ``call_soon`` callback per server drains every dirty outbox and writes each connection's frames
  with a single ``transport.write`` (header + shared JSON prefix + ``s`` + ``}`` per frame).
  Flushing in slices: once ``_FLUSH_SLICE`` connections are dirty, they are written at once,
  from inside the fan-out, so the first recipients' bytes leave while the rest are still being
  queued (the clients read while the fan-out goes on, instead of after all of it). Only until a
  connection already written by a slice is marked again in the same loop iteration (several
  events per iteration, i.e. under load): from then on the iteration's frames are coalesced into
  one write per connection, as without slicing, so throughput does not pay for the latency gain.
* **Backpressure from the transport.** A connection stops draining its outbox while the
  transport's write buffer is above ``write_buffer_limit`` (``pause_writing``); its bounded
  outbox then overflows and the core closes it with 4010, exactly as on the ASGI path. Bytes in
  user space per connection are therefore at most ``write_buffer_limit`` + ``send_queue_bytes``.

asyncio only (uvloop recommended); the ASGI route keeps working on asyncio and trio.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Self, cast

from ._frames import Dispatch, Encoding
from ._gateway import Gateway
from ._local import _Local
from ._protocol import Action, Checkpoint, Close, ConnectionState, GatewayConnection
from ._websocket import (
    MAX_REQUEST_HEAD,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    HandshakeError,
    MessageTooLarge,
    ProtocolError,
    accept_response,
    close_frame,
    frame_header,
    parse_close,
    parse_request,
    reject_response,
)

__all__ = ("GatewayServer", "serve_gateway")

logger = logging.getLogger("splitchat.gateway")

# Actions Gateway._after applies without an await: a heartbeat acknowledgement (Checkpoint) must not
# pause reading and start a task.
_SYNC_ACTIONS = (Close, Checkpoint)
_JSON_SUFFIX = b"}"
_CLOSE_GRACE_SLOW = 0.5  # a stalled client will not read its close frame: abort soon
# Dirty connections written straight away during a fan-out: large enough that the per-flush cost
# is amortised, small enough that the first bytes of an event to 1,000 clients leave early.
_FLUSH_SLICE = 64


class _FastLocal(_Local):
    """The gateway's per-connection record, woken by marking its protocol dirty (no events)."""

    __slots__ = ("protocol",)

    def __init__(self, core: GatewayConnection, connection_id: str, protocol: _GatewayProtocol) -> None:
        # _Local.__init__ would make two anyio events: not needed here (no tasks wait on them).
        self.core = core
        self.connection_id = connection_id
        self.attached = True
        self.expires_at = 0.0
        self.checkpointed_at = 0.0  # read and written by the gateway's checkpoint loop
        self.closing = None
        self.close_sent = False
        self.protocol = protocol

    def wake(self) -> None:
        protocol = self.protocol
        if not protocol.dirty and self.attached:
            protocol.dirty = True
            protocol.server._mark_dirty(protocol)

    def notify_closing(self) -> None:
        # The close frame must go out even when writing is paused (a stalled client): it is tiny.
        self.protocol.flush(force=True)

    async def wait_closing(self) -> None:  # pragma: no cover - only the ASGI adapter waits
        raise NotImplementedError

    async def wait(self) -> None:  # pragma: no cover - only the ASGI adapter waits
        raise NotImplementedError


class _GatewayProtocol(asyncio.Protocol):
    """One client connection: handshake, then frames <-> the gateway core."""

    __slots__ = (
        "busy",
        "client_code",
        "lost",
        "opened_at",
        "close_timer",
        "dirty",
        "head",
        "local",
        "opcode",
        "parser",
        "paused",
        "pending",
        "server",
        "sliced_in",
        "transport",
    )

    def __init__(self, server: GatewayServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.head: bytearray | None = bytearray()  # the HTTP request head until the upgrade
        self.local: _FastLocal | None = None
        self.parser: FrameParser | None = None
        self.opcode = OP_TEXT
        self.dirty = False
        self.sliced_in = -1  # the server's flush round in which a slice flush last wrote it
        self.paused = False
        self.busy = False  # an async action is running: reading is paused, frames wait in pending
        self.pending: list[tuple[int, bytes]] = []
        self.client_code: int | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.opened_at = server.gateway._clock()

    # ---- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.server._watch(self)
        transport.set_write_buffer_limits(high=self.server.write_buffer_limit)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not TCP
                pass

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self._handshake_data(data)
            return
        parser = self.parser
        if parser is None:
            return  # closing: ignore anything after our close
        try:
            messages = parser.feed(data)
        except MessageTooLarge:
            self.parser = None
            self._force_close(4002, "frame too large")
            return
        except ProtocolError as exc:
            self.parser = None
            self._protocol_error(str(exc))
            return
        if self.busy:
            self.pending.extend(messages)
            return
        self._handle(messages)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport_gone()
        if not self.busy:  # else the running async action finishes first, as on the ASGI path
            self._finish()

    def eof_received(self) -> bool:
        return False  # a half-closed client is done: close our side too

    def transport_gone(self) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.parser = None
        self.server._protocols.discard(self)

    def _finish(self) -> None:
        local = self.local
        if local is None:
            return
        self.local = None
        code = self.client_code if self.client_code is not None else 1006
        local.core.connection_lost(code)
        local.attached = False
        self.server._connection_ended(local)

    # ---- handshake -------------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        head = self.head
        assert head is not None and self.transport is not None
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_REQUEST_HEAD:
                self._reject(431, "request head too large")
            return
        if end > MAX_REQUEST_HEAD:
            self._reject(431, "request head too large")
            return
        rest = bytes(head[end + 4 :])
        try:
            request = parse_request(bytes(head[:end]))
        except HandshakeError as exc:
            self._reject(exc.status, exc.reason)
            return
        self.head = None
        server = self.server
        gateway = server.gateway
        if request.path != server.path:
            self._reject(404, "not found")
            return
        scope = {
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
            "query_string": request.query.encode("latin-1"),
        }
        if not gateway._accepting or not gateway._origin_allowed(scope):
            self._reject(403, "forbidden")
            return
        encoding = gateway._encoding_of(scope)
        if encoding is None:
            self._reject(403, "unsupported encoding")
            return
        self.transport.write(accept_response(request.key))
        self._open(encoding)
        if rest:
            self.data_received(rest)

    def _reject(self, status: int, reason: str) -> None:
        assert self.transport is not None
        self.head = None
        self.transport.write(reject_response(status, reason))
        self.transport.close()

    def _open(self, encoding: Encoding) -> None:
        server = self.server
        gateway = server.gateway
        config = gateway.config
        self.opcode = OP_TEXT if encoding == "json" else OP_BINARY
        self.parser = FrameParser(config.max_frame_bytes)
        gateway._next_connection += 1
        local = _FastLocal(GatewayConnection(config, encoding), f"f{gateway._next_connection}", self)
        self.local = local
        gateway._connections.add(local)
        self._apply(local.core.start(gateway._clock()))

    # ---- client frames ---------------------------------------------------------------------

    def _handle(self, messages: list[tuple[int, bytes]]) -> None:
        for index, (opcode, payload) in enumerate(messages):
            local = self.local
            if local is None or self.parser is None:
                return
            if opcode == OP_PING:
                self._write_control(frame_header(OP_PONG, len(payload)) + payload)
                continue
            if opcode == OP_CLOSE:
                self._client_closed(parse_close(payload))
                return
            if opcode not in (OP_TEXT, OP_BINARY):
                continue  # pong
            core = local.core
            if core.state is ConnectionState.CLOSED:
                continue  # after our close only the client's close frame matters
            actions = core.receive_data(payload, self.server.gateway._clock())
            if actions and not all(isinstance(a, _SYNC_ACTIONS) for a in actions):
                # The application's async callbacks are needed: stop reading until they are done,
                # so frames are handled strictly in order and nothing piles up in user space.
                self.pending = messages[index + 1 :]
                self._start_async(actions)
                return
            self._apply(actions)

    def _apply(self, actions: Sequence[Action]) -> None:
        local = self.local
        if local is None:
            return
        if actions:
            self.server.gateway._after(local, actions)
        else:
            local.wake()

    def _start_async(self, actions: list[Action]) -> None:
        assert self.transport is not None and self.local is not None
        self.busy = True
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._run_async(self.local, actions))
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)

    async def _run_async(self, local: _FastLocal, actions: list[Action]) -> None:
        gateway = self.server.gateway
        try:
            await gateway._apply(local, actions)
        except Exception:
            logger.exception("gateway connection failed")
            gateway._after(local, local.core.force_close(4000, "internal error", resumable=True))
        finally:
            self.busy = False
        if self.lost:
            self._finish()
            return
        if self.local is not local or self.transport is None:
            return
        self.transport.resume_reading()
        pending, self.pending = self.pending, []
        if pending:
            self._handle(pending)

    def _client_closed(self, code: int) -> None:
        """The client sent a close frame: echo it (unless we closed first), then drop the TCP."""
        assert self.transport is not None
        self.client_code = code
        self.parser = None
        local = self.local
        if local is not None and not local.close_sent:
            local.close_sent = True
            echo = code if 1000 <= code < 5000 and code not in (1005, 1006, 1015) else 1000
            self._write_control(close_frame(echo))
        self.transport.close()

    def _protocol_error(self, reason: str) -> None:
        assert self.transport is not None
        local = self.local
        if local is not None:
            local.core.force_close(1002, reason[:100], resumable=True)
            local.close_sent = True
        self._write_control(close_frame(1002, reason))
        self.transport.close()

    def _force_close(self, code: int, reason: str) -> None:
        local = self.local
        if local is not None:
            self.server.gateway._after(local, local.core.force_close(code, reason, resumable=False))

    def _write_control(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(data)

    # ---- writing ---------------------------------------------------------------------------

    def flush(self, force: bool = False) -> None:
        """Write queued frames in one ``transport.write`` (stopping while the transport is above
        its high-water mark unless ``force``: a close must get out)."""
        self.dirty = False
        local = self.local
        transport = self.transport
        if local is None or transport is None or transport.is_closing():
            return
        if self.paused and not force:
            return
        core = local.core
        opcode = self.opcode
        json = opcode == OP_TEXT
        parts: list[bytes] = []
        size = 0
        limit = self.server.write_buffer_limit
        close: Close | None = None
        while size < limit or force:
            taken = core.next_outgoing_unrendered()
            if taken is None:
                break
            item, seq = taken
            if isinstance(item, Dispatch):
                if json:
                    prefix = item.json_prefix_bytes()
                    digits = str(seq).encode()
                    length = len(prefix) + len(digits) + 1
                    parts += (frame_header(opcode, length), prefix, digits, _JSON_SUFFIX)
                else:
                    frame = item.render("msgpack", seq)
                    assert isinstance(frame, bytes)
                    length = len(frame)
                    parts += (frame_header(opcode, length), frame)
            elif isinstance(item, Close):
                close = item
                break
            else:
                data = item.encode() if isinstance(item, str) else item
                length = len(data)
                parts += (frame_header(opcode, length), data)
            size += length
        if parts:
            transport.write(b"".join(parts))
        if close is not None:
            self._send_close(local, close)
        elif core.outbox_frames and not self.paused:
            local.wake()  # more than one write's worth: continue on the next loop iteration

    def _send_close(self, local: _FastLocal, close: Close) -> None:
        transport = self.transport
        assert transport is not None
        local.close_sent = True
        transport.write(close_frame(close.code, close.reason))
        if self.parser is None and transport.can_write_eof():
            # The client's frames cannot be parsed any more (oversized frame): it will not see its
            # close echo acknowledged by us, so end our side now (FIN after the buffer is flushed)
            # and keep reading until it closes, so its reply never meets a reset socket.
            transport.write_eof()
        # Wait for the client's close frame (it then closes the TCP connection); a client that
        # does not answer is cut after the grace period.
        grace = _CLOSE_GRACE_SLOW if close.code == 4010 else self.server.close_timeout
        loop = asyncio.get_running_loop()
        self.close_timer = loop.call_later(grace, self._close_timeout)

    def _close_timeout(self) -> None:
        self.close_timer = None
        if self.transport is not None and not self.transport.is_closing():
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # it never read its close frame: nothing more to flush
            else:
                self.transport.close()

    # ---- timers ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        local = self.local
        if local is None:
            if self.head is not None and now - self.opened_at > self.server.gateway.config.identify_timeout:
                self._reject(408, "handshake timeout")  # a socket that never finishes its request
            return
        deadline = local.core.next_deadline()
        if deadline is not None and deadline <= now:
            actions = local.core.tick(now)
            if actions:
                self.server.gateway._after(local, actions)


class GatewayServer:
    """Serve a :class:`Gateway` on its own listening socket with a built-in WebSocket server.

    The fast path for fan-out: same wire protocol, same ``Gateway`` object (so the ASGI route,
    the command endpoint and this server can share one gateway and bus), but framing, writes and
    deadlines run in asyncio protocol callbacks with no task per connection. asyncio only.

    Usage, next to any ASGI server in the same event loop (e.g. in the app's lifespan, after
    ``async with bus, gateway:``)::

        async with GatewayServer(gateway, host="0.0.0.0", port=8001):
            ...

    Args:
        gateway: a started :class:`Gateway`.
        host, port: where to listen (``port=0`` picks a free port; see :attr:`port`).
        path: the request path served (others get 404).
        sock: an already bound socket instead of ``host``/``port``.
        write_buffer_limit: bytes a connection may hold in its transport's buffer before
            draining its outbox stops (then the outbox bound applies: close 4010).
        close_timeout: seconds to wait for the client's close frame after ours.
        backlog: the listen backlog.
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/gateway",
        sock: socket.socket | None = None,
        write_buffer_limit: int = 64 * 1024,
        close_timeout: float = 5.0,
        backlog: int = 1024,
    ) -> None:
        self.gateway = gateway
        self.host = host
        self.path = path
        self.write_buffer_limit = write_buffer_limit
        self.close_timeout = close_timeout
        self._port = port
        self._sock = sock
        self._backlog = backlog
        self._server: asyncio.Server | None = None
        self._protocols: set[_GatewayProtocol] = set()
        self._dirty: list[_GatewayProtocol] = []
        self._flush_scheduled = False  # a _flush_soon callback is pending
        self._flushing = False  # inside _flush_dirty: never nest a slice flush
        self._round = 0  # counts _flush_soon calls (loop iterations with writes)
        self._slicing = True  # this round may still flush in slices
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (after :meth:`start`)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("GatewayServer is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Start listening (the gateway must already be started)."""
        if self._server is not None:
            return
        self._loop = loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(
                lambda: _GatewayProtocol(self), sock=self._sock, backlog=self._backlog
            )
        else:
            self._server = await loop.create_server(
                lambda: _GatewayProtocol(self), self.host, self._port, backlog=self._backlog
            )
        self._schedule_tick()

    async def close(self) -> None:
        """Stop listening and abort the remaining connections (drain the gateway first to send
        every client RECONNECT: ``await gateway.drain()``). Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                protocol.transport.abort()
        await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled; then close."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- internals used by the protocols ---------------------------------------------------

    def _watch(self, protocol: _GatewayProtocol) -> None:
        self._protocols.add(protocol)

    def _mark_dirty(self, protocol: _GatewayProtocol) -> None:
        dirty = self._dirty
        dirty.append(protocol)
        if protocol.sliced_in == self._round:
            self._slicing = False  # a second event for it this round: coalesce from now on
        elif len(dirty) >= _FLUSH_SLICE and self._slicing and not self._flushing:
            # A full slice (a fan-out in progress): write it now rather than after the last
            # recipient is queued. Nothing here awaits or changes routing, and transport errors
            # surface later through connection_lost, so the caller's iteration is unaffected.
            current = self._round
            for sliced in dirty:
                sliced.sliced_in = current
            self._flush_dirty()
        if not self._flush_scheduled and self._dirty and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        self._round += 1
        self._slicing = True
        self._flush_dirty()

    def _flush_dirty(self) -> None:
        # Connections re-marked while flushing (more than one write's worth queued) land in the
        # fresh list and are written on a later flush, never in this one.
        dirty, self._dirty = self._dirty, []
        self._flushing = True
        try:
            for protocol in dirty:
                if protocol.dirty:
                    try:
                        protocol.flush()
                    except Exception:  # a bug must not stop the other connections' writes
                        logger.exception("gateway write failed")
        finally:
            self._flushing = False

    def _connection_ended(self, local: _FastLocal) -> None:
        gateway = self.gateway
        gateway._connections.discard(local)
        if not gateway._connections and gateway._idle is not None:
            gateway._idle.set()
        if local.core.session is None:
            return
        task = asyncio.get_running_loop().create_task(self._detach(local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _detach(self, local: _FastLocal) -> None:
        try:
            await self.gateway._detach(local)
        except Exception:
            logger.exception("detaching a session failed")

    def _tick_period(self) -> float:
        config = self.gateway.config
        shortest = min(config.identify_timeout, config.heartbeat_interval)
        return max(0.01, min(1.0, shortest / 10))

    def _schedule_tick(self) -> None:
        if self._loop is not None and self._server is not None:
            self._timer = self._loop.call_later(self._tick_period(), self._tick)

    def _tick(self) -> None:
        # One timer for every connection's identify/heartbeat deadline (a scan: with the default
        # 1 s period it costs well under 1 ms per 5,000 connections).
        now = self.gateway._clock()
        for protocol in list(self._protocols):
            try:
                protocol.tick(now)
            except Exception:  # pragma: no cover - a bug must not stop every other deadline
                logger.exception("gateway deadline check failed")
        self._schedule_tick()


async def serve_gateway(
    gateway: Gateway, host: str = "127.0.0.1", port: int = 8001, *, path: str = "/gateway"
) -> None:
    """Serve ``gateway`` (started here, with its bus already started) on ``host:port`` until
    cancelled: ``asyncio.run(serve_gateway(gateway, "0.0.0.0", 8001))`` inside ``async with bus:``."""
    async with gateway, GatewayServer(gateway, host=host, port=port, path=path) as server:
        logger.info("gateway listening on %s:%s%s", host, server.port, path)
        await asyncio.Event().wait()
