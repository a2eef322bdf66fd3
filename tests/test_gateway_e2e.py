"""End-to-end tests: a real uvicorn server, real WebSocket clients (websockets), real HTTP POSTs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from splitchat import Gateway, GatewayConnection, InMemoryBus, InMemorySessionStore, Position
from splitchat.bus._base import BusUnavailable, Delivery

from .gateway_harness import (
    RawClient,
    Server,
    authenticator,
    close_all,
    expect_close,
    identify,
    make_app,
    post,
    recv,
    send,
    serve,
    wait_until,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn in-process and the websockets client are asyncio-only


_FAST = False  # set per test by the fixture below


@pytest.fixture(autouse=True, params=["asgi", "fast"])
def gateway_transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every scenario runs against the ASGI route (uvicorn) and the GatewayServer fast path."""
    global _FAST
    _FAST = request.param == "fast"
    yield request.param
    _FAST = False


def _serve(bus: InMemoryBus, gateway: Gateway) -> AbstractAsyncContextManager[Server]:
    return serve(make_app(bus, gateway), fast=gateway if _FAST else None)


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[Server, Gateway, InMemoryBus, httpx.AsyncClient]]:
    async with InMemoryBus() as bus:
        gateway = Gateway(bus, authenticator, **options)
        async with gateway:
            async with _serve(bus, gateway) as server:
                async with httpx.AsyncClient(base_url=server.base) as http:
                    yield server, gateway, bus, http


async def test_hello_identify_ready_and_dispatch() -> None:
    async with running(resume_gateway_url="ws://example/gateway") as (server, gateway, bus, http):
        ws, ready = await identify(server, channels=["room"])
        assert ready["s"] == 1
        assert ready["d"]["subscriptions"] == ["room"] and ready["d"]["denied"] == []
        assert ready["d"]["user"] == {"id": "u1", "name": "user 1"}
        assert ready["d"]["resume_gateway_url"] == "ws://example/gateway"
        presence = await recv(ws)
        assert presence["t"] == "PRESENCE_UPDATE" and presence["s"] == 2
        await post(http, "room", {"text": "hi"}, nonce="n1", id="42")
        frame = await recv(ws)
        assert frame == {
            "op": 0,
            "t": "MESSAGE_CREATE",
            "d": {"text": "hi"},
            "id": "42",
            "channel": "room",
            "nonce": "n1",
            "s": 3,
        }
        await send(ws, {"op": 1, "d": 3})
        assert (await recv(ws))["op"] == 11
        await ws.close()


@pytest.mark.slow
async def test_fanout_100_clients_200_events_in_order() -> None:
    async with running() as (server, gateway, bus, http):
        clients = []
        for i in range(100):
            ws, _ = await identify(server, token=f"token-{i}", channels=["big"])
            clients.append(ws)
        assert gateway.connection_count == 100
        received: dict[int, list[dict[str, Any]]] = {i: [] for i in range(100)}

        async def reader(i: int) -> None:
            ws = clients[i]
            while len(received[i]) < 200:
                frame = await recv(ws, timeout=30)
                if frame.get("t") == "MESSAGE_CREATE":
                    received[i].append(frame)

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(reader, i)
            for n in range(200):
                await post(http, "big", {"n": n})
        for i in range(100):
            frames = received[i]
            assert [f["d"]["n"] for f in frames] == list(range(200))
            seqs = [f["s"] for f in frames]
            assert seqs == list(range(seqs[0], seqs[0] + 200)), "sequence numbers must be consecutive"
        await close_all(clients)


