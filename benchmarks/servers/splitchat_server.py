"""Contender: splitchat itself, the way an application would deploy it.

One uvicorn process serving a Starlette app with:

* ``/api`` -> :class:`splitchat.CommandEndpoint`; the POST ``/api/channels/{channel}/messages``
  runs the full command pipeline: bearer-token authentication, channel authorization, rate
  limiting (limits sized far above the benchmark's load so they never trigger, but they *are*
  checked on every request), body validation into a msgspec struct, idempotency (the payload's
  ``nonce``), the handler, publish to the in-memory bus, audit.
* ``/gateway`` -> :class:`splitchat.Gateway`; clients HELLO -> IDENTIFY (token, subscriptions)
  -> READY and receive dispatches ``{"op":0,"t":"MESSAGE_CREATE","d":...}``.
* The bus is ``InMemoryBus``, or ``bus_from_url($SPLITCHAT_BENCH_BUS)`` (the Redis bus) when the
  two-node ``redis`` scenario starts two of these processes.
* ``/bare/channels/{channel}/messages`` -> a bare Starlette JSON route (decode, respond, nothing
  else): the ingest scenario measures it next to the command endpoint on the same server, which
  prices the command pipeline itself.

The audit sink is the endpoint's default (the ``splitchat.audit`` logger); uvicorn's log level
is ``warning`` so audit records are formatted only if a handler is configured, as in production
with logging at WARNING.
"""

from __future__ import annotations

from typing import Any

import msgspec
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
    bus_from_url,
    lifespan,
)

from ._common import BUS_URL, run, serve_asgi

TOKEN = "splitchat-bench-token"
UNLIMITED = "1000000/second"  # checked on every request, never reached by the benchmark


class MessageBody(msgspec.Struct):
    """The benchmark payload, validated by the command endpoint."""

    seq: int
    sent_ns: int
    content: str
    nonce: str | None = None


bus = bus_from_url(BUS_URL) if BUS_URL else InMemoryBus()  # RedisBus in the two-node scenario
authenticator = StaticTokenAuthenticator({TOKEN: Principal(id="bench", name="bench")})
endpoint = CommandEndpoint(
    bus=bus,
    authenticator=authenticator,
    global_rate_limit=UNLIMITED,
    ip_rate_limit=UNLIMITED,
)
gateway = Gateway(bus=bus, authenticator=authenticator)


@endpoint.command(
    "POST", "/channels/{channel}/messages", body=MessageBody, channel="{channel}", rate_limit=UNLIMITED
)
async def create_message(ctx: CommandContext, body: MessageBody) -> dict[str, Any]:
    """Create a message: publish MESSAGE_CREATE to the channel."""
    ctx.publish("MESSAGE_CREATE", body)
    return {"ok": True}


async def bare_post(request: Request) -> JSONResponse:
    try:
        await request.json()
    except ValueError:
        return JSONResponse({"code": "invalid_json"}, status_code=400)
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        WebSocketRoute("/gateway", gateway),
        Route("/bare/channels/{channel}/messages", bare_post, methods=["POST"]),
        Mount("/api", app=endpoint),
    ],
    lifespan=lifespan(bus, endpoint, gateway),
)

UVICORN_OPTIONS: dict[str, Any] = {"ws": "websockets-sansio", "ws_per_message_deflate": False}
"""The settings docs/gateway.md recommends: the sans-I/O websockets implementation (its ``send``
waits while the transport is above its high-water mark, which is what bounds a slow client's
bytes) and no per-message compression (the gateway never compresses per recipient)."""

SERVE_INFO: dict[str, Any] = {
    "ws_path": "/gateway",
    "post_path": "/api/channels/{channel}/messages",
    "bare_post_path": "/bare/channels/{channel}/messages",
    "post_headers": {"authorization": f"Bearer {TOKEN}"},
    "token": TOKEN,
    "dialect": "splitchat",
}

if __name__ == "__main__":
    run(serve_asgi(app, UVICORN_OPTIONS, **SERVE_INFO))
