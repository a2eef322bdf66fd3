"""SplitchatClient: commands over HTTP, events over a self-healing gateway WebSocket.

The gateway side is one runner task per client: connect, let :class:`ClientSession` (the pure
state machine) decide what to send, deliver dispatches into a *bounded* stream (a slow app
stops the socket reader — backpressure — instead of growing a queue), run the heartbeat timer,
and on any disconnect plan the next connection with full-jitter backoff.
"""

from __future__ import annotations

import math
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import httpx

from ._backoff import FullJitterBackoff
from ._commands import Receipt, RetryPolicy, send_command
from ._frames import Encoding, FrameCodec, FrameDecodeError, Opcode
from ._items import ClientEvent, Dispatch
from ._session import Action, AuthenticationFailed, ClientSession, CloseSocket, Deliver, Phase, SendFrame
from ._websocket import ConnectionClosed, HandshakeRejected, WebSocket

__all__ = ("ClientStats", "SplitchatClient")


@dataclass
class ClientStats:
    """Counters of what the gateway connection went through (for tests, metrics and logs).

    ``identifies`` / ``resumes`` count every IDENTIFY / RESUME frame sent (an IDENTIFY after a
    refused RESUME on the same connection counts too). ``last_close_code`` is the close code of
    the last connection that was actually open (``None`` until one ended; 1006 if it died without
    a close frame); attempts that never opened a connection do not overwrite it — a server
    shutdown stays visible as its 1001/1012 while the reconnects fail — they count in
    ``connect_failures`` with their error in ``last_connect_error``. ``resume_url_fallbacks``
    counts the times the client gave up on READY's ``resume_gateway_url`` for the configured URL.
    """

    connection_attempts: int = 0
    connections: int = 0
    connect_failures: int = 0
    identifies: int = 0
    resumes: int = 0
    zombie_closes: int = 0
    backpressure_waits: int = 0
    resume_url_fallbacks: int = 0
    last_close_code: int | None = None
    last_connect_error: str | None = None


def _gateway_url(base_url: str, path: str, encoding: str) -> str:
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"base_url must be http(s):// or ws(s)://, got {base_url!r}")
    full_path = parts.path.rstrip("/") + "/" + path.lstrip("/")
    return urlunsplit((scheme, parts.netloc, full_path, urlencode({"encoding": encoding}), ""))


