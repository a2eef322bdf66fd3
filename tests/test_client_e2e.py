"""The Python client against a real uvicorn server (endpoint + gateway), through a fault-injecting TCP proxy.

The server runs in a background thread (its own asyncio loop), so the client and the proxy run
on both anyio backends. The gateway goes through :class:`TcpProxy` (cut / stall / refuse); the
command endpoint is reached directly, so "gateway down, HTTP up" is a real situation here.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest

from splitchat.client import (
    AuthenticationFailed,
    CommandError,
    Dispatch,
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


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_ready_send_and_receive_own_event_with_receipt(encoding: Any) -> None:
    async with stack(heartbeat_interval=2.0) as (server, proxy):
        async with make_client(server, proxy, encoding=encoding) as client:
            ready = await client.receive(5)
            assert isinstance(ready, Ready) and ready.subscriptions == ("room:1",)
            receipt = await client.send("POST", "/channels/room:1/messages", {"content": "hi"}, nonce="n-1")
            assert receipt.status == 200 and receipt.nonce == "n-1" and receipt.attempts == 1
            assert receipt.event is not None and receipt.event.channel == "room:1"
            assert receipt.event.position is not None and receipt.event.position.offset == 1
            event = await next_dispatch(client)
            assert (event.t, event.id, event.nonce, event.d["content"]) == (
                "MESSAGE_CREATE",
                receipt.event.id,
                "n-1",
                "hi",
            )
            with pytest.raises(CommandError) as info:
                await client.send("POST", "/channels/room:1/messages", {"wrong": 1})
            assert (info.value.status, info.value.code) == (400, "invalid_body")


class Collector:
    """Reads a client's events in the background and checks the delivery guarantees as it goes."""

    def __init__(self, client: SplitchatClient) -> None:
        self.client = client
        self.items: list[Any] = []
        self.changed = anyio.Event()

    async def run(self) -> None:
        async for item in self.client.events():
            self.items.append(item)
            self.changed.set()
            self.changed = anyio.Event()

    def dispatches(self, t: str | None = None) -> list[Dispatch]:
        return [i for i in self.items if isinstance(i, Dispatch) and (t is None or i.t == t)]

    def of_type(self, kind: type) -> list[Any]:
        return [i for i in self.items if isinstance(i, kind)]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        try:
            with anyio.fail_after(timeout):
                while not predicate():
                    await self.changed.wait()
        except TimeoutError:
            kinds = [getattr(i, "t", type(i).__name__) for i in self.items]
            summary = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
            raise TimeoutError(f"condition not met; got {summary}; {self.client.stats}") from None

    def assert_exactly_once_in_order(self) -> None:
        ids = [d.id for d in self.dispatches() if d.id is not None]
        assert len(ids) == len(set(ids)), "an event reached the app twice"
        numbers = [d.d["n"] for d in self.dispatches("NUMBER")]
        assert numbers == sorted(numbers), "per-channel order broken"


async def test_sends_succeed_while_the_gateway_is_down_then_resume_delivers_them_once() -> None:
    async with stack(heartbeat_interval=2.0) as (server, proxy):
        async with make_client(server, proxy) as client, anyio.create_task_group() as tg:
            collector = Collector(client)
            tg.start_soon(collector.run)
            await collector.wait_for(lambda: collector.of_type(Ready))
            proxy.refuse = True
            assert proxy.cut() == 1
            nonces = []
            for i in range(5):
                receipt = await client.send("POST", "/channels/room:1/messages", {"content": f"offline {i}"})
                assert receipt.status == 200 and receipt.event is not None
                nonces.append(receipt.nonce)
            assert not client.connected
            proxy.refuse = False
            await collector.wait_for(lambda: len(collector.dispatches("MESSAGE_CREATE")) >= 5)
            await anyio.sleep(0.2)  # room for a duplicate to show up, if there were one
            got = [d.nonce for d in collector.dispatches("MESSAGE_CREATE")]
            assert got == nonces
            assert len(collector.of_type(Resumed)) == 1 and not collector.of_type(Resync)
            collector.assert_exactly_once_in_order()
            tg.cancel_scope.cancel()


