"""RedisBus against the real Redis on 127.0.0.1:6379 (conformance kit) and private servers (restarts)."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from splitchat import Bus, BusUnavailable, Delivery, Gap, HistoryGone, Position, bus_from_url
from splitchat.bus.redis import EMPTY_EPOCH, RedisBus
from splitchat.testing import BusConformance

from ._servers import PrivateServer, free_port, redis_server

pytestmark = pytest.mark.redis

SHARED = "redis://127.0.0.1:6379/0"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"splitchat-test:{uuid.uuid4().hex[:10]}:"
    yield value
    await _delete_prefix(SHARED, value)


class TestRedisBusConformance(BusConformance):
    # MAXLEN ~ 20 trims whole radix-tree nodes (100 entries by default): at most ~120 are kept.
    history_capacity = 200

    @pytest.fixture
    async def bus(self, prefix: str) -> AsyncIterator[Bus]:
        async with RedisBus(SHARED, prefix=prefix, maxlen=20) as b:
            yield b

    async def break_connection(self, bus: Bus) -> None:
        # Kill only this bus's reader connection on the shared server (others use it too).
        assert isinstance(bus, RedisBus) and bus._reader_id is not None
        admin = aioredis.Redis.from_url(SHARED)
        try:
            assert await admin.client_kill_filter(_id=str(bus._reader_id)) == 1
        finally:
            await admin.aclose()


class TestRedisBusExactTrimConformance(BusConformance):
    history_capacity = 12

    @pytest.fixture
    async def bus(self, prefix: str) -> AsyncIterator[Bus]:
        async with RedisBus(SHARED, prefix=prefix, maxlen=12, exact_trim=True) as b:
            yield b


# -- restarts of a private server ---------------------------------------------------------------


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[PrivateServer]:
    server = redis_server(tmp_path, persistent=False)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PrivateServer]:
    server = redis_server(tmp_path, persistent=True)
    server.start()
    yield server
    server.kill()


async def _publish_until_accepted(bus: Bus, channel: str, payloads: list[bytes]) -> list[Position]:
    """Publish each payload, retrying while the bus says BusUnavailable (bounded by the test timeout)."""
    accepted: list[Position] = []
    for payload in payloads:
        while True:
            try:
                accepted.append(await bus.publish(channel, payload))
                break
            except BusUnavailable:
                await anyio.sleep(0.05)
    return accepted


async def _receive(sub: object, timeout: float = 10.0) -> Delivery | Gap:
    with anyio.fail_after(timeout):
        return await sub.receive()  # type: ignore[attr-defined,no-any-return]


async def test_restart_with_persistence_loses_nothing(persistent_redis: PrivateServer) -> None:
    url = f"redis://127.0.0.1:{persistent_redis.port}/0"
    async with RedisBus(url, timeout=0.5, reconnect_delay=(0.05, 0.3)) as bus, bus.subscribe(["room"]) as sub:
        before = [await bus.publish("room", b"b%d" % i) for i in range(10)]
        got_before = [await _receive(sub) for _ in range(5)]  # 5 still unread when the server dies
        persistent_redis.kill()
        with anyio.fail_after(5):
            with pytest.raises(BusUnavailable, match="Redis"):
                await bus.publish("room", b"lost")
        persistent_redis.start()
        after = await _publish_until_accepted(bus, "room", [b"a%d" % i for i in range(10)])
        assert {p.epoch for p in before + after} == {before[0].epoch}, "AOF restart must keep the epoch"
        seen: Counter[Position] = Counter(d.position for d in got_before if isinstance(d, Delivery))
        while sum(seen.values()) < 20:
            item = await _receive(sub)
            assert isinstance(item, Delivery), f"no event may be lost with appendfsync always: {item}"
            assert item.position is not None
            seen[item.position] += 1
        assert set(seen) == set(before + after) and set(seen.values()) == {1}
        with anyio.move_on_after(0.3):
            extra = await sub.receive()
            raise AssertionError(f"duplicate after restart: {extra}")


async def test_restart_without_persistence_yields_a_gap(volatile_redis: PrivateServer) -> None:
    url = f"redis://127.0.0.1:{volatile_redis.port}/0"
    async with RedisBus(url, timeout=0.5, reconnect_delay=(0.05, 0.3)) as bus, bus.subscribe(["room"]) as sub:
        before = [await bus.publish("room", b"b%d" % i) for i in range(10)]
        for _ in range(3):
            await _receive(sub)
        volatile_redis.kill()
        volatile_redis.start()  # the stream and its epoch are gone
        after = await _publish_until_accepted(bus, "room", [b"a%d" % i for i in range(5)])
        assert after[0].epoch != before[0].epoch, "a recreated stream must get a new epoch"
        items: list[Delivery | Gap] = []
        while not any(isinstance(i, Delivery) and i.position == after[-1] for i in items):
            items.append(await _receive(sub))
        gaps = [i for i in items if isinstance(i, Gap)]
        assert len(gaps) == 1, f"lost events must be reported exactly once: {items}"
        assert gaps[0].after is not None and gaps[0].after.epoch == before[0].epoch
        new = [i.position for i in items if isinstance(i, Delivery) and i.position in after]
        assert new == after, "every event accepted after the restart is delivered once, in order"
        with pytest.raises(HistoryGone):
            await bus.history("room", before[-1])


async def test_publish_while_redis_is_down_raises_quickly() -> None:
    port = free_port()  # nothing listens here
    bus = RedisBus(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    with anyio.fail_after(5):
        with pytest.raises(BusUnavailable, match="unreachable"):
            await bus.start()
    with pytest.raises(BusUnavailable, match="not running"):
        await bus.publish("a", b"x")


async def test_slow_subscriber_gets_a_gap_then_continues_live(prefix: str) -> None:
    async with RedisBus(SHARED, prefix=prefix, buffer_size=5) as bus, bus.subscribe(["c"]) as sub:
        positions = [await bus.publish("c", b"%d" % i) for i in range(20)]
        # let the reader drain the stream into the (full) buffer
        with anyio.fail_after(10):
            while len(sub._buffer) < 5:  # type: ignore[attr-defined]  # noqa: ASYNC110 - no event to wait on
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        got = [await _receive(sub) for _ in range(6)]
        assert [d.position for d in got[:5] if isinstance(d, Delivery)] == positions[:5]
        assert got[5] == Gap("c", positions[4], "subscriber fell behind")
        live = await bus.publish("c", b"live")
        item = await _receive(sub)
        assert isinstance(item, Delivery) and item.position == live


async def test_history_ttl_expires_the_channel_and_changes_the_epoch(prefix: str) -> None:
    async with RedisBus(SHARED, prefix=prefix, history_ttl=0.2) as bus:
        old = await bus.publish("t", b"1")
        await anyio.sleep(0.5)
        with pytest.raises(HistoryGone):
            await bus.history("t", Position(old.epoch, 0))
        new = await bus.publish("t", b"2")
        assert new.epoch != old.epoch and new.offset == 1


async def test_deleted_stream_is_detected_by_a_subscribed_reader(prefix: str) -> None:
    async with RedisBus(SHARED, prefix=prefix, resync_interval=0.2) as bus, bus.subscribe(["d"]) as sub:
        first = [await bus.publish("d", b"%d" % i) for i in range(3)]
        for _ in range(3):
            await _receive(sub)
        admin = aioredis.Redis.from_url(SHARED)
        try:
            await admin.delete(bus.stream_key("d"))
        finally:
            await admin.aclose()
        again = await bus.publish("d", b"new")
        assert again.epoch != first[0].epoch and again.offset == 1
        gap = await _receive(sub)
        assert isinstance(gap, Gap) and gap.after == first[-1]
        item = await _receive(sub)
        assert isinstance(item, Delivery) and item.position == again


async def test_events_trimmed_while_the_reader_was_away_yield_a_gap(prefix: str) -> None:
    bus = RedisBus(SHARED, prefix=prefix, maxlen=5, exact_trim=True, reconnect_delay=(1.0, 1.0))
    async with bus, bus.subscribe(["t"]) as sub:
        first = await bus.publish("t", b"first")
        assert (await _receive(sub)) == Delivery("t", first, b"first")
        admin = aioredis.Redis.from_url(SHARED)
        try:
            assert await admin.client_kill_filter(_id=str(bus._reader_id)) == 1
        finally:
            await admin.aclose()
        # the reader waits >= 0.5 s before reconnecting; meanwhile 20 events, only 5 kept
        positions = [await bus.publish("t", b"%d" % i) for i in range(20)]
        gap = await _receive(sub)
        assert gap == Gap("t", first, "trimmed before it was read")
        rest = [await _receive(sub) for _ in range(5)]
        assert [d.position for d in rest if isinstance(d, Delivery)] == positions[-5:]


def test_bus_from_url_builds_a_redis_bus_with_query_options() -> None:
    bus = bus_from_url("redis://127.0.0.1:6379/0?maxlen=7&history_ttl=30&prefix=app:&exact_trim=1")
    assert isinstance(bus, RedisBus)
    assert (bus.maxlen, bus.history_ttl, bus.prefix, bus.exact_trim) == (7, 30.0, "app:", True)
    assert bus.url == "redis://127.0.0.1:6379/0"
    assert RedisBus.from_url("redis://127.0.0.1:6379/2?health_check_interval=5").url.endswith(
        "/2?health_check_interval=5"
    )


def test_missing_redis_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "splitchat.bus.redis", raising=False)
    with pytest.raises(RuntimeError, match=r"splitchat\[redis\]"):
        bus_from_url("redis://127.0.0.1:6379/0")


async def test_two_processes_share_channels_and_offsets(prefix: str) -> None:
    # Two bus instances stand for two processes: each subscriber sees every event of both,
    # in one order, with contiguous offsets from concurrent publishers.
    async with (
        RedisBus(SHARED, prefix=prefix) as a,
        RedisBus(SHARED, prefix=prefix) as b,
        a.subscribe(["x"]) as sub_a,
        b.subscribe(["x"]) as sub_b,
    ):
        positions: list[Position] = []

        async def publisher(bus: Bus, tag: bytes) -> None:
            for i in range(25):
                position = await bus.publish("x", tag + b"%d" % i)
                positions.append(position)

        async with anyio.create_task_group() as tg:
            for bus, tag in ((a, b"a"), (b, b"b"), (a, b"c"), (b, b"d")):
                tg.start_soon(publisher, bus, tag)
        assert sorted(p.offset for p in positions) == list(range(1, 101))
        got_a = [await _receive(sub_a) for _ in range(100)]
        got_b = [await _receive(sub_b) for _ in range(100)]
        assert got_a == got_b
        assert [d.position.offset for d in got_a if isinstance(d, Delivery) and d.position] == list(
            range(1, 101)
        )


async def test_reading_positions_of_unknown_channels_writes_nothing(prefix: str) -> None:
    async with RedisBus(SHARED, prefix=prefix) as bus:
        for i in range(50):
            assert await bus.current_position(f"junk:{i}") == Position(EMPTY_EPOCH, 0)
            assert await bus.history(f"junk:{i}", Position(EMPTY_EPOCH, 0)) == []
        client = aioredis.Redis.from_url(SHARED)
        try:
            assert [key async for key in client.scan_iter(match=f"{prefix}*")] == []
        finally:
            await client.aclose()
        # The empty position still works as a resume point once events arrive...
        start = await bus.current_position("room")
        published = [await bus.publish("room", b"%d" % i) for i in range(3)]
        assert [d.position for d in await bus.history("room", start)] == published
        # ...but not across a reset epoch (stream lost while the meta survived).
        client = aioredis.Redis.from_url(SHARED)
        try:
            await client.delete(bus.stream_key("room"))
        finally:
            await client.aclose()
        await bus.publish("room", b"after reset")
        with pytest.raises(HistoryGone):
            await bus.history("room", start)
