"""A small chat app declared on a CommandEndpoint, shared by the endpoint tests."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from splitchat import (
    CommandContext,
    CommandEndpoint,
    HTTPError,
    InMemoryBus,
    Principal,
    RateLimiter,
    StaticTokenAuthenticator,
)

TOKEN = "tok-alice-0123456789"
OTHER_TOKEN = "tok-bob-9876543210"
ALICE = Principal(id="1", name="alice", scopes=frozenset({"messages.write"}))
BOB = Principal(id="2", name="bob")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOB_AUTH = {"Authorization": f"Bearer {OTHER_TOKEN}"}


class CreateMessage(msgspec.Struct, kw_only=True):
    content: str
    nonce: str | int | None = None
    tts: bool = False


class Message(msgspec.Struct, kw_only=True):
    id: str
    channel_id: str
    content: str
    author: dict[str, Any]


class EditMessage(msgspec.Struct, kw_only=True):
    content: str


async def private_channel_authorizer(principal: Principal, channel: str) -> bool:
    return not channel.startswith("private") or principal.id == "1"


def build_endpoint(bus: InMemoryBus, **options: Any) -> CommandEndpoint:
    """The chat endpoint: messages (rate limited 5/5 s per channel), typing, a query, a buggy one."""
    options.setdefault("rate_limiter", RateLimiter())
    endpoint = CommandEndpoint(
        bus=bus,
        authenticator=StaticTokenAuthenticator({TOKEN: ALICE, OTHER_TOKEN: BOB}),
        channel_authorizer=private_channel_authorizer,
        **options,
    )
    messages: dict[str, Message] = {}

    @endpoint.command(
        "POST",
        "/channels/{channel_id}/messages",
        body=CreateMessage,
        response=Message,
        channel="{channel_id}",
        rate_limit="5/5 seconds",
        name="create_message",
    )
    async def create_message(ctx: CommandContext, body: CreateMessage) -> Message:
        """Post a message to a channel."""
        if body.content == "":
            raise HTTPError(400, "invalid_body", "Empty message", errors={"$.content": "must not be empty"})
        message = Message(
            id=ctx.snowflakes.next_str(),
            channel_id=ctx.params["channel_id"],
            content=body.content,
            author=ctx.user.identity(),
        )
        messages[message.id] = message
        ctx.publish("MESSAGE_CREATE", message)
        return message

    @endpoint.command(
        "PATCH",
        "/channels/{channel_id}/messages/{message_id}",
        body=EditMessage,
        channel="{channel_id}",
        name="edit_message",
    )
    async def edit_message(ctx: CommandContext, body: EditMessage) -> Message:
        """Edit a message."""
        message = messages.get(ctx.params["message_id"])
        if message is None:
            raise HTTPError(404, "unknown_message", "Unknown message")
        if message.author["id"] != ctx.user.id:
            raise HTTPError(403, "forbidden", "Not your message")
        message.content = body.content
        ctx.publish("MESSAGE_UPDATE", message)
        return message

    @endpoint.command(
        "GET", "/channels/{channel_id}/messages/{message_id}", channel="{channel_id}", name="get_message"
    )
    async def get_message(ctx: CommandContext) -> Message:
        """Fetch a message (a query: publishes nothing)."""
        message = messages.get(ctx.params["message_id"])
        if message is None:
            raise HTTPError(404, "unknown_message", "Unknown message")
        return message

    @endpoint.command(
        "DELETE",
        "/channels/{channel_id}/messages/{message_id}",
        channel="{channel_id}",
        status=204,
        name="delete_message",
    )
    async def delete_message(ctx: CommandContext) -> None:
        """Delete a message."""
        if messages.pop(ctx.params["message_id"], None) is None:
            raise HTTPError(404, "unknown_message", "Unknown message")
        ctx.publish("MESSAGE_DELETE", {"id": ctx.params["message_id"]})

    @endpoint.command(
        "POST", "/channels/{channel_id}/typing", channel="{channel_id}", status=204, name="typing"
    )
    async def typing(ctx: CommandContext) -> None:
        """Signal typing (ephemeral)."""
        ctx.publish("TYPING_START", {"user_id": ctx.user.id}, ephemeral=True)

    @endpoint.command("POST", "/admin/broadcast", body=EditMessage, scopes={"admin"}, name="broadcast")
    async def broadcast(ctx: CommandContext, body: EditMessage) -> dict[str, Any]:
        """Needs the admin scope."""
        return {}

    @endpoint.command("GET", "/status", public=True, name="status")
    async def status(ctx: CommandContext) -> dict[str, Any]:
        """Public: no authentication needed."""
        return {"ok": True, "user": ctx.principal.id if ctx.principal else None}

    @endpoint.command("POST", "/buggy", name="buggy")
    async def buggy(ctx: CommandContext) -> dict[str, Any]:
        """A handler bug."""
        raise RuntimeError("handler bug with secret detail")

    return endpoint


def asgi_client(app: Any, client: tuple[str, int] = ("127.0.0.1", 4321)) -> httpx.AsyncClient:
    """An in-process HTTP client for an ASGI app (works on asyncio and trio)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://test")