async def test_500_events_with_two_socket_cuts_reach_the_app_exactly_once_in_order() -> None:
    total = 500
    async with stack(heartbeat_interval=2.0) as (server, proxy):
        async with make_client(server, proxy) as client, anyio.create_task_group() as tg:
            collector = Collector(client)
            tg.start_soon(collector.run)
            await collector.wait_for(lambda: collector.of_type(Ready))

            async def publish() -> None:
                for start in range(0, total, 10):
                    await client.send("POST", "/channels/room:1/burst", {"start": start, "count": 10})
                    await anyio.sleep(0.01)

            tg.start_soon(publish)
            outage_nonces: list[str] = []
            for cut_at in (150, 350):
                await collector.wait_for(lambda n=cut_at: len(collector.dispatches("NUMBER")) >= n)
                proxy.refuse = True
                assert proxy.cut() == 1
                for i in range(3):  # commands sent while the socket is down
                    receipt = await client.send("POST", "/channels/room:1/messages", {"content": f"cut {i}"})
                    outage_nonces.append(receipt.nonce)
                proxy.refuse = False
            await collector.wait_for(lambda: len(collector.dispatches("NUMBER")) >= total, timeout=30)
            await collector.wait_for(
                lambda: len(collector.dispatches("MESSAGE_CREATE")) >= len(outage_nonces)
            )
            await anyio.sleep(0.2)
            assert [d.d["n"] for d in collector.dispatches("NUMBER")] == list(range(total))
            assert [d.nonce for d in collector.dispatches("MESSAGE_CREATE")] == outage_nonces
            collector.assert_exactly_once_in_order()
            assert len(collector.of_type(Resumed)) == 2 and not collector.of_type(Resync)
            assert client.stats.resumes == 2 and client.stats.identifies == 1
            tg.cancel_scope.cancel()


async def test_zombie_connection_is_detected_by_heartbeat_and_resumed_transparently() -> None:
    interval = 0.5
    async with stack(heartbeat_interval=interval) as (server, proxy):
        async with make_client(server, proxy) as client, anyio.create_task_group() as tg:
            collector = Collector(client)
            tg.start_soon(collector.run)
            await collector.wait_for(lambda: collector.of_type(Ready))
            await client.send("POST", "/channels/room:1/burst", {"start": 0, "count": 10})
            await collector.wait_for(lambda: len(collector.dispatches("NUMBER")) >= 10)
            assert proxy.stall() == 1
            await client.send("POST", "/channels/room:1/burst", {"start": 10, "count": 10})
            # The replay comes first, then RESUMED.
            await collector.wait_for(
                lambda: len(collector.dispatches("NUMBER")) >= 20 and collector.of_type(Resumed)
            )
            # Detected by the missing HEARTBEAT_ACK (the stalled socket never closed by itself):
            # one zombie close, one new connection, resumed with nothing lost or repeated. How
            # fast is a benchmark matter; the 10 s wait above only bounds a hang.
            assert client.stats.zombie_closes == 1
            assert len(proxy.attempt_times) == 2
            assert [d.d["n"] for d in collector.dispatches("NUMBER")] == list(range(20))
            assert len(collector.of_type(Resumed)) == 1 and not collector.of_type(Resync)
            proxy.unstall()
            tg.cancel_scope.cancel()


async def test_expired_session_gives_invalid_session_then_resync_on_a_fresh_session() -> None:
    async with stack(heartbeat_interval=2.0, resume_window=0.3) as (server, proxy):
        async with make_client(server, proxy) as client, anyio.create_task_group() as tg:
            collector = Collector(client)
            tg.start_soon(collector.run)
            await collector.wait_for(lambda: collector.of_type(Ready))
            first_session = client.session_id
            proxy.refuse = True
            proxy.cut()
            await anyio.sleep(1.0)  # longer than the resume window: the server forgets the session
            proxy.refuse = False
            await collector.wait_for(lambda: collector.of_type(Resync))
            resync = collector.of_type(Resync)[0]
            assert resync.reason == "invalid_session" and resync.session_id != first_session
            assert resync.subscriptions == ("room:1",)
            assert client.session_id == resync.session_id
            receipt = await client.send("POST", "/channels/room:1/messages", {"content": "after resync"})
            await collector.wait_for(lambda: collector.dispatches("MESSAGE_CREATE"))
            assert collector.dispatches("MESSAGE_CREATE")[0].nonce == receipt.nonce
            assert not collector.of_type(Resumed)
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("fault", ["reconnect", "invalidate"])
async def test_forced_reconnect_resumes_and_forced_invalid_session_resyncs(fault: str) -> None:
    async with stack(heartbeat_interval=2.0) as (server, proxy):
        async with make_client(server, proxy) as client, anyio.create_task_group() as tg:
            collector = Collector(client)
            tg.start_soon(collector.run)
            await collector.wait_for(lambda: collector.of_type(Ready))
            await client.send("POST", "/channels/room:1/burst", {"start": 0, "count": 5})
            await collector.wait_for(lambda: len(collector.dispatches("NUMBER")) >= 5)
            http = client._http
            assert http is not None
            response = await http.post(f"{server.url}/test/faults/{fault}")
            assert response.json() == {"connections": 1}
            await collector.wait_for(lambda: collector.of_type(Resumed) or collector.of_type(Resync))
            await client.send("POST", "/channels/room:1/burst", {"start": 5, "count": 5})
            await collector.wait_for(lambda: len(collector.dispatches("NUMBER")) >= 10)
            assert [d.d["n"] for d in collector.dispatches("NUMBER")] == list(range(10))
            if fault == "reconnect":
                assert len(collector.of_type(Resumed)) == 1 and not collector.of_type(Resync)
            else:
                assert [r.reason for r in collector.of_type(Resync)] == ["invalid_session"]
                assert not collector.of_type(Resumed)
            tg.cancel_scope.cancel()


