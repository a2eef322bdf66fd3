"""A complete splitchat app (endpoint + gateway + in-memory bus) served by uvicorn in a thread.

The server runs on its own asyncio loop in a background thread, so the test itself (client,
proxy) can run on asyncio *or* trio. Everything goes over real loopback sockets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute

from splitchat import (
    CommandContext,
    CommandEndpoint,
    Gateway,
    InMemoryBus,
    Principal,
    StaticTokenAuthenticator,
    lifespan,
)
from splitchat.testing import GatewayFaults

TOKEN = "client-test-token-alice"
ALICE = Principal(id="1", name="alice")
AUTHENTICATOR = StaticTokenAuthenticator({TOKEN: ALICE})


class PostMessage(msgspec.Struct, kw_only=True):
    content: str
    nonce: str | None = None


class Burst(msgspec.Struct, kw_only=True):
    start: int
    count: int


def build_app(**gateway_options: Any) -> tuple[Starlette, Gateway, GatewayFaults]:
    """The app under test: ``POST /api/channels/{id}/messages``, ``POST /api/channels/{id}/burst``."""
    bus = InMemoryBus()
    endpoint = CommandEndpoint(
        bus=bus,
        authenticator=AUTHENTICATOR,
        global_rate_limit=None,
        ip_rate_limit=None,
        max_events_per_command=50,
    )

    @endpoint.command("POST", "/channels/{channel_id}/messages", body=PostMessage, channel="{channel_id}")
    async def post_message(ctx: CommandContext, body: PostMessage) -> dict[str, Any]:
        """Post a message."""
        message = {"id": ctx.snowflakes.next_str(), "content": body.content}
        ctx.publish("MESSAGE_CREATE", message)
        return message

    @endpoint.command("POST", "/channels/{channel_id}/burst", body=Burst, channel="{channel_id}")
    async def burst(ctx: CommandContext, body: Burst) -> dict[str, Any]:
        """Publish ``count`` numbered events (the test's event source)."""
        for n in range(body.start, body.start + body.count):
            ctx.publish("NUMBER", {"n": n})
        return {"published": body.count}

    gateway = Gateway(bus, AUTHENTICATOR, **gateway_options)
    faults = GatewayFaults(gateway)

    async def inject_fault(request: Request) -> JSONResponse:
        # Runs on the server's own loop (the test may be on another thread and another backend).
        action = request.path_params["action"]
        count = await {"reconnect": faults.reconnect, "invalidate": faults.invalidate_sessions}[action]()
        return JSONResponse({"connections": count})

    app = Starlette(
        routes=[
            WebSocketRoute("/gateway", faults),
            Mount("/api", app=endpoint),
            Route("/test/faults/{action}", inject_fault, methods=["POST"]),
        ],
        lifespan=lifespan(bus, endpoint, gateway),
    )
    return app, gateway, faults


class ThreadedServer:
    """uvicorn serving an app on ``127.0.0.1:<ephemeral>`` from a background thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, ws="wsproto", lifespan="on", log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@asynccontextmanager
async def threaded_server(app: Any) -> AsyncIterator[ThreadedServer]:
    """Serve ``app`` from a background thread for the block's duration."""
    server = ThreadedServer(app)
    await anyio.to_thread.run_sync(server.start)
    try:
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
