"""The bus conformance kit: one pytest class that checks a :class:`~splitchat.bus.Bus` against its contract.

Usage (any bus implementation, in its own test suite)::

    from splitchat.testing import BusConformance

    class TestMyBus(BusConformance):
        @pytest.fixture
        async def bus(self):
            async with MyBus(...) as b:
                yield b

Every test method only uses the ``bus`` fixture, so the same methods can also be called
directly (``await BusConformance().test_per_channel_order(my_bus)``); that is how the kit's
own tests prove that a broken bus fails it. Every wait is bounded by :attr:`receive_timeout`
and a missing delivery fails with an ``AssertionError``, so a broken bus fails, never hangs.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest

from splitchat.bus import (
    Bus,
    BusUnavailable,
    Delivery,
    Gap,
    HistoryGone,
    HistoryUnsupported,
    Position,
    Subscription,
)

__all__ = ("BusConformance",)


class BusConformance:
    """Pytest mix-in: subclass it as ``TestXxx`` and provide an async ``bus`` fixture.

    The fixture yields a *started* bus and closes it afterwards (closing must be idempotent:
    one test closes the bus itself). Tune the class attributes for slow or bounded backends and
    implement :meth:`break_connection` if the backend can simulate a connection loss.
    """

    pytestmark: ClassVar[Any] = pytest.mark.anyio

    #: Seconds to wait for any single expected delivery before failing.
    receive_timeout: ClassVar[float] = 10.0
    #: Seconds of silence that prove "nothing more arrives" (duplicates, removed channels).
    quiet_period: ClassVar[float] = 0.3
    #: Upper bound of events the bus keeps per channel. Set it to enable the trimming check
    #: (the kit publishes more than this and expects ``HistoryGone`` for the oldest position).
    #: The other history checks need the bus to keep at least 10 events per channel.
    history_capacity: ClassVar[int | None] = None
    #: Whether the bus refills every event after :meth:`break_connection` (no ``Gap`` allowed).
    reconnect_loses_nothing: ClassVar[bool] = True
    #: Size of the large-payload check.
    large_payload_bytes: ClassVar[int] = 1 << 20

    # -- hooks -----------------------------------------------------------------------------

    async def break_connection(self, bus: Bus) -> None:
        """Drop the bus's backend connection(s) abruptly (optional; the check is skipped if absent)."""
        raise NotImplementedError

    def channel(self, tag: str) -> str:
        """A channel name unique to this test run (shared backends keep state between runs)."""
        return f"kit.{tag}.{uuid.uuid4().hex[:12]}"

    # -- helpers ---------------------------------------------------------------------------

    async def receive(self, sub: Subscription, what: str = "a delivery") -> Delivery | Gap:
        """Receive one item or fail with ``AssertionError`` after :attr:`receive_timeout`."""
        try:
            with anyio.fail_after(self.receive_timeout):
                return await sub.receive()
        except TimeoutError:
            raise AssertionError(f"bus did not deliver {what} within {self.receive_timeout}s") from None

    async def receive_deliveries(self, sub: Subscription, count: int) -> list[Delivery]:
        """Receive exactly ``count`` deliveries; a ``Gap`` fails the check."""
        got: list[Delivery] = []
        for i in range(count):
            item = await self.receive(sub, f"delivery {i + 1} of {count}")
            assert isinstance(item, Delivery), f"unexpected {item!r} while waiting for delivery {i + 1}"
            got.append(item)
        return got

    async def assert_quiet(self, sub: Subscription) -> None:
        """Fail if anything arrives within :attr:`quiet_period` (duplicates, stray channels)."""
        with anyio.move_on_after(self.quiet_period):
            item = await sub.receive()
            raise AssertionError(f"unexpected extra item {item!r}")

    async def expect_raises(
        self, error: type[BaseException], awaitable: Awaitable[object], what: str
    ) -> None:
        """Fail with ``AssertionError`` unless ``awaitable`` raises ``error`` (bounded in time)."""
        try:
            with anyio.fail_after(self.receive_timeout):
                result = await awaitable
        except error:
            return
        except TimeoutError:
            raise AssertionError(f"{what}: hung instead of raising {error.__name__}") from None
        raise AssertionError(f"{what}: expected {error.__name__}, got {result!r}")

    def _require_history(self, bus: Bus) -> None:
        if not bus.supports_history:
            pytest.skip(f"{type(bus).__name__} has supports_history = False")

    # -- publish and positions ---------------------------------------------------------------

    async def test_publish_returns_increasing_positions_with_stable_epoch(self, bus: Bus) -> None:
        ch = self.channel("pos")
        positions = [await bus.publish(ch, b"%d" % i) for i in range(20)]
        assert all(isinstance(p, Position) for p in positions)
        assert len({p.epoch for p in positions}) == 1, f"epoch changed while publishing: {positions}"
        offsets = [p.offset for p in positions]
        assert offsets == sorted(set(offsets)), f"offsets not strictly increasing: {offsets}"
        assert offsets[0] >= 1, "offset 0 means 'before the first event' and is never an event's"

    async def test_per_channel_order_equals_position_order(self, bus: Bus) -> None:
        a, b = self.channel("order-a"), self.channel("order-b")
        async with bus.subscribe([a, b]) as sub:
            published: dict[str, list[Position]] = {a: [], b: []}
            for i in range(30):
                ch = a if i % 3 else b
                published[ch].append(await bus.publish(ch, f"{ch}/{i}".encode()))
            got = await self.receive_deliveries(sub, 30)
            for ch in (a, b):
                mine = [d for d in got if d.channel == ch]
                assert [d.position for d in mine] == published[ch], f"channel {ch} out of position order"
            await self.assert_quiet(sub)

    async def test_every_subscriber_gets_each_event_once(self, bus: Bus) -> None:
        ch = self.channel("fanout")
        async with bus.subscribe([ch]) as s1, bus.subscribe([ch]) as s2, bus.subscribe([ch]) as s3:
            payloads = [f"e{i}".encode() for i in range(25)]
            for p in payloads:
                await bus.publish(ch, p)
            for sub in (s1, s2, s3):
                got = await self.receive_deliveries(sub, len(payloads))
                assert [d.payload for d in got] == payloads
            for sub in (s1, s2, s3):
                await self.assert_quiet(sub)

    async def test_large_payload_is_preserved(self, bus: Bus) -> None:
        ch = self.channel("large")
        payload = os.urandom(self.large_payload_bytes)
        async with bus.subscribe([ch]) as sub:
            position = await bus.publish(ch, payload)
            (got,) = await self.receive_deliveries(sub, 1)
            assert got.position == position
            assert len(got.payload) == len(payload) and got.payload == payload

    async def test_binary_payloads_are_preserved(self, bus: Bus) -> None:
        ch = self.channel("binary")
        payloads = [bytes(range(256)), b"\x00", b"\x00\x00nul\x00", b"", b"\xff\xfe\r\n\t", "é☃".encode()]
        async with bus.subscribe([ch]) as sub:
            for p in payloads:
                await bus.publish(ch, p)
            got = await self.receive_deliveries(sub, len(payloads))
            assert [bytes(d.payload) for d in got] == payloads

    async def test_unusual_channel_names(self, bus: Bus) -> None:
        suffix = uuid.uuid4().hex[:8]
        names = [
            f"a.b.{suffix}",
            f"*{suffix}",
            f">{suffix}",
            f"sp ace {suffix}",
            f"ünï/{suffix}:1",
            f"{suffix}",
        ]
        async with bus.subscribe(names) as sub:
            for name in names:
                await bus.publish(name, name.encode())
            got = await self.receive_deliveries(sub, len(names))
            assert sorted((d.channel, d.payload) for d in got) == sorted((n, n.encode()) for n in names)
            assert all(d.payload == d.channel.encode() for d in got), "channels were mixed up"
            await self.assert_quiet(sub)

    # -- subscriptions -----------------------------------------------------------------------

    async def test_channels_are_added_and_removed_live(self, bus: Bus) -> None:
        a, b = self.channel("live-a"), self.channel("live-b")
        async with bus.subscribe() as sub:
            await bus.publish(a, b"before-add")  # not subscribed yet: never delivered
            await sub.add([a, b])
            assert sub.channels == {a, b}
            await bus.publish(a, b"a1")
            await bus.publish(b, b"b1")
            got = await self.receive_deliveries(sub, 2)
            assert sorted(d.payload for d in got) == [b"a1", b"b1"]
            await sub.remove([a])
            assert sub.channels == {b}
            await bus.publish(a, b"a2")
            await bus.publish(b, b"b2")
            (item,) = await self.receive_deliveries(sub, 1)
            assert (item.channel, item.payload) == (b, b"b2")
            await self.assert_quiet(sub)

    async def test_events_published_after_add_returns_are_delivered(self, bus: Bus) -> None:
        async with bus.subscribe() as sub:
            for i in range(15):
                ch = self.channel(f"race{i}")
                await sub.add([ch])
                position = await bus.publish(ch, b"first")
                (got,) = await self.receive_deliveries(sub, 1)
                assert (got.channel, got.position, got.payload) == (ch, position, b"first")

    async def test_concurrent_publishers(self, bus: Bus) -> None:
        ch, other = self.channel("conc"), self.channel("conc-other")
        publishers, per_publisher = 8, 10
        total = publishers * per_publisher
        positions: list[Position] = []
        got: list[Delivery] = []

        async def publisher(n: int) -> None:
            for i in range(per_publisher):
                positions.append(await bus.publish(ch, f"{n}:{i}".encode()))
                await bus.publish(other, b"x")
                await anyio.lowlevel.checkpoint()  # let the others (and the reader) interleave

        failures: list[AssertionError] = []

        async def consumer(sub: Subscription) -> None:
            try:
                got.extend(await self.receive_deliveries(sub, total))
            except AssertionError as exc:  # re-raised below, outside the task group
                failures.append(exc)

        async with bus.subscribe([ch]) as sub:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer, sub)
                for n in range(publishers):
                    tg.start_soon(publisher, n)
            if failures:
                raise failures[0]
            offsets = sorted(p.offset for p in positions)
            assert len({p.epoch for p in positions}) == 1
            assert offsets == list(range(offsets[0], offsets[0] + total)), "positions not unique+contiguous"
            assert [d.position for d in got] == sorted(positions, key=lambda p: p.offset)
            # each publisher's own events stay in its publish order
            for n in range(publishers):
                mine = [d.payload for d in got if d.payload.startswith(b"%d:" % n)]
                assert mine == [f"{n}:{i}".encode() for i in range(per_publisher)]
            await self.assert_quiet(sub)

    async def test_closing_a_subscription_ends_iteration(self, bus: Bus) -> None:
        ch = self.channel("close-sub")
        sub = bus.subscribe([ch])
        async with sub:
            await bus.publish(ch, b"x")
            await self.receive_deliveries(sub, 1)
        await self.expect_raises(StopAsyncIteration, sub.receive(), "receive on a closed subscription")
        with anyio.fail_after(self.receive_timeout):
            items = [item async for item in sub]
        assert items == []
        await sub.aclose()  # idempotent

    async def test_closing_the_bus_ends_iteration_and_publish(self, bus: Bus) -> None:
        ch = self.channel("close-bus")
        async with bus.subscribe([ch]) as sub:
            done, first = anyio.Event(), anyio.Event()
            seen: list[Delivery | Gap] = []

            async def consume() -> None:
                async for item in sub:
                    seen.append(item)
                    first.set()
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await bus.publish(ch, b"last")
                with anyio.move_on_after(self.receive_timeout):
                    await first.wait()
                await bus.close()
                with anyio.move_on_after(self.receive_timeout):
                    await done.wait()
                tg.cancel_scope.cancel()
        assert done.is_set(), "closing the bus did not end the subscription's iteration"
        assert [getattr(item, "payload", None) for item in seen] == [b"last"]
        await self.expect_raises(BusUnavailable, bus.publish(ch, b"after close"), "publish on a closed bus")
        await self.expect_raises(
            BusUnavailable, bus.publish_ephemeral(ch, b"after close"), "publish_ephemeral on a closed bus"
        )
        await bus.close()  # idempotent

    # -- history -----------------------------------------------------------------------------

    async def test_history_after_a_position_with_limit(self, bus: Bus) -> None:
        self._require_history(bus)
        ch = self.channel("hist")
        start = await bus.current_position(ch)
        assert start.offset == 0
        positions = [await bus.publish(ch, b"h%d" % i) for i in range(10)]
        everything = await bus.history(ch, start)
        assert [d.position for d in everything] == positions
        assert [d.payload for d in everything] == [b"h%d" % i for i in range(10)]
        assert all(d.channel == ch for d in everything)
        after3 = await bus.history(ch, positions[2], limit=4)
        assert [d.position for d in after3] == positions[3:7]
        assert await bus.history(ch, positions[-1]) == []
        assert await bus.history(ch, positions[0], limit=0) == []

    async def test_history_of_another_epoch_or_the_future_is_gone(self, bus: Bus) -> None:
        self._require_history(bus)
        ch = self.channel("gone")
        last = await bus.publish(ch, b"x")
        foreign = Position("not-an-epoch-" + uuid.uuid4().hex[:6], last.offset)
        await self.expect_raises(HistoryGone, bus.history(ch, foreign), "history of a foreign epoch")
        future = Position(last.epoch, last.offset + 5)
        await self.expect_raises(HistoryGone, bus.history(ch, future), "history after a future offset")

    async def test_trimmed_history_is_gone(self, bus: Bus) -> None:
        self._require_history(bus)
        if self.history_capacity is None:
            pytest.skip("set history_capacity to the bus's per-channel history bound to run this check")
        ch = self.channel("trim")
        start = await bus.current_position(ch)
        positions = [await bus.publish(ch, b"t%d" % i) for i in range(self.history_capacity + 5)]
        await self.expect_raises(HistoryGone, bus.history(ch, start), "history from before trimmed events")
        await self.expect_raises(HistoryGone, bus.history(ch, positions[0]), "history after a trimmed event")
        # the newest events are still there
        assert [d.position for d in await bus.history(ch, positions[-3])] == positions[-2:]

    async def test_current_position(self, bus: Bus) -> None:
        self._require_history(bus)
        ch = self.channel("cur")
        empty = await bus.current_position(ch)
        assert empty.offset == 0
        p1 = await bus.publish(ch, b"1")
        p2 = await bus.publish(ch, b"2")
        assert await bus.current_position(ch) == p2
        assert [d.position for d in await bus.history(ch, empty)] == [p1, p2]

    async def test_history_unsupported_raises(self, bus: Bus) -> None:
        if bus.supports_history:
            pytest.skip("bus keeps history")
        history = bus.history(self.channel("nohist"), Position("e", 0))
        await self.expect_raises(HistoryUnsupported, history, "history on a bus without history")

    # -- ephemeral ---------------------------------------------------------------------------

    async def test_ephemeral_events_are_live_only(self, bus: Bus) -> None:
        ch = self.channel("eph")
        async with bus.subscribe([ch]) as sub:
            before = await bus.publish(ch, b"durable")
            (got,) = await self.receive_deliveries(sub, 1)
            assert got.payload == b"durable"
            await bus.publish_ephemeral(ch, b"typing\x00")
            (eph,) = await self.receive_deliveries(sub, 1)
            assert (eph.channel, eph.position, eph.payload) == (ch, None, b"typing\x00")
            await self.assert_quiet(sub)
        if bus.supports_history:
            assert await bus.current_position(ch) == before
            assert await bus.history(ch, before) == []

    # -- connection loss ---------------------------------------------------------------------

    async def test_reconnect_delivers_every_accepted_event_once(self, bus: Bus) -> None:
        if type(self).break_connection is BusConformance.break_connection:
            pytest.skip("no break_connection hook: this backend cannot simulate a connection loss")
        ch = self.channel("reconnect")
        async with bus.subscribe([ch]) as sub:
            accepted = [await bus.publish(ch, b"before%d" % i) for i in range(5)]
            await self.receive_deliveries(sub, 5)
            await self.break_connection(bus)
            with anyio.fail_after(self.receive_timeout * 3):
                i = 0
                while len(accepted) < 25:
                    try:
                        accepted.append(await bus.publish(ch, b"after%d" % i))
                        i += 1
                    except BusUnavailable:
                        await anyio.sleep(0.05)  # still reconnecting: not accepted, retry
            expected = set(accepted[5:])
            seen: Counter[Position] = Counter()
            gaps: list[Gap] = []
            while expected - set(seen) and not gaps:
                item = await self.receive(sub, f"the rest of {sorted(p.offset for p in expected)}")
                if isinstance(item, Gap):
                    gaps.append(item)
                else:
                    assert item.position is not None
                    seen[item.position] += 1
            if self.reconnect_loses_nothing:
                assert not gaps, f"a bus that refills after reconnect yielded {gaps}"
            assert all(n == 1 for n in seen.values()), f"duplicates after reconnect: {seen}"
            assert set(seen) <= set(accepted)
            if not gaps:
                assert set(seen) == expected
                await self.assert_quiet(sub)
