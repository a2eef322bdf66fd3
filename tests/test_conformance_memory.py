"""The in-memory bus passes the conformance kit (asyncio and trio), and the kit can fail."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import ClassVar

import pytest

from splitchat import Bus, BusUnavailable, Delivery, Gap, InMemoryBus, Position, Subscription
from splitchat.testing import BusConformance


class TestInMemoryBus(BusConformance):
    history_capacity = 50

    @pytest.fixture
    async def bus(self) -> AsyncIterator[Bus]:
        async with InMemoryBus(history_size=50) as b:
            yield b


# -- The kit can fail: toy buses with one deliberate flaw each ------------------------------------


class _FlawedSubscription(Subscription):
    """Wraps a correct subscription and damages its stream in one way."""

    def __init__(self, inner: Subscription, flaw: str) -> None:
        self._inner = inner
        self._flaw = flaw
        self._count = 0
        self._held: Delivery | Gap | None = None
        self._replay: list[Delivery | Gap] = []

    @property
    def channels(self) -> frozenset[str]:
        return self._inner.channels

    async def add(self, channels: Iterable[str]) -> None:
        await self._inner.add(channels)

    async def remove(self, channels: Iterable[str]) -> None:
        await self._inner.remove(channels)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def receive(self) -> Delivery | Gap:
        if self._replay:
            return self._replay.pop()
        item = await self._inner.receive()
        self._count += 1
        if self._flaw == "drop-every-10th" and self._count % 10 == 0:
            return await self._inner.receive()
        if self._flaw == "duplicate-every-7th" and self._count % 7 == 0:
            self._replay.append(item)
        if self._flaw == "swap-pairs" and self._count % 2 == 1:
            # hold the odd item back and return the next one first
            second = await self._inner.receive()
            self._count += 1
            self._replay.append(item)
            return second
        if self._flaw == "truncate-large" and isinstance(item, Delivery) and len(item.payload) > 4096:
            return Delivery(item.channel, item.position, item.payload[:4096])
        if self._flaw == "strip-nul" and isinstance(item, Delivery):
            return Delivery(item.channel, item.position, item.payload.replace(b"\x00", b""))
        return item


class _FlawedBus(Bus):
    """An in-memory bus with one deliberate contract violation."""

    supports_history = True

    def __init__(self, flaw: str) -> None:
        self.flaw = flaw
        self.inner = InMemoryBus(history_size=50)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        if self.flaw != "close-keeps-publishing":
            await self.inner.close()

    async def publish(self, channel: str, payload: bytes) -> Position:
        position = await self.inner.publish(channel, payload)
        if self.flaw == "positions-reused":
            return Position(position.epoch, 1)
        return position

    async def publish_ephemeral(self, channel: str, payload: bytes) -> None:
        if self.flaw == "ephemeral-in-history":
            await self.inner.publish(channel, payload)
        else:
            await self.inner.publish_ephemeral(channel, payload)

    def subscribe(self, channels: Iterable[str] = ()) -> Subscription:
        return _FlawedSubscription(self.inner.subscribe(channels), self.flaw)

    async def history(self, channel: str, since: Position, limit: int = 100) -> Sequence[Delivery]:
        if self.flaw == "history-ignores-epoch":
            since = Position((await self.inner.current_position(channel)).epoch, since.offset)
        if self.flaw == "history-ignores-trim":
            try:
                return await self.inner.history(channel, since, limit)
            except Exception:
                return []
        return await self.inner.history(channel, since, limit)

    async def current_position(self, channel: str) -> Position:
        return await self.inner.current_position(channel)


class _QuickKit(BusConformance):
    receive_timeout: ClassVar[float] = 0.5
    quiet_period: ClassVar[float] = 0.1
    history_capacity = 50


FLAWS_AND_THE_CHECKS_THAT_CATCH_THEM = [
    ("drop-every-10th", "test_every_subscriber_gets_each_event_once"),
    ("drop-every-10th", "test_concurrent_publishers"),
    ("duplicate-every-7th", "test_every_subscriber_gets_each_event_once"),
    ("swap-pairs", "test_per_channel_order_equals_position_order"),
    ("truncate-large", "test_large_payload_is_preserved"),
    ("strip-nul", "test_binary_payloads_are_preserved"),
    ("positions-reused", "test_publish_returns_increasing_positions_with_stable_epoch"),
    ("ephemeral-in-history", "test_ephemeral_events_are_live_only"),
    ("history-ignores-epoch", "test_history_of_another_epoch_or_the_future_is_gone"),
    ("history-ignores-trim", "test_trimmed_history_is_gone"),
    ("close-keeps-publishing", "test_closing_the_bus_ends_iteration_and_publish"),
]


@pytest.mark.parametrize(("flaw", "check"), FLAWS_AND_THE_CHECKS_THAT_CATCH_THEM)
async def test_the_kit_fails_a_flawed_bus(flaw: str, check: str) -> None:
    kit = _QuickKit()
    async with _FlawedBus(flaw) as bus:
        with pytest.raises(AssertionError):
            await getattr(kit, check)(bus)
        await bus.inner.close()


@pytest.mark.parametrize("check", sorted({check for _, check in FLAWS_AND_THE_CHECKS_THAT_CATCH_THEM}))
async def test_the_same_checks_pass_the_wrapper_without_a_flaw(check: str) -> None:
    # Proves the failures above come from the flaw, not from the wrapper.
    async with _FlawedBus("none") as bus:
        await getattr(_QuickKit(), check)(bus)


async def test_a_bus_that_never_delivers_fails_instead_of_hanging() -> None:
    class Silent(InMemoryBus):
        def subscribe(self, channels: Iterable[str] = ()) -> Subscription:
            return super().subscribe(())  # forgets the channels

    async with Silent() as bus:
        with pytest.raises(AssertionError, match="did not deliver"):
            await _QuickKit().test_every_subscriber_gets_each_event_once(bus)


async def test_publish_on_a_closed_memory_bus_raises() -> None:
    bus = InMemoryBus()
    with pytest.raises(BusUnavailable):
        await bus.publish("a", b"x")
