"""The splitchat example chat app: Discord-shaped HTTP API + WebSocket gateway + one static page.

Run it::

    .venv/bin/python examples/chat/app.py --port 8000

Built only on splitchat's public API: writes are commands on a ``CommandEndpoint`` mounted at
``/api`` (its OpenAPI document at ``/api/openapi.json``); events reach browsers through the
``Gateway`` at ``/gateway`` (its AsyncAPI document at ``/asyncapi.json``); the page uses the
shipped browser client (``/splitchat/splitchat.js``). Configuration (all optional) comes from
environment variables, see :class:`ChatConfig` and docs/example-chat.md.

AUTHENTICATION HERE IS A DEMO: ``POST /api/login {"name"}`` gives anyone a token for any name.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

import splitchat

try:  # run as a script (python examples/chat/app.py) or imported as examples.chat.app
    from .store import Channel, DemoTokens, DemoUser, Message, MessageStore
except ImportError:  # pragma: no cover - script mode
    from store import Channel, DemoTokens, DemoUser, Message, MessageStore  # type: ignore[no-redef]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_LOGIN_BODY = 4096


@dataclass(frozen=True)
class ChatConfig:
    """Settings of the example app; :meth:`from_env` reads the documented environment variables."""

    bus_url: str = "memory://"
    state_url: str = ""  # Redis URL for sessions, idempotency, presence and rate limits ("": in memory)
    state_prefix: str = "splitchat:"
    node_id: str = ""  # this process's name in session records and presence leases ("": random)
    channels: tuple[str, ...] = ("general", "random", "help")
    message_rate: str = "5/5 seconds"
    typing_rate: str = "10/10 seconds"
    global_rate: str = "50/second"
    login_rate: str = "20/minute"
    history_limit: int = 1000
    heartbeat_interval: float = 41.25
    resume_window: float = 120.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ChatConfig:
        def get(name: str, default: str) -> str:
            return environ.get(name, "").strip() or default

        base = cls()
        return cls(
            bus_url=get("SPLITCHAT_BUS_URL", base.bus_url),
            state_url=get("SPLITCHAT_STATE_URL", base.state_url),
            state_prefix=get("SPLITCHAT_STATE_PREFIX", base.state_prefix),
            node_id=get("SPLITCHAT_NODE_ID", base.node_id),
            channels=tuple(c.strip() for c in get("SPLITCHAT_CHANNELS", ",".join(base.channels)).split(",")),
            message_rate=get("SPLITCHAT_MESSAGE_RATE", base.message_rate),
            typing_rate=get("SPLITCHAT_TYPING_RATE", base.typing_rate),
            global_rate=get("SPLITCHAT_GLOBAL_RATE", base.global_rate),
            login_rate=get("SPLITCHAT_LOGIN_RATE", base.login_rate),
            history_limit=int(get("SPLITCHAT_HISTORY_LIMIT", str(base.history_limit))),
            heartbeat_interval=float(get("SPLITCHAT_HEARTBEAT_INTERVAL", str(base.heartbeat_interval))),
            resume_window=float(get("SPLITCHAT_RESUME_WINDOW", str(base.resume_window))),
        )


# ---- request bodies (validated by the command endpoint; errors name the field) ----------------

Content = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]


class Login(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class CreateMessage(msgspec.Struct):
    content: Content
    nonce: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class EditMessage(msgspec.Struct, forbid_unknown_fields=True):
    content: Content


# A message id in a query string: a snowflake (a non-negative 64-bit integer).
MessageId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class HistoryQuery(msgspec.Struct, forbid_unknown_fields=False):
    """``?before=&after=&limit=`` of the message history (converted from strings by the endpoint)."""

    before: MessageId | None = None
    after: MessageId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50


# ---- response shapes (documentation: they feed the OpenAPI document at /api/openapi.json) ----------


class User(msgspec.Struct):
    id: str
    name: str


class ChannelObject(msgspec.Struct):
    id: str
    name: str


class MessageObject(msgspec.Struct):
    """A message as the API returns it and as MESSAGE_CREATE / MESSAGE_UPDATE carry it."""

    id: str
    channel_id: str
    author: User
    content: str
    timestamp: str
    edited_timestamp: str | None
    nonce: str | None


class MessageDeleted(msgspec.Struct):
    """MESSAGE_DELETE's data."""

    id: str
    channel_id: str


class TypingStart(msgspec.Struct):
    """TYPING_START's data (ephemeral: never replayed)."""

    channel_id: str
    user_id: str
    user: User
    timestamp: int


class PresenceMember(msgspec.Struct):
    """One connected member of a channel (the principal's public identity)."""

    id: str
    name: str | None


