"""A real uvicorn server + real WebSocket clients for the gateway's end-to-end tests."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import ClientConnection, connect

from splitchat import Bus, Gateway, GatewayServer, Principal, StaticTokenAuthenticator, encode_event

TOKENS = {f"token-{i}": Principal(id=f"u{i}", name=f"user {i}") for i in range(200)}
authenticator = StaticTokenAuthenticator(TOKENS)


def make_app(bus: Bus, gateway: Gateway) -> Starlette:
    """The gateway plus a tiny publish route standing in for the command endpoint."""
    counter = 0

    async def publish(request: Request) -> JSONResponse:
        nonlocal counter
        body = await request.json()
        counter += 1
        event_id = str(body.get("id", counter))
        payload = encode_event(
            id=event_id,
            type=body.get("type", "MESSAGE_CREATE"),
            channel=body["channel"],
            data=body.get("data"),
            nonce=body.get("nonce"),
            ephemeral=bool(body.get("ephemeral")),
        )
        if body.get("ephemeral"):
            await bus.publish_ephemeral(body["channel"], payload)
            return JSONResponse({"id": event_id})
        position = await bus.publish(body["channel"], payload)
        return JSONResponse({"id": event_id, "position": str(position)})

    return Starlette(
        routes=[WebSocketRoute("/gateway", gateway), Route("/publish", publish, methods=["POST"])]
    )


class Server:
    """Where the test talks to: uvicorn (HTTP, and the gateway's ASGI route) and, on the fast
    path, the :class:`splitchat.GatewayServer` port that serves the gateway instead."""

    def __init__(self, server: uvicorn.Server, ws_port: int | None = None) -> None:
        self.server = server
        sockets = server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]
        self.ws_port = ws_port if ws_port is not None else self.port
        self.base = f"http://127.0.0.1:{self.port}"

    def ws_url(self, encoding: str = "json") -> str:
        return f"ws://127.0.0.1:{self.ws_port}/gateway?encoding={encoding}"


@asynccontextmanager
async def serve(
    app: Any, *, fast: Gateway | None = None, ws: str = "websockets-sansio"
) -> AsyncIterator[Server]:
    """Run ``app`` under uvicorn on an ephemeral loopback port for the block's duration; with
    ``fast``, that gateway is also served by a :class:`splitchat.GatewayServer` (``ws_url``)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, ws=ws, lifespan="off", log_level="warning")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await wait_until(lambda: server.started, 10)
        try:
            if fast is None:
                yield Server(server)
            else:
                async with GatewayServer(fast, host="127.0.0.1", port=0) as gateway_server:
                    yield Server(server, gateway_server.port)
        finally:
            server.should_exit = True


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll state owned by another component (uvicorn, the gateway) until it holds."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - no event to wait on in the observed code
            await anyio.sleep(0.01)


def decode(message: str | bytes) -> dict[str, Any]:
    if isinstance(message, bytes):
        out: dict[str, Any] = msgspec.msgpack.decode(message)
        return out
    out = json.loads(message)
    return out


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        return decode(await ws.recv())


async def identify(
    server: Server,
    token: str = "token-1",
    channels: list[str] | None = None,
    encoding: str = "json",
    **kwargs: Any,
) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect, check HELLO, IDENTIFY, and return the socket and the READY frame."""
    ws = await connect(server.ws_url(encoding), **kwargs)
    hello = await recv(ws)
    assert hello["op"] == 10
    await send(ws, {"op": 2, "d": {"token": token, "subscriptions": channels or []}}, encoding)
    ready = await recv(ws)
    assert ready["op"] == 0 and ready["t"] == "READY", ready
    return ws, ready


async def send(ws: ClientConnection, frame: dict[str, Any], encoding: str = "json") -> None:
    if encoding == "msgpack":
        await ws.send(msgspec.msgpack.encode(frame))
    else:
        await ws.send(json.dumps(frame))


async def post(http: httpx.AsyncClient, channel: str, data: Any, **extra: Any) -> dict[str, Any]:
    response = await http.post("/publish", json={"channel": channel, "data": data, **extra})
    assert response.status_code == 200, response.text
    out: dict[str, Any] = response.json()
    return out


async def expect_close(ws: ClientConnection, code: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Read until the server closes; assert the close code; return the frames read before it."""
    from websockets.exceptions import ConnectionClosed

    frames: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        try:
            while True:
                frames.append(decode(await ws.recv()))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, f"no close frame received (frames: {frames[-3:]})"
            assert exc.rcvd.code == code, (exc.rcvd.code, exc.rcvd.reason)
    return frames


class RawClient:
    """A WebSocket client over a raw socket (websockets' sans-I/O protocol) that reads only when
    told to: the kernel receive buffer is tiny and not auto-tuned, so a client that stops
    reading pushes back on the server within a few kilobytes."""

    def __init__(self, server: Server) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.protocol = ClientProtocol(parse_uri(server.ws_url()), max_size=None)
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self._frames: list[dict[str, Any]] = []
        self.close_code: int | None = None

    async def open(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.server.ws_port))
        self.protocol.send_request(self.protocol.connect())
        await self._flush()

    async def _flush(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        for chunk in self.protocol.data_to_send():
            if chunk:
                await loop.sock_sendall(self.sock, chunk)

    async def send(self, frame: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(frame).encode())
        await self._flush()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next frame, or ``None`` once the server closed (``close_code`` is then set)."""
        import asyncio

        from websockets.frames import Close, Frame, Opcode

        loop = asyncio.get_running_loop()
        with anyio.fail_after(timeout):
            while not self._frames:
                if self.close_code is not None:
                    return None
                data = await loop.sock_recv(self.sock, 65536)
                if data:
                    self.protocol.receive_data(data)
                else:
                    self.protocol.receive_eof()
                for event in self.protocol.events_received():
                    if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                        self._frames.append(json.loads(event.data))
                    elif isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                        self.close_code = Close.parse(event.data).code
                await self._flush()
                if not data and self.close_code is None:
                    self.close_code = 1006
        return self._frames.pop(0)

    def close(self) -> None:
        self.sock.close()


async def close_all(clients: list[ClientConnection]) -> None:
    """Close many clients concurrently (a client with unread frames takes a while to close)."""
    async with anyio.create_task_group() as tg:
        for ws in clients:
            tg.start_soon(ws.close)