async def test_resume_after_abrupt_disconnect_replays_exactly_the_missed_events() -> None:
    async with running() as (server, gateway, bus, http):
        ws, ready = await identify(server, channels=["room"])
        session_id = ready["d"]["session_id"]
        await recv(ws)  # own PRESENCE_UPDATE (ephemeral, s=2)
        seen: list[dict[str, Any]] = []
        for n in range(10):
            await post(http, "room", {"n": n})
            seen.append(await recv(ws))
        last_seq = seen[-1]["s"]
        assert [f["s"] for f in seen] == list(range(3, 13))
        # Cut the TCP connection: no close frame.
        ws.transport.abort()
        await wait_until(lambda: gateway.connection_count == 0)
        for n in range(10, 60):
            await post(http, "room", {"n": n})

        ws2, _ = await _connect_hello(server)
        await send(ws2, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": last_seq}})

        async def publish_during_replay() -> None:
            for n in range(60, 70):
                await post(http, "room", {"n": n})

        frames: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_during_replay)
            while len([f for f in frames if f.get("t") == "MESSAGE_CREATE"]) < 60:
                frames.append(await recv(ws2))
        types = [f.get("t") for f in frames]
        resumed_at = types.index("RESUMED")
        replay = frames[:resumed_at]
        assert [f["d"]["n"] for f in replay] == list(range(10, 60))
        assert [f["s"] for f in replay] == list(range(last_seq + 1, last_seq + 51))
        resumed = frames[resumed_at]
        assert resumed["d"] == {"replayed": 50, "skipped_ephemeral": 0}
        after = [f for f in frames[resumed_at + 1 :] if f.get("t") == "MESSAGE_CREATE"]
        # Published during the replay: each exactly once, in order, no gap at the seam.
        assert [f["d"]["n"] for f in after] == list(range(60, 70))
        all_seqs = [f["s"] for f in frames]
        assert all_seqs == list(range(last_seq + 1, last_seq + 1 + len(frames)))
        await ws2.close()


async def _connect_hello(server: Server, encoding: str = "json") -> tuple[Any, dict[str, Any]]:
    from websockets.asyncio.client import connect

    ws = await connect(server.ws_url(encoding))
    hello = await recv(ws)
    assert hello["op"] == 10
    return ws, hello


async def test_resume_rejections() -> None:
    async with running() as (server, gateway, bus, http):
        ws, ready = await identify(server, channels=["room"])
        session_id = ready["d"]["session_id"]
        ws.transport.abort()
        await wait_until(lambda: gateway.connection_count == 0)
        # unknown session -> INVALID_SESSION false (and IDENTIFY is possible again)
        ws2, _ = await _connect_hello(server)
        await send(ws2, {"op": 6, "d": {"token": "token-1", "session_id": "nope", "seq": 1}})
        assert await recv(ws2) == {"op": 9, "d": False, "s": None, "t": None}
        await send(ws2, {"op": 2, "d": {"token": "token-1"}})
        assert (await recv(ws2))["t"] == "READY"
        await ws2.close()
        # another principal's token -> INVALID_SESSION false
        ws3, _ = await _connect_hello(server)
        await send(ws3, {"op": 6, "d": {"token": "token-2", "session_id": session_id, "seq": 1}})
        assert (await recv(ws3))["op"] == 9
        await ws3.close()
        # seq ahead of the session -> 4007
        ws4, _ = await _connect_hello(server)
        await send(ws4, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": 999}})
        await expect_close(ws4, 4007)
        # bad token -> 4004
        ws5, _ = await _connect_hello(server)
        await send(ws5, {"op": 6, "d": {"token": "bad", "session_id": session_id, "seq": 1}})
        await expect_close(ws5, 4004)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([{"op": 99}], 4001),
        ([{"op": 12, "d": {"channels": ["x"]}}], 4003),
        ([{"op": 2, "d": {"token": "token-1"}}, {"op": 2, "d": {"token": "token-1"}}], 4005),
        ([{"op": 2, "d": {"token": "wrong"}}], 4004),
        ([{"op": 2, "d": "not an object"}], 4002),
    ],
)
async def test_close_codes(frames: list[dict[str, Any]], code: int) -> None:
    async with running() as (server, gateway, bus, http):
        ws, _ = await _connect_hello(server)
        for frame in frames:
            await send(ws, frame)
        await expect_close(ws, code)


async def test_close_4002_oversized_and_undecodable() -> None:
    async with running(max_frame_bytes=256) as (server, gateway, bus, http):
        ws, _ = await _connect_hello(server)
        await ws.send('{"op": 1, "d": "' + "x" * 300 + '"}')
        await expect_close(ws, 4002)
        ws, _ = await _connect_hello(server)
        await ws.send("{not json")
        await expect_close(ws, 4002)


async def test_close_4003_identify_timeout_and_4009_missed_heartbeat() -> None:
    async with running(identify_timeout=0.3, heartbeat_interval=0.4) as (server, gateway, bus, http):
        ws, hello = await _connect_hello(server)
        assert hello["d"]["heartbeat_interval"] == 400
        await expect_close(ws, 4003)
    async with running(identify_timeout=5, heartbeat_interval=0.2) as (server, gateway, bus, http):
        ws, ready = await identify(server, channels=["room"])
        await expect_close(ws, 4009)  # 1.5 x 0.2 s without a heartbeat
        # ... and the session stays resumable
        ws2, _ = await _connect_hello(server)
        await send(
            ws2, {"op": 6, "d": {"token": "token-1", "session_id": ready["d"]["session_id"], "seq": 1}}
        )
        frames = [await recv(ws2)]
        while frames[-1].get("t") != "RESUMED":
            frames.append(await recv(ws2))
        await ws2.close()