def _with_encoding(url: str, encoding: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = dict(parse_qsl(parts.query))
    query.setdefault("encoding", encoding)
    return urlunsplit((scheme, parts.netloc, parts.path or "/", urlencode(query), ""))


class _FrameBudget:
    """Client-side mirror of the server's per-connection frame budget (heartbeats exempt).

    Control frames (SUBSCRIBE, UNSUBSCRIBE ...) wait until they fit, keeping one frame of
    margin, so the client is never the one cut off with 4008. Reset on every new connection.
    """

    def __init__(self, budget: int = 120, window: float = 60.0) -> None:
        self._sent: deque[float] = deque()
        self.budget = budget
        self.window = window

    def _expire(self, now: float) -> None:
        while self._sent and now - self._sent[0] >= self.window:
            self._sent.popleft()

    def record(self, now: float) -> None:
        self._expire(now)
        self._sent.append(now)

    def wait_time(self, now: float) -> float:
        self._expire(now)
        allowed = max(1, self.budget - 1)
        if len(self._sent) < allowed:
            return 0.0
        return self._sent[len(self._sent) - allowed] + self.window - now


class SplitchatClient:
    """A splitchat app's client: ``send`` commands over HTTP, read ``events()`` from the gateway.

    ``base_url`` is the server root (``http://host:port``); commands go to
    ``base_url + api_prefix + path`` with ``Authorization: Bearer <token>``; the gateway is
    ``base_url + gateway_path`` (``ws``/``wss`` derived from the scheme) unless ``gateway_url``
    (a full ``ws(s)://`` URL) says otherwise. Use as an async
    context manager; leaving it closes the socket, the HTTP pool and every task.

    Guarantees: every dispatch reaches :meth:`events` at most once and in the order the
    gateway sent it (which is per-channel publish order); a lost connection is resumed with
    nothing missing; a lost session yields a :class:`Resync` item (refetch state); a 4004
    (token rejected) ends :meth:`events` with :class:`AuthenticationFailed` and is not retried.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str,
        api_prefix: str = "/api",
        gateway_path: str = "/gateway",
        subscriptions: Iterable[str] = (),
        encoding: Encoding = "json",
        properties: Mapping[str, Any] | None = None,
        gateway: bool = True,
        gateway_url: str | None = None,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        stable_after: float = 5.0,
        connect_timeout: float = 10.0,
        heartbeat_ack_timeout_factor: float = 0.5,
        event_buffer: int = 256,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
        ssl_context: ssl.SSLContext | None = None,
        use_resume_url: bool = True,
    ) -> None:
        if event_buffer < 1:
            raise ValueError("event_buffer must be at least 1")
        self._rng = rng if rng is not None else random.Random()
        self._base_url = base_url.rstrip("/")
        self._api_base = (
            self._base_url + "/" + api_prefix.strip("/") if api_prefix.strip("/") else self._base_url
        )
        self._token = token
        self._encoding: Encoding = encoding
        self._codec = FrameCodec(encoding)
        self.gateway_url = (
            _with_encoding(gateway_url, encoding)
            if gateway_url
            else _gateway_url(self._base_url, gateway_path, encoding)
        )
        self._gateway_enabled = gateway
        self._session = ClientSession(
            token=token,
            subscriptions=subscriptions,
            properties=properties,
            heartbeat_ack_timeout_factor=heartbeat_ack_timeout_factor,
            rng=self._rng,
        )
        self._backoff = FullJitterBackoff(reconnect_min_delay, reconnect_max_delay, rng=self._rng)
        self._stable_after = stable_after
        self._connect_timeout = connect_timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._http_transport = http_transport
        self._ssl_context = ssl_context
        self._use_resume_url = use_resume_url
        self._event_buffer = event_buffer
        self.stats = ClientStats()
        self._http: httpx.AsyncClient | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._out_send, self._out_recv = anyio.create_memory_object_stream[ClientEvent](event_buffer)
        self._fatal: BaseException | None = None
        self._ws: WebSocket | None = None
        self._reader_blocked = False
        self._timers_changed = anyio.Event()
        self._budget = _FrameBudget()
        self._rate_limited_until = 0.0
        self._local_close: int | None = None
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {self._token}"},
            transport=self._http_transport,
            timeout=httpx.Timeout(10.0),
        )
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        if self._gateway_enabled:
            task_group.start_soon(self._run_gateway)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, self._task_group = self._task_group, None
        try:
            with anyio.CancelScope(shield=True):
                self._closing = True  # the runner must not reconnect after the close below
                ws = self._ws
                if ws is not None:
                    # 1000 tells the gateway the session is over (no resume window to hold). The
                    # reader is still running: it reads the server's close reply, so the socket
                    # is not torn down under an unread close frame.
                    await ws.send_close(1000, "client closed", timeout=1.0)
                    with anyio.move_on_after(1.0):
                        await ws.wait_closed()
            if task_group is not None:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                if self._http is not None:
                    await self._http.aclose()
            self._out_send.close()
            self._out_recv.close()
        return None

    # -- commands -------------------------------------------------------------------------

    async def send(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        nonce: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> Receipt:
        """Send a command; retry network errors, 5xx and 429 with the same nonce; return the receipt.

        The nonce (``nonce``, else ``json["nonce"]``, else a fresh random one) is sent as
        ``Idempotency-Key`` on every attempt. Raises :class:`CommandError` for other 4xx
        answers and :class:`CommandFailed` when attempts or the deadline run out. Works whether
        or not the gateway is connected.
        """
        if self._http is None:
            raise RuntimeError("use `async with SplitchatClient(...)` before sending")
        policy = retry if retry is not None else self._retry
        backoff = FullJitterBackoff(policy.min_delay, policy.max_delay, rng=self._rng)
        url = self._api_base + "/" + path.lstrip("/")
        return await send_command(
            self._http, method, url, json, nonce=nonce, headers=headers, policy=policy, backoff=backoff
        )

    # -- events ---------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Yield :class:`Dispatch`, :class:`Ready`, :class:`Resumed` and :class:`Resync` items.

        Ends when the client closes; raises :class:`AuthenticationFailed` if the token was
        rejected. Reading slowly is safe: the client stops reading the socket meanwhile.
        """
        while True:
            try:
                item = await self._out_recv.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                break
            yield item
        if self._fatal is not None:
            raise self._fatal

    async def receive(self, timeout: float | None = None) -> ClientEvent:
        """Return the next item of :meth:`events`; raise ``TimeoutError`` after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            try:
                return await self._out_recv.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                if self._fatal is not None:
                    raise self._fatal from None
                raise

    @property
    def session_id(self) -> str | None:
        """The current gateway session id (``None`` before READY or after the session was lost)."""
        return self._session.session_id

    @property
    def connected(self) -> bool:
        """Whether the gateway connection is up and its session ready."""
        return self._session.phase == Phase.CONNECTED

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The channels the app asked for (granted or pending), in request order."""
        return tuple(self._session.desired)

    async def subscribe(self, channels: Iterable[str]) -> None:
        """Subscribe to more channels (now if connected, else on the next session)."""
        await self._control(self._session.subscribe(list(channels)))

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop receiving ``channels``."""
        await self._control(self._session.unsubscribe(list(channels)))

    async def _control(self, actions: list[Action]) -> None:
        ws = self._ws
        if ws is None:
            return  # sent with the next IDENTIFY / after the next RESUMED
        for action in actions:
            if isinstance(action, SendFrame):
                await self._send_frame(ws, action)

    # -- gateway runner -------------------------------------------------------------------

    async def _run_gateway(self) -> None:
        try:
            while True:
                started = anyio.current_time()
                code = await self._run_connection()
                try:
                    plan = self._session.connection_lost(code)
                except AuthenticationFailed as exc:
                    self._fatal = exc
                    return
                if plan.resume_url_given_up:
                    self.stats.resume_url_fallbacks += 1
                if self._closing:
                    return
                if self._session.established and anyio.current_time() - started >= self._stable_after:
                    self._backoff.reset()
                await anyio.sleep(self._backoff.next_delay())
        finally:
            self._out_send.close()

    def _next_url(self) -> str:
        """The URL of the next connection attempt (READY's resume URL while it answers)."""
        resume_url = self._session.next_resume_url() if self._use_resume_url else None
        return self.gateway_url if resume_url is None else _with_encoding(resume_url, self._encoding)

    async def _run_connection(self) -> int | None:
        """One connection: connect, run it until it ends; return its close code.

        ``None`` when no close frame was seen, including when the attempt never connected.
        """
        session = self._session
        url = self._next_url()
        self.stats.connection_attempts += 1
        try:
            with anyio.fail_after(self._connect_timeout):
                ws = await WebSocket.connect(url, ssl_context=self._ssl_context)
        except (OSError, HandshakeRejected, ConnectionClosed, TimeoutError) as exc:
            self.stats.connect_failures += 1
            self.stats.last_connect_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return None
        self.stats.connections += 1
        self._ws = ws
        self._local_close = None
        session.connection_opened()
        handshake_deadline = anyio.current_time() + self._connect_timeout
        code: int | None = None
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._timer_loop, ws, handshake_deadline, task_group.cancel_scope)
                code = await self._read_loop(ws)
                task_group.cancel_scope.cancel()
        finally:
            self._ws = None
            self._reader_blocked = False
            with anyio.CancelScope(shield=True):
                await ws.abort()
        code = self._local_close if self._local_close is not None else code
        self.stats.last_close_code = code
        return code

    async def _read_loop(self, ws: WebSocket) -> int | None:
        session = self._session
        while True:
            try:
                message = await ws.receive()
            except ConnectionClosed as exc:
                return exc.code
            try:
                frame = self._codec.decode(message)
            except FrameDecodeError:
                await self._close(ws, CloseSocket(4002, "undecodable frame from server"))
                return self._local_close
            was = session.phase
            actions = session.receive(frame, anyio.current_time())
            if was == Phase.AWAIT_HELLO and session.phase == Phase.AWAIT_READY:
                self._budget = _FrameBudget(session.limits.frame_budget, session.limits.frame_budget_window)
            self._timers_changed.set()
            if await self._apply(ws, actions):
                return self._local_close

    async def _timer_loop(self, ws: WebSocket, handshake_deadline: float, scope: anyio.CancelScope) -> None:
        """Heartbeats and deadlines; a close decided here also stops the reader (``scope``)."""
        session = self._session
        while True:
            now = anyio.current_time()
            if session.phase in (Phase.AWAIT_HELLO, Phase.AWAIT_READY) and now >= handshake_deadline:
                await self._close(ws, CloseSocket(4000, "no HELLO/READY in time"))
                scope.cancel()
                return
            actions = session.tick(now, reader_blocked=self._reader_blocked)
            if actions and await self._apply(ws, actions):
                scope.cancel()
                return
            deadline = session.next_deadline()
            if session.phase in (Phase.AWAIT_HELLO, Phase.AWAIT_READY):
                deadline = handshake_deadline if deadline is None else min(deadline, handshake_deadline)
            if self._timers_changed.is_set():
                self._timers_changed = anyio.Event()
            delay = math.inf if deadline is None else max(0.0, deadline - anyio.current_time())
            with anyio.move_on_after(delay):
                await self._timers_changed.wait()

    async def _apply(self, ws: WebSocket, actions: list[Action]) -> bool:
        """Carry out actions; return ``True`` if the connection was closed."""
        for action in actions:
            if isinstance(action, SendFrame):
                try:
                    await self._send_frame(ws, action)
                except ConnectionClosed:
                    return False  # the reader sees the close and reports the code
            elif isinstance(action, Deliver):
                await self._deliver(action.item)
            else:
                await self._close(ws, action)
                return True
        return False

    async def _close(self, ws: WebSocket, action: CloseSocket) -> None:
        if action.reason.startswith("no HEARTBEAT_ACK"):
            self.stats.zombie_closes += 1
        self._local_close = action.code
        await ws.close(action.code, action.reason, timeout=1.0)

    async def _send_frame(self, ws: WebSocket, action: SendFrame) -> None:
        if action.op in (Opcode.SUBSCRIBE, Opcode.UNSUBSCRIBE):
            # These respect the budget and RATE_LIMITED. Heartbeats never wait (they keep the
            # session alive, and the server exempts them); IDENTIFY/RESUME open a connection,
            # whose budget is fresh.
            while True:
                now = anyio.current_time()
                wait = max(self._budget.wait_time(now), self._rate_limited_until - now)
                if wait <= 0:
                    break
                await anyio.sleep(wait)
            self._budget.record(anyio.current_time())
        await ws.send(self._codec.encode(action.op, action.d))
        # Counted once sent, wherever the session decided it (after HELLO, or after a refused
        # RESUME on the same connection).
        if action.op == Opcode.IDENTIFY:
            self.stats.identifies += 1
        elif action.op == Opcode.RESUME:
            self.stats.resumes += 1

    async def _deliver(self, item: ClientEvent) -> None:
        if isinstance(item, Dispatch) and item.t == "RATE_LIMITED" and isinstance(item.d, Mapping):
            retry_after = item.d.get("retry_after")
            if isinstance(retry_after, int | float) and math.isfinite(retry_after) and retry_after > 0:
                self._rate_limited_until = anyio.current_time() + min(float(retry_after), 60.0)
        try:
            self._out_send.send_nowait(item)
        except anyio.WouldBlock:
            # Backpressure: stop reading the socket until the app makes room.
            self._reader_blocked = True
            self.stats.backpressure_waits += 1
            try:
                await self._out_send.send(item)
            finally:
                self._reader_blocked = False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the app stopped listening (client closing)