class _CeilingRng(random.Random):
    """Full jitter always drawing the top of its window: every delay is known in advance."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_reconnect_attempts_are_spaced_by_growing_delays() -> None:
    # The delay schedule itself (seeded jitter, min/max/cap) is unit-tested in
    # test_client_session.py; here only what needs a server: the client really waits between
    # attempts and the waits grow. With the ceiling rng the delays are 0.02 * 2**n capped at
    # 0.16: 0.02, 0.04, 0.08, 0.16, 0.16, 0.16, ... (hand-computed lower bounds, no upper ones).
    lower_bounds = [0.02, 0.04, 0.08, 0.16, 0.16, 0.16]
    async with TcpProxy("127.0.0.1", 9) as refusing:  # never forwards: every attempt is reset
        refusing.refuse = True
        client = SplitchatClient(
            "http://127.0.0.1:9",
            token=TOKEN,
            gateway_url=f"ws://127.0.0.1:{refusing.port}/gateway",
            reconnect_min_delay=0.02,
            reconnect_max_delay=0.16,
            rng=_CeilingRng(),
        )
        async with client:
            with anyio.fail_after(30):
                while len(refusing.attempt_times) < len(lower_bounds) + 1:  # noqa: ASYNC110 - proxy state
                    await anyio.sleep(0.01)
        times = list(refusing.attempt_times)[: len(lower_bounds) + 1]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for attempt, (gap, bound) in enumerate(zip(gaps, lower_bounds, strict=True)):
        # Clock granularity only. The bounds grow 8x, so a client that retried at a constant
        # (or no) delay fails here: spacing and growth in one check.
        assert gap >= bound - 0.005, (attempt, gap, bound)


async def test_rejected_token_ends_events_and_never_reconnects() -> None:
    async with stack(heartbeat_interval=2.0) as (server, proxy):
        client = SplitchatClient(
            server.url,
            token="wrong",
            gateway_url=f"ws://127.0.0.1:{proxy.port}/gateway",
            reconnect_min_delay=0.05,
        )
        async with client:
            with pytest.raises(AuthenticationFailed):
                async for _ in client.events():
                    pass
            await anyio.sleep(0.3)
            assert len(proxy.attempt_times) == 1 and client.stats.last_close_code == 4004


async def test_slow_app_gets_backpressure_not_an_unbounded_buffer() -> None:
    async with stack(heartbeat_interval=2.0) as (server, proxy):
        async with make_client(server, proxy, event_buffer=4) as client:
            assert isinstance(await client.receive(5), Ready)
            for start in range(0, 200, 50):
                await client.send("POST", "/channels/room:1/burst", {"start": start, "count": 50})
            # The app is busy: the reader must block on the full 4-item buffer, not keep reading
            # into memory. (Observed, not slept for: a reader that buffered elsewhere would never
            # be seen waiting on the stream, and the fail_after turns that into a failure.)
            with anyio.fail_after(10):
                while client._out_recv.statistics().tasks_waiting_send < 1:  # noqa: ASYNC110 - stream stats
                    await anyio.sleep(0.01)
            assert client._out_recv.statistics().current_buffer_used == 4
            assert client.stats.backpressure_waits >= 1
            numbers = []
            with anyio.fail_after(10):
                while len(numbers) < 200:
                    item = await next_dispatch(client)
                    numbers.append(item.d["n"])
            assert numbers == list(range(200))
            assert client.stats.backpressure_waits >= 1 and client.stats.zombie_closes == 0


async def test_leaving_the_client_ends_the_session_on_the_server() -> None:
    app, gateway, _faults = build_app(heartbeat_interval=2.0)
    async with threaded_server(app) as server:
        async with SplitchatClient(server.url, token=TOKEN, subscriptions=["room:1"]) as client:
            assert isinstance(await client.receive(5), Ready)
            assert gateway.session_ids() == [client.session_id]
        with anyio.fail_after(5):
            while gateway.session_ids():  # noqa: ASYNC110 - the gateway lives on another thread/loop
                await anyio.sleep(0.02)


async def test_cancellation_around_the_client_leaves_no_task_or_socket_behind() -> None:
    async with stack(heartbeat_interval=0.5) as (server, proxy):
        with anyio.move_on_after(1.0) as scope:
            async with make_client(server, proxy) as client:
                assert isinstance(await client.receive(5), Ready)
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        with anyio.fail_after(5):
            while proxy.open_connections:  # noqa: ASYNC110 - polling the proxy's own bookkeeping
                await anyio.sleep(0.02)
        attempts = len(proxy.attempt_times)
        await anyio.sleep(0.6)  # a leaked runner would reconnect (and heartbeat) by now
        assert len(proxy.attempt_times) == attempts == 1


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: every connection to it is refused, and no other
    process can take it meanwhile (unlike a port picked, closed and hoped to stay free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_dead_resume_url_is_tried_twice_then_the_configured_url_resumes_the_session() -> None:
    with closed_port() as port:
        dead = f"ws://127.0.0.1:{port}/gateway"
        async with stack(heartbeat_interval=2.0, resume_gateway_url=dead) as (server, proxy):
            async with make_client(server, proxy) as client, anyio.create_task_group() as tg:
                collector = Collector(client)
                tg.start_soon(collector.run)
                await collector.wait_for(lambda: collector.of_type(Ready))
                assert client._session.resume_url == dead
                await client.send("POST", "/channels/room:1/burst", {"start": 0, "count": 3})
                await collector.wait_for(lambda: len(collector.dispatches("NUMBER")) >= 3)
                assert proxy.cut() == 1
                await client.send("POST", "/channels/room:1/burst", {"start": 3, "count": 3})
                await collector.wait_for(lambda: collector.of_type(Resumed))
                await collector.wait_for(lambda: len(collector.dispatches("NUMBER")) >= 6)
                stats = client.stats
                # Two refused attempts on the resume URL, then the configured URL (the proxy):
                # the same session resumed there, the events missed meanwhile replayed once.
                assert (stats.connect_failures, stats.resume_url_fallbacks) == (2, 1)
                assert stats.last_connect_error is not None and stats.last_connect_error.startswith("OSError")
                assert len(proxy.attempt_times) == 2 and stats.connection_attempts == 4
                assert (stats.identifies, stats.resumes) == (1, 1)
                assert stats.last_close_code == 1006  # the cut, not overwritten by the refusals
                assert [d.d["n"] for d in collector.dispatches("NUMBER")] == list(range(6))
                assert not collector.of_type(Resync)
                collector.assert_exactly_once_in_order()
                tg.cancel_scope.cancel()


async def test_server_shutdown_close_code_survives_the_failed_reconnects() -> None:
    app, _gateway, _faults = build_app(heartbeat_interval=2.0)
    server = ThreadedServer(app)
    await anyio.to_thread.run_sync(server.start)
    try:
        client = SplitchatClient(
            server.url,
            token=TOKEN,
            subscriptions=["room:1"],
            reconnect_min_delay=0.02,
            reconnect_max_delay=0.05,
        )
        async with client:
            assert isinstance(await client.receive(5), Ready)
            await anyio.to_thread.run_sync(server.stop)
            with anyio.fail_after(10):
                while client.stats.connect_failures < 3:  # noqa: ASYNC110 - counters of the runner
                    await anyio.sleep(0.02)
            stats = client.stats
            assert stats.last_close_code == 1012  # the gateway's "restarting: resume" close
            assert stats.connections == 1 and stats.connection_attempts >= 4
            assert stats.last_connect_error is not None
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)


async def test_identify_after_a_refused_resume_on_the_same_connection_is_counted() -> None:
    async with stack(heartbeat_interval=2.0, resume_window=0.3) as (server, proxy):
        async with make_client(server, proxy) as client, anyio.create_task_group() as tg:
            collector = Collector(client)
            tg.start_soon(collector.run)
            await collector.wait_for(lambda: collector.of_type(Ready))
            proxy.refuse = True
            proxy.cut()
            await anyio.sleep(1.0)  # past the resume window: the RESUME will be refused
            proxy.refuse = False
            await collector.wait_for(lambda: collector.of_type(Resync))
            stats = client.stats
            # RESUME refused with INVALID_SESSION, then IDENTIFY on that same connection.
            assert (stats.identifies, stats.resumes) == (2, 1)
            assert stats.connections == 2
            tg.cancel_scope.cancel()