async def test_frame_budget_rate_limited_then_4008() -> None:
    async with running(frame_budget=5, frame_budget_window=60) as (server, gateway, bus, http):
        ws, _ = await identify(server)  # IDENTIFY is frame 1 of the budget
        for _ in range(4):
            await send(ws, {"op": 13, "d": {"channels": []}})
            assert (await recv(ws))["t"] == "UNSUBSCRIBED"
        for _ in range(3):  # heartbeats are exempt
            await send(ws, {"op": 1, "d": None})
            assert (await recv(ws))["op"] == 11
        await send(ws, {"op": 13, "d": {"channels": []}})
        limited = await recv(ws)
        assert limited["t"] == "RATE_LIMITED" and limited["d"]["op"] == 13
        assert 0 < limited["d"]["retry_after"] <= 60
        for _ in range(5):
            await send(ws, {"op": 13, "d": {"channels": []}})
        frames = await expect_close(ws, 4008)
        assert all(f["t"] == "RATE_LIMITED" for f in frames)


async def test_slow_consumer_4010_while_others_keep_receiving() -> None:
    events = 300
    queue_frames = 20
    async with running(send_queue_frames=queue_frames) as (server, gateway, bus, http):
        # The stalled client stops reading from its socket; a private bulk channel fills the TCP
        # buffers quickly so the server-side writer blocks and the bounded outbox overflows.
        stalled = RawClient(server)
        await stalled.open()
        assert (await stalled.recv() or {}).get("op") == 10
        await stalled.send({"op": 2, "d": {"token": "token-0", "subscriptions": ["busy", "bulk"]}})
        ready = await stalled.recv()
        assert ready is not None and ready["t"] == "READY"
        stalled_session = ready["d"]["session_id"]
        others = [(await identify(server, token=f"token-{i}", channels=["busy"]))[0] for i in range(1, 51)]
        got: dict[int, list[int]] = {i: [] for i in range(50)}

        async def reader(i: int) -> None:
            while len(got[i]) < events:
                frame = await recv(others[i], timeout=30)
                if frame.get("t") == "MESSAGE_CREATE":
                    got[i].append(frame["d"]["n"])

        def stalled_core() -> GatewayConnection:
            core = gateway.connection_of(stalled_session)
            assert core is not None
            return core

        peak = 0
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(reader, i)
            for n in range(events):
                await post(http, "busy", {"n": n})
                if stalled_core().close_code is None:
                    await post(http, "bulk", {"pad": "x" * 20_000})
                peak = max(peak, stalled_core().outbox_peak_frames)
        assert all(got[i] == list(range(events)) for i in range(50))
        assert stalled_core().close_code == 4010
        assert 0 < peak <= queue_frames  # the outbox never exceeded its bound
        # Reading again, the client drains what the kernel held. The 4010 close frame is queued
        # behind the backlog the client never read: if it did not fit into the socket buffers
        # before the server's short grace for stalled clients ran out, the server aborted the
        # connection and the client sees 1006. Either way the server closed it as 4010 (above).
        with anyio.fail_after(10):
            while await stalled.recv() is not None:
                pass
        assert stalled.close_code in (4010, 1006)
        stalled.close()
        await close_all(others)


async def test_msgpack_end_to_end() -> None:
    async with running() as (server, gateway, bus, http):
        ws, ready = await identify(server, channels=["room"], encoding="msgpack")
        assert ready["s"] == 1 and ready["d"]["subscriptions"] == ["room"]
        await recv(ws)  # presence
        await post(http, "room", {"text": "hé", "n": [1, 2.5, None]}, id="7")
        frame = await recv(ws)
        assert frame == {
            "op": 0,
            "t": "MESSAGE_CREATE",
            "d": {"text": "hé", "n": [1, 2.5, None]},
            "id": "7",
            "channel": "room",
            "s": 3,
        }
        await send(ws, {"op": 1, "d": 3}, "msgpack")
        assert (await recv(ws))["op"] == 11
        await ws.close()


