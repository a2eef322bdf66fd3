from __future__ import annotations

import anyio
import pytest

from splitchat import BusUnavailable, Delivery, Gap, HistoryGone, InMemoryBus, Position, bus_from_url


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def receive(sub: object, timeout: float = 2.0) -> Delivery | Gap:
    with anyio.fail_after(timeout):
        return await sub.receive()  # type: ignore[attr-defined,no-any-return]


async def test_publish_returns_increasing_positions_and_delivers_in_order() -> None:
    async with InMemoryBus() as bus, bus.subscribe(["a"]) as sub:
        positions = [await bus.publish("a", f"m{i}".encode()) for i in range(5)]
        assert [p.offset for p in positions] == [1, 2, 3, 4, 5]
        assert len({p.epoch for p in positions}) == 1
        got = [await receive(sub) for _ in range(5)]
        assert [d.payload for d in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        assert [d.position for d in got] == positions


async def test_payload_is_not_copied_per_subscriber() -> None:
    payload = b"x" * 1000
    async with InMemoryBus() as bus, bus.subscribe(["a"]) as s1, bus.subscribe(["a"]) as s2:
        await bus.publish("a", payload)
        d1, d2 = await receive(s1), await receive(s2)
        assert isinstance(d1, Delivery) and isinstance(d2, Delivery)
        assert d1.payload is payload and d2.payload is payload


async def test_subscription_grows_and_shrinks_live() -> None:
    async with InMemoryBus() as bus, bus.subscribe() as sub:
        await bus.publish("a", b"before")  # not subscribed yet: never delivered
        await sub.add(["a", "b"])
        assert sub.channels == {"a", "b"}
        await bus.publish("a", b"a1")
        await bus.publish("b", b"b1")
        got = {(await receive(sub)).channel for _ in range(2)}
        assert got == {"a", "b"}
        await sub.remove(["a"])
        await bus.publish("a", b"a2")
        await bus.publish("b", b"b2")
        item = await receive(sub)
        assert isinstance(item, Delivery) and item.payload == b"b2"
        with anyio.move_on_after(0.05) as scope:
            await sub.receive()
        assert scope.cancelled_caught


async def test_history_after_position_and_trimmed_history_is_gone() -> None:
    async with InMemoryBus(history_size=3) as bus:
        start = await bus.current_position("c")
        assert start.offset == 0
        p = [await bus.publish("c", bytes([i])) for i in range(5)]
        got = await bus.history("c", p[2])
        assert [d.payload for d in got] == [b"\x03", b"\x04"]
        assert [d.payload for d in await bus.history("c", p[1], limit=1)] == [b"\x02"]
        assert await bus.history("c", p[4]) == []
        with pytest.raises(HistoryGone):
            await bus.history("c", p[0])  # offset 2 was trimmed
        with pytest.raises(HistoryGone):
            await bus.history("c", Position("other-epoch", 4))
        with pytest.raises(HistoryGone):
            await bus.history("c", Position(p[0].epoch, 99))
        assert await bus.current_position("c") == p[4]


async def test_history_expires_by_age() -> None:
    clock = FakeClock()
    async with InMemoryBus(history_ttl=10, clock=clock) as bus:
        p1 = await bus.publish("c", b"1")
        await bus.publish("c", b"2")
        clock.now += 11
        p3 = await bus.publish("c", b"3")
        with pytest.raises(HistoryGone):
            await bus.history("c", p1)
        assert await bus.history("c", Position(p3.epoch, 2)) == [Delivery("c", p3, b"3")]


async def test_restarted_bus_has_a_new_epoch() -> None:
    async with InMemoryBus() as a:
        pa = await a.publish("c", b"x")
    async with InMemoryBus() as b:
        pb = await b.publish("c", b"x")
        assert pa.epoch != pb.epoch
        with pytest.raises(HistoryGone):
            await b.history("c", pa)


async def test_slow_subscriber_gets_a_gap_not_unbounded_memory() -> None:
    async with InMemoryBus(history_size=10) as bus, bus.subscribe(["c"]) as slow:
        await bus.publish("c", b"first")
        assert isinstance(await receive(slow), Delivery)
        for i in range(50):
            await bus.publish("c", str(i).encode())
        gap = await receive(slow)
        assert isinstance(gap, Gap) and gap.channel == "c" and gap.after is not None
        assert gap.after.offset == 1
        last = await bus.publish("c", b"live")
        item = await receive(slow)
        assert isinstance(item, Delivery) and item.position == last


async def test_ephemeral_events_are_live_only() -> None:
    async with InMemoryBus() as bus, bus.subscribe(["c"]) as sub:
        await bus.publish_ephemeral("c", b"typing")
        item = await receive(sub)
        assert isinstance(item, Delivery) and item.position is None and item.payload == b"typing"
        assert (await bus.current_position("c")).offset == 0
        assert await bus.history("c", await bus.current_position("c")) == []


async def test_closing_bus_ends_iteration_and_rejects_publish() -> None:
    bus = InMemoryBus()
    await bus.start()
    sub = bus.subscribe(["c"])
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            with anyio.fail_after(2):
                async for _ in sub:
                    pass

        tg.start_soon(consume)
        await anyio.sleep(0.01)
        await bus.close()
    with pytest.raises(BusUnavailable):
        await bus.publish("c", b"x")


async def test_round_robin_between_busy_channels() -> None:
    async with InMemoryBus() as bus, bus.subscribe(["a", "b"]) as sub:
        for i in range(3):
            await bus.publish("a", b"a%d" % i)
        for i in range(3):
            await bus.publish("b", b"b%d" % i)
        got = [(await receive(sub)).channel for _ in range(6)]
        assert got[:2] in (["a", "b"], ["b", "a"])
        assert got.count("a") == 3 and got.count("b") == 3


def test_bus_from_url() -> None:
    bus = bus_from_url("memory://?history_size=7&history_ttl=3")
    assert isinstance(bus, InMemoryBus) and bus.history_size == 7 and bus.history_ttl == 3
    with pytest.raises(ValueError, match="unknown bus URL scheme"):
        bus_from_url("carrier-pigeon://x")


def test_position_text_round_trip() -> None:
    p = Position("ab:cd", 42)
    assert Position.parse(str(p)) == p
    with pytest.raises(ValueError):
        Position.parse("nope")


async def test_client_chosen_channel_names_do_not_accumulate_state() -> None:
    async with InMemoryBus() as bus:
        kept = await bus.publish("room:kept", b"x")
        sub = bus.subscribe()
        for i in range(500):
            junk = f"junk:{i}"
            assert await bus.current_position(junk) == Position(bus.epoch, 0)
            assert await bus.history(junk, Position(bus.epoch, 0)) == []
            with pytest.raises(HistoryGone):
                await bus.history(junk, Position(bus.epoch, 3))
            await bus.publish_ephemeral(junk, b"typing")
            await sub.add([junk])
            await bus.publish_ephemeral(junk, b"typing")
            await sub.remove([junk])
        other = bus.subscribe([f"junk:{i}" for i in range(100)])
        await other.aclose()
        # Only the channel that was published to remains (its offset counter must continue).
        assert set(bus._channels) == {"room:kept"}
        await sub.aclose()
        assert await bus.publish("room:kept", b"y") == Position(kept.epoch, kept.offset + 1)


async def test_published_channel_keeps_its_offsets_after_subscribers_leave() -> None:
    async with InMemoryBus(history_size=1) as bus:
        async with bus.subscribe(["room"]) as sub:
            first = await bus.publish("room", b"1")
            with anyio.fail_after(5):
                assert (await sub.receive()).payload == b"1"
        second = await bus.publish("room", b"2")
        assert second == Position(first.epoch, first.offset + 1)
        # An unknown channel's position is a valid starting point once it gets events.
        start = await bus.current_position("fresh")
        published = await bus.publish("fresh", b"a")
        assert [d.position for d in await bus.history("fresh", start)] == [published]
