"""The WebSocket event gateway: a thin pure-ASGI adapter around :mod:`splitchat._protocol`.

Per connection: one reader loop (client frames -> machine), one writer task (machine outbox ->
socket), one deadline ticker and one close watchdog, all in the connection's task group. Fan-out
never awaits a socket: the hub appends to each session's bounded outbox and wakes its writer.

Per process: ONE bus subscription (the hub) whose channels are the union of the local sessions'
channels, with ``channel -> set(sessions)`` for local fan-out. A delivery is decoded once and
its frame encoded at most once per encoding; only ``s`` is spliced in per session.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs

import anyio
import anyio.abc
import msgspec

from ._auth import AuthenticationError, Authenticator, ChannelAuthorizer, Principal, allow_all_channels
from ._events import decode_event, encode_event
from ._frames import Dispatch, Encoding
from ._payloads import PresenceUpdatePayload
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
    SessionState,
    Subscribe,
    Unsubscribe,
)
from ._sessions import InMemorySessionStore, SessionRecord, SessionStore
from ._snowflake import SnowflakeGenerator
from ._types import Receive, Scope, Send
from .bus._base import Bus, Delivery, Gap, HistoryGone, Subscription

__all__ = ("Gateway",)

logger = logging.getLogger("splitchat.gateway")

_HISTORY_PAGE = 100


class _Local:
    """A session (or a not-yet-identified connection) hosted by this process.

    ``core`` is the protocol machine; after a same-node RESUME the new connection's ``_Local``
    takes the session's place in the routes and the old one is dropped.
    """

    __slots__ = (
        "_closing",
        "_waiting",
        "_wake",
        "attached",
        "checkpointed_at",
        "close_sent",
        "closing",
        "connection_id",
        "core",
        "expires_at",
    )

    def __init__(self, core: GatewayConnection, connection_id: str) -> None:
        self.core = core
        self.connection_id = connection_id
        self.attached = True
        self.expires_at = 0.0
        self.checkpointed_at = 0.0  # monotonic time of the last checkpoint written
        self.closing: Close | None = None
        self.close_sent = False
        self._wake = anyio.Event()
        self._waiting = False
        self._closing = anyio.Event()

    def notify_closing(self) -> None:
        self._closing.set()

    async def wait_closing(self) -> None:
        await self._closing.wait()

    def wake(self) -> None:
        # Only a writer parked in wait() needs the event: a busy writer takes every queued frame
        # before it parks again (no await between its empty check and wait()). Setting it on
        # every delivery was ~10% of the ASGI path's CPU in fan-out.
        if self._waiting:
            self._waiting = False
            self._wake.set()

    async def wait(self) -> None:
        """Park until :meth:`wake`; the caller checked the outbox was empty just before."""
        self._wake = anyio.Event()
        self._waiting = True
        try:
            await self._wake.wait()
        finally:
            self._waiting = False


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
        self.bus = bus
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
        self.presence: Presence = presence if presence is not None else InMemoryPresence()
        self.drain_timeout = drain_timeout
        self.announce_presence = announce_presence
        self.node_id = node_id if node_id is not None else secrets.token_hex(6)
        self.checkpoint_interval = checkpoint_interval
        self._dirty: set[_Local] = set()  # connected sessions whose checkpoint must be written
        self._clock = clock
        self._ids = SnowflakeGenerator(secrets.randbelow(1024))
        self._routes: dict[str, set[_Local]] = {}
        self._sessions: dict[str, _Local] = {}  # session id -> host (attached or detached)
        self._connections: set[_Local] = set()  # attached connections
        # anyio primitives need a running loop: they are made in start(), so a Gateway can be
        # built at import time like any ASGI app.
        self._idle: anyio.Event | None = None
        self._hub: Subscription | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._accepting = False
        self._drained = False
        self._background_scope: anyio.CancelScope | None = None
        self._background_done: anyio.Event | None = None
        self._next_connection = 0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the hub subscription and start the fan-out and expiry tasks."""
        if self._task_group is not None:
            return
        self._hub = self.bus.subscribe()
        self._background_scope = anyio.CancelScope()
        self._background_done = anyio.Event()
        self._drained = False
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._background, self._hub)
        self._accepting = True

    async def _background(self, hub: Subscription) -> None:
        assert self._background_scope is not None and self._background_done is not None
        try:
            with self._background_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._hub_loop, hub)
                    tg.start_soon(self._expiry_loop)
                    tg.start_soon(self._checkpoint_loop)
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
            for channel in session.channels:
                routes = self._routes.get(channel)
                if routes is not None:
                    routes.discard(local)
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
        if self._hub is not None:
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
        self._routes.clear()

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
                await self._route_add(local, action.channels)
            elif isinstance(action, Unsubscribe):
                await self._route_remove(local, action.channels)
            elif isinstance(action, ResumeLookup):
                await self._resume(local, action)
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

    async def _resume(self, local: _Local, request: ResumeLookup) -> None:
        core = local.core
        principal = await self._authenticate(request.token)
        if principal is None:
            await self._apply(local, core.resume_rejected(False, self._clock()))
            return
        host = self._sessions.get(request.session_id)
        if host is not None and host is not local:
            old = host.core
            if old.session is None or old.session.principal.id != principal.id:
                await self._apply(local, core.resume_rejected(True, self._clock()))
                return
            if not await self._still_owner(request.session_id):
                # Another node hosted the session since (the client resumed there and came
                # back): our copy is stale. Drop it and resume from the store like any node.
                if old.state is not ConnectionState.CLOSED:
                    self._after(host, old.force_close(4000, "session resumed elsewhere", resumable=False))
                    host.attached = False
                    await self._presence_leave(host, old.session.channels)
                if self._sessions.get(request.session_id) is host and old.session is not None:
                    await self._drop_session(host, request.session_id, old.session.channels)
                old.session = None
                old.resumable = False
                host = None
        if host is not None and host is not local:
            old = host.core
            assert old.session is not None
            if old.state is not ConnectionState.CLOSED:
                # The client came back before we noticed it left: the old socket is superseded.
                self._after(host, old.force_close(4000, "session resumed elsewhere", resumable=True))
                host.attached = False
                await self._presence_leave(host, old.session.channels)
                if self._sessions.get(request.session_id) is not host or old.session is None:
                    await self._apply(local, core.resume_rejected(True, self._clock()))
                    return  # someone else resumed it meanwhile
            if not old.resumable:
                await self._apply(local, core.resume_rejected(True, self._clock()))
                return
            # Same node: the detached session kept collecting events; swap hosts atomically
            # (no await between) so no delivery falls between the two machines.
            session = old.session
            old.session = None
            old.resumable = False
            self._sessions[request.session_id] = local
            for channel in session.channels:
                routes = self._routes.get(channel)
                if routes is not None:
                    routes.discard(host)
                    routes.add(local)
            now = self._clock()
            actions = list(core.resume_begin(session, now))
            if core.state is ConnectionState.RESUMING:
                actions += core.resume_complete((), now)
                await self._presence_join(local, session.channels)
            else:
                await self._drop_session(local, session.session_id, session.channels)
            await self._apply(local, actions)
            return
        # Claim first: from now on the previous host (a zombie, or a detached copy) can no longer
        # overwrite the record, so what we take is the newest it will ever be.
        await self.session_store.claim(request.session_id, self.node_id, self._record_expiry())
        record = await self.session_store.take(request.session_id)
        if record is None or record.principal.id != principal.id:
            if record is not None:
                await self.session_store.save(record)  # not theirs: leave it for its owner
            await self._apply(local, core.resume_rejected(True, self._clock()))
            return
        # Other node: subscribe live first (deliveries are held by the machine), then rebuild what
        # was missed from bus history after the snapshot's positions, then flush the held ones.
        session = record.to_state(self._clock())
        actions = list(core.resume_begin(session, self._clock(), from_checkpoint=record.checkpoint))
        if core.state is not ConnectionState.RESUMING:
            await self._apply(local, actions)
            return
        self._sessions[session.session_id] = local
        completed = False
        try:
            await self._route_add(local, tuple(session.channels), announce=False)
            missed = await self._missed_since(session.positions, session.channels)
            if core.state is ConnectionState.RESUMING:
                actions += core.resume_complete(missed, self._clock())
                completed = True
        except HistoryGone:
            if core.state is ConnectionState.RESUMING:
                # The gap cannot be rebuilt: the session is over (INVALID_SESSION, IDENTIFY again).
                actions += core.resume_rejected(True, self._clock())
                completed = True  # nothing to put back
                await self._drop_session(local, session.session_id, session.channels)
                await self._apply(local, actions)
                return
            # (the machine closed meanwhile: put the record back, the next RESUME decides)
        except Exception:
            logger.warning("resuming %s failed; its record is put back", session.session_id, exc_info=True)
        finally:
            if not completed:
                # A dependency failed (hub.add, history: BusUnavailable...), the machine gave the
                # session up (too many live events held during the catch-up: 4010), or we were
                # cancelled. The session must not stay hosted here on a machine that cannot serve
                # it: deliveries would advance its positions past what the client never got. Unroute
                # it and put the record we took back (claimed by us, so the store accepts it); the
                # client's next RESUME (4000/4010 say RESUME) starts over from it.
                with anyio.CancelScope(shield=True):
                    await self._abandon_resume(local, session, record)
        if not completed:
            # (a no-op when the machine closed itself already, e.g. 4010)
            actions += core.force_close(4000, "resume failed; resume again", resumable=False)
            await self._apply(local, actions)
            return
        await self._presence_join(local, session.channels)
        await self._apply(local, actions)

    async def _abandon_resume(self, local: _Local, session: SessionState, record: SessionRecord) -> None:
        await self._drop_session(local, session.session_id, session.channels)
        local.core.session = None  # (a detach of this connection then has nothing to save)
        local.core.resumable = False
        with anyio.move_on_after(self.drain_timeout):
            try:
                await self.session_store.save(msgspec.structs.replace(record, owner=self.node_id))
            except Exception:
                logger.warning("putting session %s back failed", session.session_id, exc_info=True)

    async def _missed_since(self, positions: dict[str, Any], channels: Iterable[str]) -> list[Dispatch]:
        missed: list[Dispatch] = []
        budget = self.config.replay_frames
        for channel in sorted(channels):
            since = positions.get(channel)
            if since is None:
                continue  # nothing delivered before the snapshot: nothing to compare against
            while True:
                page = await self.bus.history(channel, since, limit=_HISTORY_PAGE)
                for delivery in page:
                    dispatch = self._decode(delivery)
                    if dispatch is not None:
                        missed.append(dispatch)
                if len(missed) > budget:
                    raise HistoryGone("more missed events than a replay may hold")
                if len(page) < _HISTORY_PAGE:
                    break
                last = page[-1].position
                assert last is not None
                since = last
        return missed

    # ---- routing, presence ----------------------------------------------------------------

    async def _route_add(self, local: _Local, channels: Sequence[str], *, announce: bool = True) -> None:
        session = local.core.session
        if session is not None and self.bus.supports_history:
            # The resume seam of a channel with no delivery yet, read BEFORE routing: an event
            # published in between is then after the seam (replayed from history if missed),
            # never deduplicated away.
            for channel in channels:
                if channel not in session.positions:
                    try:
                        session.seed_position(channel, await self.bus.current_position(channel))
                    except Exception:
                        logger.debug("no current position for %r", channel, exc_info=True)
        new: list[str] = []
        for channel in channels:
            routes = self._routes.get(channel)
            if routes is None:
                routes = self._routes[channel] = set()
                new.append(channel)
            routes.add(local)
        if new and self._hub is not None:
            await self._hub.add(new)
        if announce:
            await self._presence_join(local, channels)

    async def _route_remove(self, local: _Local, channels: Iterable[str], *, announce: bool = True) -> None:
        empty: list[str] = []
        for channel in channels:
            routes = self._routes.get(channel)
            if routes is None:
                continue
            routes.discard(local)
            if not routes:
                del self._routes[channel]
                empty.append(channel)
        if empty and self._hub is not None:
            try:
                await self._hub.remove(empty)
            except Exception:
                logger.debug("hub remove failed", exc_info=True)
        if announce:
            await self._presence_leave(local, channels)

    async def _presence_join(self, local: _Local, channels: Iterable[str]) -> None:
        session = local.core.session
        if session is None:
            return
        for channel in channels:
            try:
                first = await self.presence.join(channel, session.principal, local.connection_id)
            except Exception:  # presence is advisory: its backend failing must not drop the client
                logger.warning("presence join failed on %r", channel, exc_info=True)
                continue
            if first:
                await self._announce(channel, session.principal, "online")

    async def _presence_leave(self, local: _Local, channels: Iterable[str]) -> None:
        session = local.core.session
        if session is None:
            return
        for channel in channels:
            try:
                last = await self.presence.leave(channel, session.principal, local.connection_id)
            except Exception:  # the lease expires on its own
                logger.warning("presence leave failed on %r", channel, exc_info=True)
                continue
            if last:
                await self._announce(channel, session.principal, "offline")

    async def _announce(
        self, channel: str, principal: Principal, status: Literal["online", "offline"]
    ) -> None:
        await self._announce_identity(channel, principal.identity(), status)

    async def _announce_identity(
        self, channel: str, identity: dict[str, Any], status: Literal["online", "offline"]
    ) -> None:
        if not self.announce_presence:
            return
        data = PresenceUpdatePayload(channel=channel, user=identity, status=status)
        payload = encode_event(
            id=self._ids.next_str(), type="PRESENCE_UPDATE", channel=channel, data=data, ephemeral=True
        )
        try:
            await self.bus.publish_ephemeral(channel, payload)
        except Exception:
            logger.debug("presence update not published", exc_info=True)

    async def _detach(self, local: _Local) -> None:
        """The connection ended: keep a resumable session for the window, drop anything else."""
        core = local.core
        session = core.session
        if session is None:
            return
        local.attached = False
        self._dirty.discard(local)
        with anyio.CancelScope(shield=True):
            await self._presence_leave(local, session.channels)
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
        await self._route_remove(local, list(channels), announce=False)

    # ---- hub -------------------------------------------------------------------------------

    def _decode(self, delivery: Delivery) -> Dispatch | None:
        try:
            event = decode_event(delivery.payload)
        except msgspec.DecodeError:
            logger.warning("undecodable event on channel %r dropped", delivery.channel)
            return None
        return Dispatch(
            event.type,
            bytes(event.data),
            event_id=event.id,
            channel=delivery.channel,
            nonce=event.nonce,
            position=delivery.position,
            ephemeral=event.ephemeral or delivery.position is None,
        )

    async def _hub_loop(self, hub: Subscription) -> None:
        async for item in hub:
            try:
                self._fan_out(item)
            except Exception:  # a bug must not stop delivery to everyone else
                logger.exception("fan-out of an item on %r failed", item.channel)

    def _fan_out(self, item: Delivery | Gap) -> None:
        routes = self._routes.get(item.channel)
        if not routes:
            return
        now = self._clock()
        if isinstance(item, Gap):
            for local in list(routes):
                self._after(local, local.core.invalidate(now))
            return
        dispatch = self._decode(item)  # once per delivery, shared by every recipient
        if dispatch is None:
            return
        for local in routes:
            if dispatch.ephemeral and not local.attached:
                continue  # never replayed, so a session waiting for a resume skips them
            actions = local.core.deliver(dispatch, now)
            if actions:
                self._after(local, actions)
            elif local.attached:
                local.wake()

    def _record_expiry(self) -> float:
        return time.time() + self.config.resume_window

    async def _still_owner(self, session_id: str) -> bool:
        """Claim ``session_id`` for this node; ``False`` if another node held it meanwhile."""
        try:
            previous = await self.session_store.claim(session_id, self.node_id, self._record_expiry())
        except Exception:
            # Store down: serve the local copy (availability); ownership is rechecked on the
            # next checkpoint write, which a node that lost the session gets refused.
            logger.warning("session store unavailable; resuming %s from memory", session_id)
            return True
        return previous is None or previous == self.node_id

    async def _checkpoint_loop(self) -> None:
        """Write the checkpoints of connected sessions in batches: the dirty ones every
        ``checkpoint_interval``, and every session at least every third of the resume window
        (so its record outlives it). Never one store write per dispatch."""
        refresh = self.config.resume_window / 3
        while True:
            await anyio.sleep(self.checkpoint_interval)
            now = self._clock()
            due = {
                local
                for local in self._sessions.values()
                if local.attached and now - local.checkpointed_at >= refresh
            }
            due |= self._dirty
            self._dirty = set()
            expires_at = self._record_expiry()
            batch: list[_Local] = []
            records: list[SessionRecord] = []
            for local in due:
                session = local.core.session
                if local.attached and session is not None and local.core.state is ConnectionState.CONNECTED:
                    batch.append(local)
                    records.append(SessionRecord.checkpoint_of(session, expires_at, self.node_id))
            if not batch:
                continue
            try:
                with anyio.fail_after(max(self.checkpoint_interval, 2.0)):
                    saved = await self.session_store.save_many(records)
            except Exception:
                logger.warning("checkpoint of %d sessions failed; retrying", len(batch), exc_info=True)
                self._dirty.update(batch)
                continue
            for local, ok in zip(batch, saved, strict=True):
                local.checkpointed_at = now
                if not ok and local.core.session is not None:
                    # Another node took the session over (this connection is a zombie).
                    session = local.core.session
                    self._after(
                        local, local.core.force_close(4000, "session resumed elsewhere", resumable=False)
                    )
                    await self._drop_session(local, session.session_id, session.channels)

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
                await self._announce_identity(channel, identity, "offline")
            now = self._clock()
            for session_id, local in list(self._sessions.items()):
                if not local.attached and local.expires_at <= now:
                    session = local.core.session
                    await self._drop_session(local, session_id, session.channels if session else ())