# Event type -> data schema of the dispatches this app publishes (feeds the AsyncAPI document).
EVENT_TYPES: dict[str, Any] = {
    "MESSAGE_CREATE": MessageObject,
    "MESSAGE_UPDATE": MessageObject,
    "MESSAGE_DELETE": MessageDeleted,
    "TYPING_START": TypingStart,
}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _error(status: int, code: str, message: str, errors: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "errors": errors or {}}, status_code=status)


def _rate_limited(decision: splitchat.RateLimitDecision) -> JSONResponse:
    body = {"message": "You are being rate limited.", "retry_after": decision.retry_after, "global": False}
    return JSONResponse(body, status_code=429, headers=dict(decision.headers()))


def build_app(config: ChatConfig | None = None, *, bus: splitchat.Bus | None = None) -> Starlette:
    """The chat application (a Starlette app with lifespan); ``bus`` overrides ``config.bus_url``."""
    config = config or ChatConfig.from_env()
    bus = bus if bus is not None else splitchat.bus_from_url(config.bus_url)
    channels = [Channel(id=name, name=name) for name in config.channels if name]
    store = MessageStore(channels, max_messages=config.history_limit)
    tokens = DemoTokens()
    snowflakes = splitchat.SnowflakeGenerator()
    # Shared state for several processes/machines (docs/deployment.md); in memory otherwise.
    state = splitchat.redis_state(config.state_url, prefix=config.state_prefix) if config.state_url else None
    limiter = state.rate_limiter if state is not None else splitchat.RateLimiter()

    async def authenticate(token: str) -> splitchat.Principal | None:
        user = tokens.lookup(token)
        if user is None:
            return None
        return splitchat.Principal(id=user.id, name=user.name)

    async def known_channel(principal: splitchat.Principal, channel: str) -> bool:
        return store.has_channel(channel)

    endpoint = splitchat.CommandEndpoint(
        bus=bus,
        authenticator=authenticate,
        # Unknown channels are answered 404 by the handlers (Discord's "Unknown Channel"), so the
        # HTTP side authorizes every channel; the gateway refuses subscriptions to unknown ones.
        rate_limiter=limiter,
        idempotency_store=state.idempotency_store if state is not None else None,
        snowflakes=snowflakes,
        global_rate_limit=config.global_rate,
    )
    presence: splitchat.Presence = state.presence if state is not None else splitchat.InMemoryPresence()
    gateway = splitchat.Gateway(
        bus=bus,
        authenticator=authenticate,
        authorize_channel=known_channel,
        heartbeat_interval=config.heartbeat_interval,
        resume_window=config.resume_window,
        presence=presence,
        session_store=state.session_store if state is not None else None,
        node_id=config.node_id or None,
    )

    def author_of(ctx: splitchat.CommandContext) -> dict[str, str]:
        return {"id": ctx.user.id, "name": ctx.user.name or ctx.user.id}

    def channel_of(ctx: splitchat.CommandContext) -> str:
        channel_id = ctx.params["channel_id"]
        if not store.has_channel(channel_id):
            raise splitchat.HTTPError(404, "unknown_channel", "Unknown channel")
        return channel_id

    def own_message(ctx: splitchat.CommandContext) -> Message:
        message = store.get(channel_of(ctx), ctx.params["message_id"])
        if message is None:
            raise splitchat.HTTPError(404, "unknown_message", "Unknown message")
        if message.author["id"] != ctx.user.id:
            raise splitchat.HTTPError(403, "not_author", "Only the author may change this message")
        return message

    @endpoint.command("GET", "/channels", response=list[ChannelObject], name="list_channels")
    async def list_channels(ctx: splitchat.CommandContext) -> list[dict[str, str]]:
        """The channels, in display order."""
        return [channel.to_json() for channel in channels]

    @endpoint.command(
        "GET",
        "/channels/{channel_id}/presence",
        channel="{channel_id}",
        response=list[PresenceMember],
        name="list_presence",
    )
    async def list_presence(ctx: splitchat.CommandContext) -> list[dict[str, Any]]:
        """Who is connected to the channel's gateway subscription right now."""
        return await presence.members(channel_of(ctx))

    @endpoint.command(
        "POST",
        "/channels/{channel_id}/messages",
        body=CreateMessage,
        response=MessageObject,
        channel="{channel_id}",
        rate_limit=config.message_rate,
        name="create_message",
    )
    async def create_message(ctx: splitchat.CommandContext, body: CreateMessage) -> dict[str, Any]:
        """Post a message; dispatches MESSAGE_CREATE with the same object."""
        if not body.content.strip():
            raise splitchat.HTTPError(
                400, "invalid_body", "Message content is blank", errors={"$.content": "must not be blank"}
            )
        message = Message(
            id=snowflakes.next_str(),
            channel_id=channel_of(ctx),
            author=author_of(ctx),
            content=body.content,
            timestamp=_now_iso(),
            nonce=ctx.nonce,
        )
        store.add(message)
        ctx.publish("MESSAGE_CREATE", message.to_json())
        return message.to_json()

    @endpoint.command(
        "GET",
        "/channels/{channel_id}/messages",
        query=HistoryQuery,
        response=list[MessageObject],
        channel="{channel_id}",
        rate_limit=config.global_rate,
        name="list_messages",
    )
    async def list_messages(ctx: splitchat.CommandContext) -> list[dict[str, Any]]:
        """Message history, newest first: ``?limit=`` (1-100, default 50), ``?before=`` / ``?after=`` ids."""
        query: HistoryQuery = ctx.query
        page = store.page(channel_of(ctx), before=query.before, after=query.after, limit=query.limit)
        return [message.to_json() for message in page]

    @endpoint.command(
        "PATCH",
        "/channels/{channel_id}/messages/{message_id}",
        body=EditMessage,
        response=MessageObject,
        channel="{channel_id}",
        rate_limit=config.message_rate,
        name="edit_message",
    )
    async def edit_message(ctx: splitchat.CommandContext, body: EditMessage) -> dict[str, Any]:
        """Edit your own message; dispatches MESSAGE_UPDATE."""
        message = own_message(ctx)
        message.content = body.content
        message.edited_timestamp = _now_iso()
        ctx.publish("MESSAGE_UPDATE", message.to_json())
        return message.to_json()

    @endpoint.command(
        "DELETE",
        "/channels/{channel_id}/messages/{message_id}",
        channel="{channel_id}",
        rate_limit=config.message_rate,
        status=204,
        name="delete_message",
    )
    async def delete_message(ctx: splitchat.CommandContext) -> None:
        """Delete your own message; dispatches MESSAGE_DELETE {id, channel_id}."""
        message = own_message(ctx)
        store.delete(message.channel_id, message.id)
        ctx.publish("MESSAGE_DELETE", {"id": message.id, "channel_id": message.channel_id})

    @endpoint.command(
        "POST",
        "/channels/{channel_id}/typing",
        channel="{channel_id}",
        rate_limit=config.typing_rate,
        status=204,
        name="trigger_typing",
    )
    async def trigger_typing(ctx: splitchat.CommandContext) -> None:
        """Dispatches an ephemeral TYPING_START (never replayed; clients expire it after ~10 s)."""
        ctx.publish(
            "TYPING_START",
            {
                "channel_id": channel_of(ctx),
                "user_id": ctx.user.id,
                "user": author_of(ctx),
                "timestamp": int(datetime.now(UTC).timestamp()),
            },
            ephemeral=True,
        )

    async def login(request: Request) -> Response:
        # DEMO ONLY: anyone can be anyone. Bounded body read; per-IP rate limit.
        client = request.client.host if request.client else "unknown"
        decision = await limiter.hit(f"login:{client}", config.login_rate, bucket="login", scope="shared")
        if not decision.allowed:
            return _rate_limited(decision)
        if "json" not in request.headers.get("content-type", ""):
            return _error(415, "unsupported_media_type", "Send application/json")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_LOGIN_BODY:
                return _error(413, "payload_too_large", "Body too large")
        try:
            body = msgspec.json.decode(raw, type=Login)
        except msgspec.ValidationError as exc:
            return _error(400, "invalid_body", "Invalid body", {"$.name": str(exc)})
        except msgspec.DecodeError:
            return _error(400, "invalid_json", "Body is not valid JSON")
        name = body.name.strip()
        if not name:
            return _error(400, "invalid_body", "Invalid body", {"$.name": "must not be blank"})
        user = DemoUser(id=snowflakes.next_str(), name=name)
        token = tokens.issue(user)
        return JSONResponse({"token": token, "user": {"id": user.id, "name": user.name}})

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    asyncapi = msgspec.json.encode(
        splitchat.gateway_asyncapi(gateway, events=EVENT_TYPES, title="splitchat example chat gateway")
    )

    async def asyncapi_document(request: Request) -> Response:
        # The gateway's AsyncAPI 3.0 document, with this app's MESSAGE_* / TYPING_START events.
        return Response(asyncapi, media_type="application/json")

    async def not_found(request: Request, exc: Exception) -> Response:
        # A URL no route matches (e.g. a path segment with a newline, which Mount's ".*" does not
        # match) gets the API's JSON error body too, as /api/openapi.json documents.
        return _error(404, "not_found", "Not found")

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/login", login, methods=["POST"]),
            Route("/asyncapi.json", asyncapi_document, methods=["GET"]),
            Mount("/api", app=endpoint),
            WebSocketRoute("/gateway", gateway),
            splitchat.browser_client_mount("/splitchat"),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        lifespan=splitchat.lifespan(*([state] if state is not None else []), bus, endpoint, gateway),
        exception_handlers={404: not_found},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="splitchat example chat app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    import uvicorn

    app = build_app()
    print(f"splitchat chat: http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
