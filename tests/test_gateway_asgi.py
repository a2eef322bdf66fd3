"""The Gateway driven directly over ASGI (no server) on every anyio backend (asyncio and trio)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from splitchat import Gateway, InMemoryBus, Principal, StaticTokenAuthenticator, encode_event

AUTH = StaticTokenAuthenticator({"t": Principal(id="u1")})


class Client:
    def __init__(self, to_app: MemoryObjectSendStream[Any], from_app: MemoryObjectReceiveStream[Any]) -> None:
        self.to_app = to_app
        self.from_app = from_app

    async def send(self, frame: dict[str, Any]) -> None:
        await self.to_app.send({"type": "websocket.receive", "text": json.dumps(frame)})

    async def message(self) -> dict[str, Any]:
        with anyio.fail_after(5):
            out: dict[str, Any] = await self.from_app.receive()
            return out

    async def frame(self) -> dict[str, Any]:
        message = await self.message()
        assert message["type"] == "websocket.send", message
        out: dict[str, Any] = json.loads(message["text"])
        return out


@asynccontextmanager
async def connection(
    gateway: Gateway, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[Client]:
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Any](100)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[Any](100)
    scope = {"type": "websocket", "path": "/gateway", "query_string": b"", "headers": headers or []}
    async with to_app_send, to_app_receive, from_app_send, from_app_receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(gateway, scope, to_app_receive.receive, from_app_send.send)
            await to_app_send.send({"type": "websocket.connect"})
            yield Client(to_app_send, from_app_receive)
            await to_app_send.send({"type": "websocket.disconnect", "code": 1000})


async def test_identify_dispatch_and_clean_close() -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH) as gateway:
        async with connection(gateway) as client:
            assert (await client.message())["type"] == "websocket.accept"
            assert (await client.frame())["op"] == 10
            await client.send({"op": 2, "d": {"token": "t", "subscriptions": ["c"]}})
            ready = await client.frame()
            assert ready["t"] == "READY" and ready["s"] == 1
            assert (await client.frame())["t"] == "PRESENCE_UPDATE"
            await bus.publish("c", encode_event(id="1", type="X", channel="c", data=[1]))
            frame = await client.frame()
            assert frame == {"op": 0, "t": "X", "d": [1], "id": "1", "channel": "c", "s": 3}
        assert gateway.connection_count == 0
        assert gateway.session_ids() == []  # client close 1000 ends the session


async def test_bus_gap_sends_invalid_session_and_closes_4007() -> None:
    async with InMemoryBus(history_size=2) as bus, Gateway(bus, AUTH) as gateway:
        async with connection(gateway) as client:
            await client.message()
            await client.frame()
            await client.send({"op": 2, "d": {"token": "t", "subscriptions": ["c"]}})
            await client.frame()
            await client.frame()  # presence
            # Five publishes with no checkpoint in between: the hub falls behind the 2-event log.
            for n in range(5):
                await bus.publish("c", encode_event(id=str(n), type="X", channel="c", data=n))
            frames = []
            while (message := await client.message())["type"] == "websocket.send":
                frames.append(json.loads(message["text"]))
            assert frames[-1] == {"op": 9, "d": False, "s": None, "t": None}
            assert message == {
                "type": "websocket.close",
                "code": 4007,
                "reason": "events were lost; identify again",
            }


async def test_origin_not_allowed_is_denied_before_accept_and_http_gets_426() -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH, allowed_origins=["https://ok"]) as gateway:
        async with connection(gateway, [(b"origin", b"https://evil")]) as client:
            assert await client.message() == {"type": "websocket.close", "code": 1008}
        async with connection(gateway, [(b"origin", b"https://ok")]) as client:
            assert (await client.message())["type"] == "websocket.accept"
        sent: list[Any] = []

        async def capture(message: Any) -> None:
            sent.append(message)

        async def nothing() -> Any:
            raise AssertionError("not called")

        await gateway({"type": "http"}, nothing, capture)
        assert sent[0]["status"] == 426