async def test_presence_join_and_leave() -> None:
    async with running() as (server, gateway, bus, http):
        a, _ = await identify(server, token="token-1", channels=["lobby"])
        assert (await recv(a))["d"] == {
            "channel": "lobby",
            "user": {"id": "u1", "name": "user 1"},
            "status": "online",
        }
        b, _ = await identify(server, token="token-2", channels=["lobby"])
        joined = await recv(a)
        assert joined["t"] == "PRESENCE_UPDATE" and joined["d"]["user"]["id"] == "u2"
        assert joined["d"]["status"] == "online"
        # a second session of u2 does not announce again; its leaving does not either
        b2, _ = await identify(server, token="token-2", channels=["lobby"])
        members = await gateway.presence.members("lobby")
        assert sorted(m["id"] for m in members) == ["u1", "u2"]
        await b2.close()
        await b.close()
        left = await recv(a)
        assert left["t"] == "PRESENCE_UPDATE"
        assert left["d"]["status"] == "offline" and left["d"]["user"]["id"] == "u2"
        assert [m["id"] for m in await gateway.presence.members("lobby")] == ["u1"]
        await a.close()


async def test_subscribe_unsubscribe_and_authorization() -> None:
    async def only_public(principal: Any, channel: str) -> bool:
        return channel.startswith("public:")

    async with running(authorize_channel=only_public) as (server, gateway, bus, http):
        ws, ready = await identify(server, channels=["public:a", "secret"])
        assert ready["d"]["subscriptions"] == ["public:a"] and ready["d"]["denied"] == ["secret"]
        await recv(ws)  # presence
        await send(ws, {"op": 12, "d": {"channels": ["public:b", "secret2"]}})
        sub = await recv(ws)
        assert sub["t"] == "SUBSCRIBED" and sub["d"] == {"granted": ["public:b"], "denied": ["secret2"]}
        await recv(ws)  # presence in public:b
        await post(http, "secret", {"n": 0})
        await post(http, "public:b", {"n": 1})
        assert (await recv(ws))["d"] == {"n": 1}
        await send(ws, {"op": 13, "d": {"channels": ["public:b"]}})
        assert (await recv(ws))["d"] == {"channels": ["public:b"]}
        await post(http, "public:b", {"n": 2})
        await post(http, "public:a", {"n": 3})
        assert (await recv(ws))["d"] == {"n": 3}
        await ws.close()


async def test_origin_allow_list_rejects_cross_site_handshake() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async with running(allowed_origins=["https://app.example"]) as (server, gateway, bus, http):
        with pytest.raises(InvalidStatus) as info:
            await connect(server.ws_url(), origin="https://evil.example")  # type: ignore[arg-type]
        assert info.value.response.status_code == 403
        ws = await connect(server.ws_url(), origin="https://app.example")  # type: ignore[arg-type]
        assert (await recv(ws))["op"] == 10
        await ws.close()


async def test_drain_reconnect_then_resume_on_another_gateway() -> None:
    store = InMemorySessionStore()
    async with InMemoryBus() as bus:
        first = Gateway(bus, authenticator, session_store=store)
        await first.start()
        async with _serve(bus, first) as server1:
            async with httpx.AsyncClient(base_url=server1.base) as http:
                ws, ready = await identify(server1, channels=["room"])
                session_id = ready["d"]["session_id"]
                await recv(ws)  # presence
                for n in range(5):
                    await post(http, "room", {"n": n})
                frames = [await recv(ws) for _ in range(5)]
                last_seq = frames[2]["s"]  # pretend the client only processed 3 of 5
                await first.drain()
                tail = await expect_close(ws, 1012)
                assert tail[-1] == {"op": 7, "d": None, "s": None, "t": None}
                assert len(store) == 1
                # published after the drain, before the client reaches the other node
                for n in range(5, 8):
                    await post(http, "room", {"n": n})
        await first.close()
        second = Gateway(bus, authenticator, session_store=store)
        async with second:
            async with _serve(bus, second) as server2:
                async with httpx.AsyncClient(base_url=server2.base) as http:
                    ws2, _ = await _connect_hello(server2)
                    await send(
                        ws2, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": last_seq}}
                    )
                    got = [await recv(ws2)]
                    while got[-1].get("t") != "RESUMED":
                        got.append(await recv(ws2))
                    replay = got[:-1]
                    assert [f["d"]["n"] for f in replay] == [3, 4, 5, 6, 7]
                    assert [f["s"] for f in replay] == list(range(last_seq + 1, last_seq + 6))
                    assert got[-1]["d"]["replayed"] == 5
                    await post(http, "room", {"n": 8})
                    live = await recv(ws2)
                    while live.get("t") != "MESSAGE_CREATE":
                        live = await recv(ws2)
                    assert live["d"] == {"n": 8}
                    assert live["s"] > got[-1]["s"]
                    await ws2.close()
        assert len(store) == 0  # a session is resumed at most once


