"""Test helpers for apps built on splitchat: drive the command endpoint and the gateway in-process.

* :class:`GatewayCommunicator` speaks the gateway protocol to an ASGI app over in-memory streams
  (no server, no socket), in the spirit of channels' ``WebsocketCommunicator``: every receive
  has a timeout, so a test that expects a frame that never comes **fails** instead of hanging.
  It can also misbehave on purpose: cut the socket (:meth:`~GatewayCommunicator.cut`), stop
  reading (:meth:`~GatewayCommunicator.stall`, a slow consumer), skip heartbeats.
* :class:`GatewayFaults` is an ASGI middleware for the gateway route that forces the failure
  paths onto *real* clients: ``reconnect()`` (op 7), ``invalidate_sessions()`` (op 9 false),
  ``cut()`` — so an app's client code gets exercised on them in tests.
* :func:`command_client` is an ``httpx.AsyncClient`` wired to the app in-process.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import anyio.abc
import msgspec

from .._types import ASGIApp, Message, Receive, Scope, Send

__all__ = (
    "ClientDisconnected",
    "GatewayClosed",
    "GatewayCommunicator",
    "GatewayFaults",
    "command_client",
)

DEFAULT_TIMEOUT = 2.0
ABNORMAL_CLOSURE = 1006


class GatewayClosed(AssertionError):
    """The gateway closed the WebSocket while the test expected a frame. ``code`` is its close code."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"the gateway closed the connection with code {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class ClientDisconnected(OSError):
    """Raised into the app by ``send()`` after the (test) client has gone, as ASGI servers do."""


class GatewayCommunicator:
    """Drive a gateway ASGI app in-process over one WebSocket.

    ::

        async with GatewayCommunicator(app, "/gateway") as gw:
            hello = await gw.connect()
            ready = await gw.identify("token", subscriptions=["room:1"])
            frame = await gw.receive_dispatch("MESSAGE_CREATE")

    Frames are returned as plain dicts (``{"op", "d", "s", "t", ...}``). ``timeout`` is the
    default for every receive. ``buffer`` bounds how many frames the app may send ahead of the
    test reading them; after that the app's ``send()`` blocks, like a full TCP window.
    """

    def __init__(
        self,
        app: ASGIApp,
        path: str = "/gateway",
        *,
        encoding: Literal["json", "msgpack"] = "json",
        headers: Iterable[tuple[str, str]] = (),
        client: tuple[str, int] = ("127.0.0.1", 50000),
        timeout: float = DEFAULT_TIMEOUT,
        buffer: int = 256,
    ) -> None:
        self.app = app
        self.encoding = encoding
        self.timeout = timeout
        self.close_code: int | None = None
        self.close_reason = ""
        self.scope: Scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": f"encoding={encoding}".encode(),
            "headers": [(b"host", b"testserver"), *((k.lower().encode(), v.encode()) for k, v in headers)],
            "client": client,
            "server": ("testserver", 80),
            "subprotocols": [],
            "state": {},
        }
        self._to_app_send, self._to_app_recv = anyio.create_memory_object_stream[Message](buffer)
        self._from_app_send, self._from_app_recv = anyio.create_memory_object_stream[Message](buffer)
        self._flowing = anyio.Event()
        self._flowing.set()
        self._close_attempted = anyio.Event()
        #: Code of the ``websocket.close`` the app sent or is trying to send (even while stalled).
        self.close_attempted: int | None = None
        self._disconnected = False
        self._app_done = anyio.Event()
        self._app_error: BaseException | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._json = msgspec.json.Encoder()

    async def __aenter__(self) -> Self:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run_app)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task_group is not None
        if not self._disconnected:
            await self._disconnect(1000)
        self._flowing.set()
        # Give the app a moment to finish on its own, then cancel it: a test never leaks a task.
        with anyio.move_on_after(self.timeout):
            await self._app_done.wait()
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)
        for stream in (self._to_app_send, self._to_app_recv, self._from_app_send, self._from_app_recv):
            stream.close()
        if self._app_error is not None and exc is None:
            raise self._app_error

    async def _run_app(self) -> None:
        try:
            await self.app(self.scope, self._app_receive, self._app_send)
        except ClientDisconnected:
            pass
        except Exception as exc:  # surfaced to the test on exit and on the next receive
            self._app_error = exc
        finally:
            self._app_done.set()
            self._from_app_send.close()

    async def _app_receive(self) -> Message:
        try:
            return await self._to_app_recv.receive()
        except anyio.EndOfStream:
            return {"type": "websocket.disconnect", "code": self.close_code or ABNORMAL_CLOSURE}

    async def _app_send(self, message: Message) -> None:
        if self._disconnected:
            raise ClientDisconnected("the test client disconnected")
        if message["type"] == "websocket.close" and self.close_attempted is None:
            self.close_attempted = int(message.get("code", 1000))
            self._close_attempted.set()
        await self._flowing.wait()
        try:
            await self._from_app_send.send(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ClientDisconnected("the test client disconnected") from exc

    # -- connection -------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Open the WebSocket and return HELLO; raise :class:`GatewayClosed` if refused."""
        await self._to_app_send.send({"type": "websocket.connect"})
        message = await self._next_message(timeout)
        if message["type"] != "websocket.accept":
            raise AssertionError(f"expected websocket.accept, got {message!r}")
        hello = await self.receive(timeout)
        if hello.get("op") != 10:
            raise AssertionError(f"expected HELLO (op 10) first, got {hello!r}")
        return hello

    async def identify(
        self,
        token: str,
        subscriptions: Iterable[str] = (),
        *,
        properties: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send IDENTIFY and return the READY dispatch (its ``d``: session_id, subscriptions...)."""
        d: dict[str, Any] = {"token": token, "subscriptions": list(subscriptions)}
        if properties is not None:
            d["properties"] = dict(properties)
        await self.send(2, d)
        return await self.receive_dispatch("READY", timeout)

    async def resume(self, token: str, session_id: str, seq: int) -> None:
        """Send RESUME; read the replay and RESUMED with :meth:`receive_dispatch`."""
        await self.send(6, {"token": token, "session_id": session_id, "seq": seq})

    async def heartbeat(self, seq: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a heartbeat and return the HEARTBEAT_ACK (dispatches arriving first are an error)."""
        await self.send(1, seq)
        frame = await self.receive(timeout)
        if frame.get("op") != 11:
            raise AssertionError(f"expected HEARTBEAT_ACK, got {frame!r}")
        return frame

    async def subscribe(self, channels: Iterable[str], timeout: float | None = None) -> dict[str, Any]:
        """Send SUBSCRIBE and return the SUBSCRIBED dispatch."""
        await self.send(12, {"channels": list(channels)})
        return await self.receive_dispatch("SUBSCRIBED", timeout)

    # -- frames -----------------------------------------------------------------------------

    async def send(self, op: int, d: Any = None) -> None:
        """Send one frame ``{"op": op, "d": d}`` in the communicator's encoding."""
        frame = {"op": op, "d": d}
        if self.encoding == "json":
            await self.send_raw(self._json.encode(frame).decode())
        else:
            await self.send_raw(msgspec.msgpack.encode(frame))

    async def send_raw(self, data: str | bytes) -> None:
        """Send a raw text (``str``) or binary (``bytes``) message: for malformed-input tests."""
        key = "text" if isinstance(data, str) else "bytes"
        with anyio.fail_after(self.timeout):
            await self._to_app_send.send({"type": "websocket.receive", key: data})

    async def _next_message(self, timeout: float | None) -> Message:
        limit = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                message = await self._from_app_recv.receive()
        except TimeoutError:
            raise TimeoutError(f"no frame from the gateway within {limit} s") from None
        except anyio.EndOfStream:
            if self._app_error is not None:
                raise self._app_error from None
            raise GatewayClosed(self.close_code or ABNORMAL_CLOSURE, "the app returned") from None
        if message["type"] == "websocket.close":
            self.close_code = int(message.get("code", 1000))
            self.close_reason = str(message.get("reason") or "")
            raise GatewayClosed(self.close_code, self.close_reason)
        return message

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """Return the next frame as a dict.

        Raises ``TimeoutError`` after ``timeout`` seconds and :class:`GatewayClosed` on close.
        """
        message = await self._next_message(timeout)
        if message["type"] != "websocket.send":
            raise AssertionError(f"unexpected ASGI message {message!r}")
        data = message.get("text")
        frame = msgspec.json.decode(data) if data is not None else msgspec.msgpack.decode(message["bytes"])
        if not isinstance(frame, dict):
            raise AssertionError(f"frame is not an object: {frame!r}")
        return frame

    async def receive_dispatch(self, t: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Return the next dispatch (op 0), skipping HEARTBEAT_ACKs; assert its type is ``t`` if given."""
        limit = self.timeout if timeout is None else timeout
        with anyio.fail_after(limit):
            while True:
                frame = await self.receive(math.inf)
                if frame.get("op") == 11:
                    continue
                if frame.get("op") != 0:
                    raise AssertionError(f"expected a dispatch, got {frame!r}")
                if t is not None and frame.get("t") != t:
                    raise AssertionError(f"expected dispatch {t}, got {frame.get('t')}: {frame!r}")
                return frame

    async def receive_nothing(self, timeout: float = 0.1) -> None:
        """Assert that no frame arrives within ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            frame = await self.receive(math.inf)
            raise AssertionError(f"expected no frame, got {frame!r}")

    async def wait_closed(self, timeout: float | None = None) -> int:
        """Read (and discard) frames until the gateway closes; return the close code."""
        limit = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                while True:
                    await self.receive(math.inf)
        except TimeoutError:
            raise TimeoutError(f"the gateway did not close within {limit} s") from None
        except GatewayClosed as closed:
            return closed.code

    # -- misbehaviour -----------------------------------------------------------------------

    async def close(self, code: int = 1000) -> None:
        """Close from the client side (1000/1001 end the session; other codes keep it resumable)."""
        await self._disconnect(code)

    async def cut(self) -> None:
        """Drop the connection abruptly, as a dead network does (the app sees code 1006)."""
        await self._disconnect(ABNORMAL_CLOSURE)

    async def _disconnect(self, code: int) -> None:
        if self._disconnected:
            return
        self._disconnected = True
        self.close_code = self.close_code or code
        self._flowing.set()
        with anyio.move_on_after(self.timeout):
            await self._to_app_send.send({"type": "websocket.disconnect", "code": code})
        self._to_app_send.close()

    async def wait_close_attempted(self, timeout: float | None = None) -> int:
        """Wait until the app tries to close the socket (even while :meth:`stall` holds its frames
        back) and return the code: observe a slow-consumer close without unstalling first."""
        limit = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                await self._close_attempted.wait()
        except TimeoutError:
            raise TimeoutError(f"the gateway did not try to close within {limit} s") from None
        assert self.close_attempted is not None
        return self.close_attempted

    def stall(self) -> None:
        """Stop reading: the app's next ``send()`` blocks (a slow consumer with a full TCP window)."""
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def unstall(self) -> None:
        """Read again."""
        self._flowing.set()


class _Link:
    """One live WebSocket passing through :class:`GatewayFaults`."""

    def __init__(self, send: Send, binary: bool) -> None:
        self.send = send
        self.binary = binary
        self.send_lock = anyio.Lock()
        self.closed = False
        self.injected_disconnect = anyio.Event()
        self.disconnect_code = ABNORMAL_CLOSURE


class GatewayFaults:
    """ASGI middleware around a gateway that forces its failure paths onto real, connected clients.

    ``WebSocketRoute("/gateway", faults := GatewayFaults(gateway))``; then in the test:
    :meth:`reconnect` sends RECONNECT (op 7) to every open connection and drops it (the server
    side keeps the session, so the client must RESUME); :meth:`invalidate_sessions` sends
    INVALID_SESSION (op 9, ``false``) and ends the sessions (the client must re-IDENTIFY and
    resync); :meth:`cut` closes with 1011 without any warning frame. The wrapped gateway sees a
    client disconnect in each case, exactly as if the network had dropped.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._links: set[_Link] = set()
        self.connections_seen = 0

    @property
    def open_connections(self) -> int:
        """How many WebSockets are currently open through the middleware."""
        return len(self._links)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        link = _Link(send, binary=b"encoding=msgpack" in scope.get("query_string", b""))
        self.connections_seen += 1

        async def app_receive() -> Message:
            if link.closed:
                return {"type": "websocket.disconnect", "code": link.disconnect_code}
            message: Message | None = None
            with anyio.CancelScope() as scope_:

                async def wait_injected() -> None:
                    await link.injected_disconnect.wait()
                    scope_.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_injected)
                    message = await receive()
                    tg.cancel_scope.cancel()
            if message is None:
                return {"type": "websocket.disconnect", "code": link.disconnect_code}
            return message

        async def app_send(message: Message) -> None:
            if link.closed:
                raise ClientDisconnected("connection closed by GatewayFaults")
            async with link.send_lock:
                await send(message)

        self._links.add(link)
        try:
            await self.app(scope, app_receive, app_send)
        finally:
            self._links.discard(link)

    async def _break(self, frame: dict[str, Any] | None, close_code: int, app_code: int) -> int:
        links = [link for link in self._links if not link.closed]
        for link in links:
            async with link.send_lock:
                if link.closed:
                    continue
                link.closed = True
                link.disconnect_code = app_code
                try:
                    if frame is not None:
                        data: dict[str, Any] = (
                            {"type": "websocket.send", "bytes": msgspec.msgpack.encode(frame)}
                            if link.binary
                            else {"type": "websocket.send", "text": msgspec.json.encode(frame).decode()}
                        )
                        await link.send(data)
                    await link.send({"type": "websocket.close", "code": close_code})
                except (OSError, RuntimeError):
                    pass  # already gone: the point was to break it anyway
            link.injected_disconnect.set()
        return len(links)

    async def reconnect(self) -> int:
        """Send RECONNECT and drop every open connection (sessions stay resumable); return how many.

        Closes with 1012 (service restart) like the real gateway does after RECONNECT (see
        docs/protocol.md), so a client under test sees exactly what a draining node sends.
        """
        return await self._break({"op": 7, "d": None, "s": None, "t": None}, 1012, ABNORMAL_CLOSURE)

    async def invalidate_sessions(self) -> int:
        """Send INVALID_SESSION (not resumable) and end every open session; return how many."""
        return await self._break({"op": 9, "d": False, "s": None, "t": None}, 1000, 1000)

    async def cut(self) -> int:
        """Close every open connection with 1011 and no warning; sessions stay resumable."""
        return await self._break(None, 1011, ABNORMAL_CLOSURE)


@asynccontextmanager
async def command_client(
    app: ASGIApp,
    *,
    token: str | None = None,
    base_url: str = "http://testserver",
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Any]:
    """An ``httpx.AsyncClient`` that calls ``app`` in-process (``Authorization: Bearer token``)."""
    import httpx

    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=base_url, headers=all_headers) as client:
        yield client
