"""A real uvicorn server + real WebSocket clients for the gateway's end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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

from splitchat import Bus, Gateway, Principal, StaticTokenAuthenticator, encode_event

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
    def __init__(self, server: uvicorn.Server) -> None:
        self.server = server
        sockets = server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def ws_url(self, encoding: str = "json") -> str:
        return f"ws://127.0.0.1:{self.port}/gateway?encoding={encoding}"


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[Server]:
    """Run ``app`` under uvicorn on an ephemeral loopback port for the block's duration."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, ws="websockets-sansio", lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield Server(server)
        finally:
            server.should_exit = True


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
