"""The splitchat Python client (extra ``client``: httpx + wsproto; runs on asyncio and trio).

::

    async with SplitchatClient("http://127.0.0.1:8000", token=token, subscriptions=["room:1"]) as client:
        receipt = await client.send("POST", "/channels/room:1/messages", {"content": "hi"})
        async for item in client.events():
            ...

See ``docs/client.md`` for the guarantees and reconnect rules.
"""

from __future__ import annotations

from ._backoff import FullJitterBackoff
from ._client import ClientStats, SplitchatClient
from ._commands import CommandError, CommandFailed, EventReceipt, Receipt, RetryPolicy
from ._frames import CloseCode, Encoding, Frame, FrameCodec, FrameDecodeError, Opcode
from ._items import ClientEvent, Dispatch, Ready, Resumed, Resync
from ._session import AuthenticationFailed, ClientSession, GatewayLimits
from ._websocket import ConnectionClosed, HandshakeRejected, WebSocket

__all__ = (
    "AuthenticationFailed",
    "ClientEvent",
    "ClientSession",
    "ClientStats",
    "CloseCode",
    "CommandError",
    "CommandFailed",
    "ConnectionClosed",
    "Dispatch",
    "Encoding",
    "EventReceipt",
    "Frame",
    "FrameCodec",
    "FrameDecodeError",
    "FullJitterBackoff",
    "GatewayLimits",
    "HandshakeRejected",
    "Opcode",
    "Ready",
    "Receipt",
    "Resumed",
    "Resync",
    "RetryPolicy",
    "SplitchatClient",
    "WebSocket",
)
