"""The Python client against a real uvicorn server (endpoint + gateway), through a fault-injecting TCP proxy.

The server runs in a background thread (its own asyncio loop), so the client and the proxy run
on both anyio backends. The gateway goes through :class:`TcpProxy` (cut / stall / refuse); the
command endpoint is reached directly, so "gateway down, HTTP up" is a real situation here.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from splitchat.client import (
    AuthenticationFailed,
    CommandError,
    Dispatch,
    FullJitterBackoff,
    Ready,
    Resumed,
    Resync,
    SplitchatClient,
)
from tests._proxy import TcpProxy
from tests.client_support import TOKEN, ThreadedServer, build_app, threaded_server

pytestmark = pytest.mark.slow


@asynccontextmanager
async def stack(**gateway_options: Any) -> AsyncIterator[tuple[ThreadedServer, TcpProxy]]:
    app, _gateway, _faults = build_app(**gateway_options)
    async with threaded_server(app) as server, TcpProxy("127.0.0.1", server.port) as proxy:
        yield server, proxy


def make_client(server: ThreadedServer, proxy: TcpProxy, **options: Any) -> SplitchatClient:
    options.setdefault("subscriptions", ["room:1"])
    options.setdefault("reconnect_min_delay", 0.05)
    options.setdefault("reconnect_max_delay", 0.5)
    return SplitchatClient(
        server.url, token=TOKEN, gateway_url=f"ws://127.0.0.1:{proxy.port}/gateway", **options
    )


async def next_dispatch(client: SplitchatClient, timeout: float = 5.0) -> Dispatch:
    """The next application dispatch (presence updates skipped)."""
    with anyio.fail_after(timeout):
        while True:
            item = await client.receive()
            assert isinstance(item, Dispatch), item
            if item.t != "PRESENCE_UPDATE":
                return item


async def test_ready_send_and_receive_own_event_with_receipt() -> None:
    async with stack(heartbeat_interval=2.0) as (server, proxy):
        async with make_client(server, proxy) as client:
            ready = await client.receive(5)
            assert isinstance(ready, Ready) and ready.subscriptions == ("room:1",)
            receipt = await client.send("POST", "/channels/room:1/messages", {"content": "hi"}, nonce="n-1")
            assert receipt.status == 200 and receipt.nonce == "n-1" and receipt.attempts == 1
            assert receipt.event is not None and receipt.event.channel == "room:1"
            assert receipt.event.position is not None and receipt.event.position.offset == 1
            event = await next_dispatch(client)
            assert (event.t, event.id, event.nonce, event.d["content"]) == (
                "MESSAGE_CREATE", receipt.event.id, "n-1", "hi",
            )
            with pytest.raises(CommandError) as info:
                await client.send("POST", "/channels/room:1/messages", {"wrong": 1})
            assert 400 <= info.value.status < 500 and info.value.code is not None
