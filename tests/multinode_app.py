"""The node program of the multi-node tests and benchmark: endpoint + gateway configured by env.

Run ``uvicorn tests.multinode_app:app`` with:

* ``SPLITCHAT_BUS_URL`` (``memory://``, ``redis://..?prefix=..``, ``nats://..?stream=..``)
* ``SPLITCHAT_STATE_URL`` (Redis URL for sessions, idempotency, presence, rate limits; optional)
  and ``SPLITCHAT_STATE_PREFIX``
* ``SPLITCHAT_NODE_ID``, ``SPLITCHAT_HEARTBEAT_INTERVAL``, ``SPLITCHAT_CHECKPOINT_INTERVAL``
* ``SPLITCHAT_TOKENS``: ``token=user,token=user`` (static bearer tokens)

Commands: ``POST /api/channels/{channel}/messages`` (publishes MESSAGE_CREATE with the body),
``POST /api/limited/{channel}`` (5 per minute per user, across nodes). ``GET /health``,
``POST /admin/drain`` (gateway drain, as a SIGTERM handler would).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute

import splitchat


class Body(msgspec.Struct):
    n: int
    nonce: str | None = None


def build() -> Starlette:
    env = os.environ
    bus = splitchat.bus_from_url(env.get("SPLITCHAT_BUS_URL", "memory://"))
    tokens = dict(pair.split("=", 1) for pair in env.get("SPLITCHAT_TOKENS", "t1=u1").split(","))
    authenticator = splitchat.StaticTokenAuthenticator(
        {token: splitchat.Principal(id=user, name=user) for token, user in tokens.items()}
    )
    state_url = env.get("SPLITCHAT_STATE_URL")
    state = (
        splitchat.redis_state(state_url, prefix=env.get("SPLITCHAT_STATE_PREFIX", "splitchat:"))
        if state_url
        else None
    )
    endpoint = splitchat.CommandEndpoint(
        bus=bus,
        authenticator=authenticator,
        rate_limiter=state.rate_limiter if state else None,
        idempotency_store=state.idempotency_store if state else None,
        global_rate_limit=None,
        ip_rate_limit=None,
    )
    gateway = splitchat.Gateway(
        bus,
        authenticator,
        heartbeat_interval=float(env.get("SPLITCHAT_HEARTBEAT_INTERVAL", "41.25")),
        session_store=state.session_store if state else None,
        presence=state.presence if state else None,
        node_id=env.get("SPLITCHAT_NODE_ID"),
        checkpoint_interval=float(env.get("SPLITCHAT_CHECKPOINT_INTERVAL", "1.0")),
        send_queue_frames=5000,
        frame_budget=10_000,
    )

    @endpoint.command("POST", "/channels/{channel}/messages", body=Body, channel="{channel}")
    async def create(ctx: splitchat.CommandContext, body: Body) -> dict[str, Any]:
        """Publish MESSAGE_CREATE {"n"}."""
        ctx.publish("MESSAGE_CREATE", {"n": body.n})
        return {"n": body.n}

    @endpoint.command("POST", "/limited/{channel}", channel="{channel}", rate_limit="5/minute")
    async def limited(ctx: splitchat.CommandContext) -> dict[str, Any]:
        """A rate-limited command that publishes nothing."""
        return {"ok": True}

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def drain(request: Request) -> PlainTextResponse:
        # What a SIGTERM handler does before the server stops (uvicorn closes sockets itself).
        await gateway.drain()
        return PlainTextResponse("drained")

    components: list[Any] = [state] if state else []
    return Starlette(
        routes=[
            Route("/health", health),
            Route("/admin/drain", drain, methods=["POST"]),
            Mount("/api", app=endpoint),
            WebSocketRoute("/gateway", gateway),
        ],
        lifespan=splitchat.lifespan(*components, bus, endpoint, gateway),
    )


app = build() if os.environ.get("SPLITCHAT_NODE") == "1" else None