async def test_resume_while_the_old_socket_is_still_open_supersedes_it() -> None:
    async with running() as (server, gateway, bus, http):
        old, ready = await identify(server, channels=["room"])
        session_id = ready["d"]["session_id"]
        await recv(old)  # presence online
        await post(http, "room", {"n": 1})
        first = await recv(old)
        ws, _ = await _connect_hello(server)
        await send(ws, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": first["s"]}})
        got = [await recv(ws)]
        while got[-1].get("t") != "RESUMED":
            got.append(await recv(ws))
        await expect_close(old, 4000)
        await post(http, "room", {"n": 2})
        live = await recv(ws)
        while live.get("t") != "MESSAGE_CREATE":
            live = await recv(ws)
        assert live["d"] == {"n": 2}
        assert [m["id"] for m in await gateway.presence.members("room")] == ["u1"]
        assert gateway.session_ids() == [session_id]
        await ws.close()
        await wait_until(lambda: not gateway.session_ids())
        assert await gateway.presence.members("room") == []


async def _messages(ws: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` MESSAGE_CREATE dispatches (skipping presence and other frames)."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = await recv(ws)
        if frame.get("t") == "MESSAGE_CREATE":
            got.append(frame)
    return got


async def test_crash_checkpoint_resume_on_another_node_and_the_zombie_is_closed() -> None:
    """No full record was ever saved (the first node "crashed": its socket is still open, it
    never drained or detached): a second node resumes the session from the checkpoint that the
    client's heartbeat acknowledgement produced, and the first node's next checkpoint write is
    refused, which closes its now stale socket 4000. On both the ASGI route and the fast path."""
    store = InMemorySessionStore()
    async with InMemoryBus() as bus:
        options: dict[str, Any] = {"session_store": store, "checkpoint_interval": 0.05}
        first = Gateway(bus, authenticator, node_id="node-a", **options)
        second = Gateway(bus, authenticator, node_id="node-b", **options)
        async with first, second, _serve(bus, first) as server1, _serve(bus, second) as server2:
            async with httpx.AsyncClient(base_url=server1.base) as http:
                old, ready = await identify(server1, channels=["room"])
                session_id = ready["d"]["session_id"]
                for n in range(3):
                    await post(http, "room", {"n": n})
                sent = await _messages(old, 3)
                acked, last_seq = sent[1]["s"], sent[2]["s"]  # it processed all 3, acknowledged 2
                await send(old, {"op": 1, "d": acked})
                assert (await recv(old))["op"] == 11

                def checkpointed() -> bool:
                    record = store._records.get(session_id)
                    return record is not None and record.checkpoint and record.seq == acked

                await wait_until(checkpointed)

                ws, _ = await _connect_hello(server2)
                await send(
                    ws, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": last_seq}}
                )
                got = [await recv(ws)]
                while got[-1].get("t") != "RESUMED":
                    got.append(await recv(ws))
                resent = [f for f in got if f.get("t") == "MESSAGE_CREATE"]
                # Everything after the acknowledged seq is sent again (the client dedupes by id).
                assert [f["d"] for f in resent] == [{"n": 2}]
                assert resent[0]["id"] == sent[2]["id"]
                assert [f["s"] for f in resent] == [last_seq + 1]
                assert got[-1]["d"]["duplicates_possible"] is True

                await post(http, "room", {"n": 3})
                (live,) = await _messages(ws, 1)
                assert live["d"] == {"n": 3} and live["s"] > got[-1]["s"]
                # The zombie still gets it from its own node, acknowledges it, and that
                # checkpoint write is refused: node-b owns the session now.
                (stale,) = await _messages(old, 1)
                await send(old, {"op": 1, "d": stale["s"]})
                await expect_close(old, 4000)
                assert first.session_ids() == []
                assert second.session_ids() == [session_id]
                await ws.close()


class FlakyHistoryBus(InMemoryBus):
    """An in-memory bus whose ``history`` fails with BusUnavailable while ``failing`` is set."""

    failing = False
    gate: anyio.Event | None = None  # while set, history waits for it (a slow history read)

    async def history(self, channel: str, since: Position, limit: int = 100) -> Sequence[Delivery]:
        if self.failing:
            raise BusUnavailable("history backend down")
        if self.gate is not None:
            await self.gate.wait()
        return await super().history(channel, since, limit)


async def _resume_frames(ws: Any, session_id: str, seq: int) -> list[dict[str, Any]]:
    await send(ws, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": seq}})
    got = [await recv(ws)]
    while got[-1].get("t") != "RESUMED":
        got.append(await recv(ws))
    return got


async def test_cross_node_resume_failing_on_the_bus_puts_the_session_back_without_a_gap() -> None:
    """A RESUME on another node whose bus history raises BusUnavailable closes 4000 (RESUME
    again), leaves no session hosted there and puts the record back: the retry replays every
    missed event, including those published while the first attempt failed."""
    store = InMemorySessionStore()
    async with FlakyHistoryBus() as bus:
        first = Gateway(bus, authenticator, session_store=store, node_id="node-a")
        second = Gateway(bus, authenticator, session_store=store, node_id="node-b")
        async with first, second, _serve(bus, first) as server1, _serve(bus, second) as server2:
            async with httpx.AsyncClient(base_url=server1.base) as http:
                ws, ready = await identify(server1, channels=["room"])
                session_id = ready["d"]["session_id"]
                await post(http, "room", {"n": 0})
                (seen,) = await _messages(ws, 1)
                ws.transport.abort()
                await wait_until(lambda: first.connection_count == 0 and len(store) == 1)
                await post(http, "room", {"n": 1})  # missed: only in bus history for node-b

                bus.failing = True
                ws2, _ = await _connect_hello(server2)
                await send(
                    ws2, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": seen["s"]}}
                )
                await expect_close(ws2, 4000)
                await wait_until(lambda: second.connection_count == 0)
                assert second.session_ids() == []
                assert len(store) == 1 and store._records[session_id].owner == "node-b"
                await post(http, "room", {"n": 2})  # published while nobody hosts the session

                bus.failing = False
                ws3, _ = await _connect_hello(server2)
                got = await _resume_frames(ws3, session_id, seen["s"])
                replay = [f for f in got if f.get("t") == "MESSAGE_CREATE"]
                assert [f["d"]["n"] for f in replay] == [1, 2]
                assert [f["s"] for f in replay] == [seen["s"] + 1, seen["s"] + 2]
                assert second.session_ids() == [session_id]
                await ws3.close()


async def test_too_many_live_events_during_a_cross_node_catch_up_close_4010_resumable() -> None:
    """Live events held while another node reads history overflow the hold (send_queue_frames):
    4010, and, as 4010 promises, the session is resumable: nothing stays hosted on the closed
    connection, the record is back in the store, and the next RESUME is answered from it (here
    more events were missed than a replay may hold, so INVALID_SESSION, never a silent gap)."""
    store = InMemorySessionStore()
    async with FlakyHistoryBus() as bus:
        options: dict[str, Any] = {"session_store": store, "send_queue_frames": 4}
        first = Gateway(bus, authenticator, node_id="node-a", **options)
        second = Gateway(bus, authenticator, node_id="node-b", **options)
        async with first, second, _serve(bus, first) as server1, _serve(bus, second) as server2:
            async with httpx.AsyncClient(base_url=server1.base) as http:
                ws, ready = await identify(server1, channels=["room"])
                session_id = ready["d"]["session_id"]
                ws.transport.abort()
                await wait_until(lambda: first.connection_count == 0 and len(store) == 1)

                bus.gate = gate = anyio.Event()
                ws2, _ = await _connect_hello(server2)
                await send(ws2, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": 1}})
                await wait_until(lambda: "room" in second._hub.routes)
                for n in range(5):  # one more than the hold admits
                    await post(http, "room", {"n": n})
                await expect_close(ws2, 4010)
                gate.set()
                bus.gate = None
                await wait_until(lambda: second.connection_count == 0)
                assert second.session_ids() == []
                await wait_until(lambda: len(store) == 1)

                ws3, _ = await _connect_hello(server2)
                await send(ws3, {"op": 6, "d": {"token": "token-1", "session_id": session_id, "seq": 1}})
                assert await recv(ws3) == {"op": 9, "d": False, "s": None, "t": None}
                await ws3.close()
