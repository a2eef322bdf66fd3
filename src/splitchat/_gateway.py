"""The WebSocket event gateway: a thin pure-ASGI adapter around :mod:`splitchat._protocol`.

Per connection: one reader loop (client frames -> machine), one writer task (machine outbox ->
socket), one deadline ticker and one close watchdog, all in the connection's task group. Fan-out
never awaits a socket: the hub appends to each session's bounded outbox and wakes its writer.

Per process: ONE bus subscription, the hub (:mod:`splitchat._hub`: routing, fan-out, presence).
RESUME and the crash checkpoints are in :mod:`splitchat._resume`. This module keeps the
gateway's lifecycle (start, drain, close), the ASGI adapter, the connection's tasks, the
application callbacks (authentication, channel authorization) and session detach / expiry.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs

import anyio
import anyio.abc

from ._auth import AuthenticationError, Authenticator, ChannelAuthorizer, Principal, allow_all_channels
from ._frames import Encoding
from ._hub import Hub
from ._local import _Local
from ._presence import InMemoryPresence, Presence
from ._protocol import (
    Action,
    Authenticate,
    AuthorizeChannels,
    Checkpoint,
    Close,
    ConnectionState,
    GatewayConfig,
    GatewayConnection,
    ResumeLookup,
    Subscribe,
    Unsubscribe,
)
from ._resume import checkpoint_loop, resume
from ._sessions import InMemorySessionStore, SessionRecord, SessionStore
from ._types import Receive, Scope, Send
from .bus._base import Bus, Subscription

__all__ = ("Gateway",)

logger = logging.getLogger("splitchat.gateway")


class Gateway:
    """The WebSocket gateway: ``WebSocketRoute("/gateway", gateway)`` or any ASGI websocket scope.

    Run it with ``async with gateway:`` (or ``await gateway.start()`` / ``await gateway.close()``)
    inside the app's lifespan, after the bus is started. ``close()`` drains: every client gets
    RECONNECT (op 7), new connections are refused, and resumable sessions are saved to the
    session store so another node can resume them, all within ``drain_timeout`` seconds.

    Args:
        bus: the started bus to subscribe to.
        authenticator: resolves IDENTIFY/RESUME tokens.
        authorize_channel: may a principal subscribe to a channel.
        heartbeat_interval, identify_timeout, resume_window: seconds.
        max_frame_bytes: largest client frame accepted.
        frame_budget, frame_budget_window: inbound frames per window (heartbeats exempt).
        send_queue_frames, send_queue_bytes: per-connection outbox bound (then close 4010).
        max_channels: channels per session; max_channel_length: longest channel name. Both
            are advertised in HELLO; channels over them are answered in READY/SUBSCRIBED
            ``denied`` (not a close).
        allowed_origins: accepted ``Origin`` headers; ``None`` accepts any (non-browser clients
            send none; a browser handshake from another site is refused with HTTP 403).
        session_store: where drained sessions wait for a resume on another node.
        presence: channel membership; ``None`` uses an in-memory one.
        announce_presence: dispatch PRESENCE_UPDATE on first join / last leave. A join storm
            into one channel of N members costs N^2/2 frames; very large channels turn it off
            and query ``presence.members()`` instead (membership is tracked either way).
        resume_gateway_url: sent in READY for clients to resume against.
        drain_timeout: seconds ``close()`` waits for clients to receive RECONNECT.
        node_id: this node's name in session records and presence leases (default: random);
            must differ between the processes sharing a session store.
        checkpoint_interval: seconds between batched checkpoint writes of the connected
            sessions whose checkpoint moved (crash-safe resume; see docs/gateway.md).
        clock: monotonic seconds (tests may pass a fake one).
    """

    def __init__(
        self,
        bus: Bus,
        authenticator: Authenticator,
        *,
        authorize_channel: ChannelAuthorizer = allow_all_channels,
        heartbeat_interval: float = 41.25,
        identify_timeout: float = 10.0,
        resume_window: float = 120.0,
        max_frame_bytes: int = 4096,
        frame_budget: int = 120,
        frame_budget_window: float = 60.0,
        send_queue_frames: int = 1000,
        send_queue_bytes: int = 1 << 20,
        max_channels: int = 100,
        max_channel_length: int = 200,
        allowed_origins: Iterable[str] | None = None,
        session_store: SessionStore | None = None,
        presence: Presence | None = None,
        resume_gateway_url: str | None = None,
        announce_presence: bool = True,
        drain_timeout: float = 5.0,
        node_id: str | None = None,
        checkpoint_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.authenticator = authenticator
        self.authorize_channel = authorize_channel
        self.config = GatewayConfig(
            heartbeat_interval=heartbeat_interval,
            identify_timeout=identify_timeout,
            resume_window=resume_window,
            max_frame_bytes=max_frame_bytes,
            frame_budget=frame_budget,
            frame_budget_window=frame_budget_window,
            send_queue_frames=send_queue_frames,
            send_queue_bytes=send_queue_bytes,
            replay_frames=send_queue_frames,
            replay_bytes=send_queue_bytes,
            max_channels=max_channels,
            max_channel_length=max_channel_length,
            resume_gateway_url=resume_gateway_url,
        )
        self.allowed_origins = None if allowed_origins is None else frozenset(allowed_origins)
        self.session_store: SessionStore = (
            session_store if session_store is not None else InMemorySessionStore()
        )
        self.drain_timeout = drain_timeout
        self.node_id = node_id if node_id is not None else secrets.token_hex(6)
        self.checkpoint_interval = checkpoint_interval
        self._dirty: set[_Local] = set()  # connected sessions whose checkpoint must be written
        self._clock = clock
        self._hub = Hub(
            bus,
            presence if presence is not None else InMemoryPresence(),
            announce_presence=announce_presence,
            clock=clock,
            after=self._after,
        )
        self._sessions: dict[str, _Local] = {}  # session id -> host (attached or detached)
        self._connections: set[_Local] = set()  # attached connections
        # anyio primitives need a running loop: they are made in start(), so a Gateway can be
        # built at import time like any ASGI app.
        self._idle: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._accepting = False
        self._drained = False
        self._background_scope: anyio.CancelScope | None = None
        self._background_done: anyio.Event | None = None
        self._next_connection = 0

    # The hub holds these (it subscribes, announces and tracks presence with them).

    @property
    def bus(self) -> Bus:
        """The bus the gateway subscribes to."""
        return self._hub.bus

    @bus.setter
    def bus(self, bus: Bus) -> None:
        self._hub.bus = bus

    @property
    def presence(self) -> Presence:
        """Channel membership of the connected sessions."""
        return self._hub.presence

    @presence.setter
    def presence(self, presence: Presence) -> None:
        self._hub.presence = presence

    @property
    def announce_presence(self) -> bool:
        """Whether PRESENCE_UPDATE is published on first join / last leave."""
        return self._hub.announce_presence

    @announce_presence.setter
    def announce_presence(self, announce: bool) -> None:
        self._hub.announce_presence = announce

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the hub subscription and start the fan-out and expiry tasks."""
        if self._task_group is not None:
            return
        subscription = self._hub.open()
        self._background_scope = anyio.CancelScope()
        self._background_done = anyio.Event()
        self._drained = False
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._background, subscription)
        self._accepting = True

    async def _background(self, subscription: Subscription) -> None:
        assert self._background_scope is not None and self._background_done is not None
        try:
            with self._background_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._hub.run, subscription)
                    tg.start_soon(self._expiry_loop)
                    tg.start_soon(checkpoint_loop, self)
        finally:
            self._background_done.set()

    async def drain(self) -> None:
        """Graceful drain, callable from any task: RECONNECT every client, refuse new
        connections, stop fan-out, and save every resumable session to the session store.

        Bounded by ``drain_timeout`` for the clients and again for the store. Idempotent.
        """
        if self._task_group is None or self._drained:
            return
        self._drained = True
        self._accepting = False
        # Freeze the connected sessions BEFORE telling clients to go: stop routing events to
        # them (no await between that and the snapshot, so the snapshot holds exactly what was
        # queued) and save the full records. A client reconnecting at once to another node then
        # always finds its record there, and never has a seq the record lacks.
        frozen: list[SessionRecord] = []
        expires_at = self._record_expiry()
        for local in list(self._connections):
            session = local.core.session
            if session is None or local.core.state is not ConnectionState.CONNECTED:
                continue
            self._hub.unroute(local, session.channels)
            frozen.append(SessionRecord.from_state(session, expires_at, self.node_id))
        with anyio.move_on_after(self.drain_timeout):
            try:
                await self.session_store.save_many(frozen)
            except Exception:
                logger.exception("saving %d sessions before drain failed", len(frozen))
        now = self._clock()
        for local in list(self._connections):
            self._after(local, local.core.reconnect(now))
        with anyio.move_on_after(self.drain_timeout):
            while self._connections:
                self._idle = anyio.Event()
                await self._idle.wait()
        # Stop fan-out first, so the snapshots' positions are final: whatever is published from
        # here on is found by the next node in bus history after those positions.
        if self._background_scope is not None and self._background_done is not None:
            self._background_scope.cancel()
            await self._background_done.wait()
        await self._hub.aclose()
        expires_at = time.time() + self.config.resume_window
        records = [
            SessionRecord.from_state(local.core.session, expires_at, self.node_id)
            for local in self._sessions.values()
            if local.core.session is not None and local.core.resumable
        ]
        with anyio.move_on_after(self.drain_timeout):
            try:
                await self.session_store.save_many(records)
            except Exception:
                logger.exception("saving %d sessions on drain failed", len(records))
        self._dirty.clear()
        self._sessions.clear()
        self._hub.routes.clear()

    async def close(self) -> None:
        """Drain (see :meth:`drain`), then end the gateway's task group. Idempotent.

        Call it from the task that called :meth:`start` (``async with gateway:`` does).
        """
        if self._task_group is None:
            return
        await self.drain()
        task_group, self._task_group = self._task_group, None
        task_group.cancel_scope.cancel()
        await task_group.__aexit__(None, None, None)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- introspection (tests, metrics) ----------------------------------------------------

    @property
    def connection_count(self) -> int:
        """Attached WebSocket connections."""
        return len(self._connections)

    def session_ids(self) -> list[str]:
        """Ids of the sessions this node hosts (attached or waiting for a resume)."""
        return list(self._sessions)

    def connection_of(self, session_id: str) -> GatewayConnection | None:
        """The protocol machine currently hosting ``session_id`` (for metrics and tests)."""
        local = self._sessions.get(session_id)
        return local.core if local is not None else None

    # ---- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await send(
                {"type": "http.response.start", "status": 426, "headers": [(b"upgrade", b"websocket")]}
            )
            await send({"type": "http.response.body", "body": b"WebSocket only"})
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not self._accepting or not self._origin_allowed(scope):
            # A close before accept is an HTTP 403 denial of the handshake.
            await send({"type": "websocket.close", "code": 1008})
            return
        encoding = self._encoding_of(scope)
        if encoding is None:
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        self._next_connection += 1
        local = _Local(GatewayConnection(self.config, encoding), f"{self.node_id}:c{self._next_connection}")
        self._connections.add(local)
        try:
            await self._serve(local, receive, send)
        except Exception:
            # A failing dependency (bus, store, presence backend), never client input: close
            # with 4000 (resumable) rather than leaking an exception into the server.
            logger.exception("gateway connection failed")
            local.core.force_close(4000, "internal error", resumable=True)
            with anyio.move_on_after(1.0, shield=True):
                try:
                    await send({"type": "websocket.close", "code": 4000, "reason": "internal error"})
                except Exception:
                    pass
        finally:
            self._connections.discard(local)
            if not self._connections and self._idle is not None:
                self._idle.set()
            await self._detach(local)

    def _origin_allowed(self, scope: Scope) -> bool:
        if self.allowed_origins is None:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                return value.decode("latin-1") in self.allowed_origins
        return True  # non-browser clients send no Origin; browsers always do

    @staticmethod
    def _encoding_of(scope: Scope) -> Encoding | None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        value = query.get("encoding", ["json"])[-1]
        if value == "json":
            return "json"
        if value == "msgpack":
            return "msgpack"
        return None

    async def _serve(self, local: _Local, receive: Receive, send: Send) -> None:
        client_code: int | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._writer, local, send, tg.cancel_scope)
            tg.start_soon(self._ticker, local)
            tg.start_soon(self._watchdog, local, tg.cancel_scope)
            await self._apply(local, local.core.start(self._clock()))
            while local.core.state is not ConnectionState.CLOSED:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    client_code = message.get("code", 1006)
                    tg.cancel_scope.cancel()
                    break
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                await self._apply(local, local.core.receive_data(data, self._clock()))
            else:
                await anyio.sleep_forever()  # the writer / watchdog end the connection
        local.core.connection_lost(client_code)
        if local.closing is not None and not local.close_sent and client_code is None:
            # The writer could not deliver the close frame in time (a stalled client): try once more.
            with anyio.move_on_after(2.0, shield=True):
                try:
                    await send(
                        {
                            "type": "websocket.close",
                            "code": local.closing.code,
                            "reason": local.closing.reason,
                        }
                    )
                except Exception:  # the socket may already be gone
                    pass

    async def _writer(self, local: _Local, send: Send, scope: anyio.CancelScope) -> None:
        core = local.core
        while True:
            item = core.next_outgoing()
            if item is None:
                await local.wait()
                continue
            try:
                if isinstance(item, Close):
                    local.close_sent = True  # nothing left for the fallback in _serve
                    await send({"type": "websocket.close", "code": item.code, "reason": item.reason})
                    scope.cancel()
                    return
                if isinstance(item, str):
                    await send({"type": "websocket.send", "text": item})
                else:
                    await send({"type": "websocket.send", "bytes": item})
            except Exception:
                # The peer is gone (or closed first): the reader sees the disconnect; stop writing.
                # Do not cancel the connection here: the reader must still receive the server's
                # websocket.disconnect, whose code decides the session (1000/1001 end it, else it
                # stays resumable). Cancelling raced a client's close 1000 and kept its session.
                logger.debug("send failed; connection is going away", exc_info=True)
                local.close_sent = True
                return

    async def _ticker(self, local: _Local) -> None:
        core = local.core
        while (deadline := core.next_deadline()) is not None:
            await anyio.sleep(max(deadline - self._clock(), 0.0) + 0.001)
            await self._apply(local, core.tick(self._clock()))

    async def _watchdog(self, local: _Local, scope: anyio.CancelScope) -> None:
        # A closing connection gets a bounded time to flush its outbox; a writer stuck on a
        # client that stopped reading is then cancelled.
        await local.wait_closing()
        assert local.closing is not None
        grace = 0.5 if local.closing.code == 4010 else self.drain_timeout
        await anyio.sleep(grace)
        scope.cancel()

    # ---- actions ---------------------------------------------------------------------------

    async def _apply(self, local: _Local, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Authenticate):
                principal = await self._authenticate(action.token)
                session_id = secrets.token_urlsafe(18)
                more = local.core.identified(principal, session_id, self._clock())
                if principal is not None and local.core.session is not None:
                    self._sessions[session_id] = local
                await self._apply(local, more)
            elif isinstance(action, AuthorizeChannels):
                granted, denied = await self._authorize(local, action.channels)
                await self._apply(local, local.core.authorized(granted, denied, self._clock()))
            elif isinstance(action, Subscribe):
                await self._hub.add(local, action.channels)
            elif isinstance(action, Unsubscribe):
                await self._hub.remove(local, action.channels)
            elif isinstance(action, ResumeLookup):
                await resume(self, local, action)
            elif isinstance(action, Checkpoint):
                self._dirty.add(local)
            else:
                self._closing(local, action)
        local.wake()

    def _after(self, local: _Local, actions: Sequence[Action]) -> None:
        """Apply the actions that need no await: closes and checkpoints (what a delivery, a drain
        or, on the fast path, a client acknowledgement produces)."""
        for action in actions:
            if isinstance(action, Close):
                self._closing(local, action)
            elif isinstance(action, Checkpoint):
                self._dirty.add(local)
        local.wake()

    def _closing(self, local: _Local, close: Close) -> None:
        local.closing = close
        local.wake()
        local.notify_closing()

    async def _authenticate(self, token: str) -> Principal | None:
        try:
            return await self.authenticator(token)
        except AuthenticationError:
            return None
        except Exception:
            logger.exception("authenticator failed")
            return None

    async def _authorize(self, local: _Local, channels: Sequence[str]) -> tuple[list[str], list[str]]:
        session = local.core.session
        granted: list[str] = []
        denied: list[str] = []
        if session is None:
            return granted, list(channels)
        for channel in channels:
            try:
                ok = await self.authorize_channel(session.principal, channel)
            except Exception:
                logger.exception("channel authorizer failed")
                ok = False
            (granted if ok else denied).append(channel)
        return granted, denied

    # ---- sessions: detach, drop, expiry ----------------------------------------------------

    async def _detach(self, local: _Local) -> None:
        """The connection ended: keep a resumable session for the window, drop anything else."""
        core = local.core
        session = core.session
        if session is None:
            return
        local.attached = False
        self._dirty.discard(local)
        with anyio.CancelScope(shield=True):
            await self._hub.presence_leave(local, session.channels)
            if core.resumable:
                local.expires_at = self._clock() + self.config.resume_window
                # The full record, so that a RESUME landing on another node (no sticky
                # sessions) replays exactly, without duplicates.
                with anyio.move_on_after(self.drain_timeout):
                    try:
                        record = SessionRecord.from_state(session, self._record_expiry(), self.node_id)
                        await self.session_store.save(record)
                    except Exception:
                        logger.warning("saving session %s on disconnect failed", session.session_id)
            elif not core.resumable:
                await self._drop_session(local, session.session_id, session.channels)

    async def _drop_session(self, local: _Local, session_id: str, channels: Iterable[str]) -> None:
        if self._sessions.get(session_id) is local:
            del self._sessions[session_id]
        await self._hub.remove(local, list(channels), announce=False)

    def _record_expiry(self) -> float:
        return time.time() + self.config.resume_window

    async def _expiry_loop(self) -> None:
        period = min(1.0, self.config.resume_window / 4)
        while True:
            await anyio.sleep(period)
            try:
                expired = await self.presence.sweep()
            except Exception:
                logger.warning("presence sweep failed", exc_info=True)
                expired = []
            for channel, identity in expired:
                await self._hub.announce_identity(channel, identity, "offline")
            now = self._clock()
            for session_id, local in list(self._sessions.items()):
                if not local.attached and local.expires_at <= now:
                    session = local.core.session
                    await self._drop_session(local, session_id, session.channels if session else ())
