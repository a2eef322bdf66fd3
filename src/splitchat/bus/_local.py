"""Local fan-out shared by the distributed buses (Redis, NATS).

A distributed bus holds ONE backend reader per process; that reader hands each event to the
:class:`LocalSubscription` objects of this process through :meth:`LocalSubscription.push`.
Each local subscription has a small bounded buffer. When it is full, events of the channel
are dropped and the channel is marked *gapped*; the subscriber then receives a
:class:`~splitchat.bus.Gap` (after what it did receive) before the channel's next delivery,
so a slow reader costs bounded memory and its loss is visible, never silent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol

import anyio

from ._base import BusUnavailable, Delivery, Gap, Position, Subscription

__all__ = ("LocalHub", "LocalSubscription")


class LocalHub(Protocol):
    """What a backend provides to its local subscriptions."""

    async def _attach(self, sub: LocalSubscription, channels: list[str]) -> None:
        """Start routing ``channels`` to ``sub``; events published after this returns must arrive."""

    def _detach(self, sub: LocalSubscription, channels: Iterable[str]) -> None:
        """Stop routing ``channels`` to ``sub``."""


class LocalSubscription(Subscription):
    """A subscription fed by a process-wide backend reader through a bounded buffer.

    ``floor`` records, per channel, the newest position that existed when the channel was
    attached: the reader may still be behind it, and those older events are not delivered to
    this subscription (it subscribed after they were published).
    """

    def __init__(self, hub: LocalHub, channels: Iterable[str], buffer_size: int) -> None:
        self._hub = hub
        self._buffer: deque[Delivery | Gap] = deque()
        self._buffer_size = buffer_size
        self._channels: set[str] = set()
        self._initial = list(dict.fromkeys(channels))
        self._started = False
        # channel -> position of the last event enqueued (None: nothing yet)
        self._last: dict[str, Position | None] = {}
        # channels whose events were dropped on overflow -> Gap.after to report
        self._gapped: dict[str, Position | None] = {}
        # channels whose latest item handed over or enqueued is a Gap: a further loss before
        # the next delivery is already covered by it (one Gap per hole, `after` = what the
        # subscriber really got last, never a position it did not see)
        self._gap_open: set[str] = set()
        self.floor: dict[str, Position | None] = {}
        self._wakeup = anyio.Event()
        self._closed = False

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels) | frozenset(self._initial)

    async def _ensure_started(self) -> None:
        # Attaching needs a backend round trip, so the channels given to ``subscribe()`` are
        # attached on ``async with`` / first ``receive``/``add`` rather than in the sync call.
        if not self._started:
            self._started = True
            initial, self._initial = self._initial, []
            if initial:
                await self._attach(initial)

    async def _attach(self, channels: list[str]) -> None:
        new = [c for c in dict.fromkeys(channels) if c not in self._channels]
        if not new:
            return
        self._channels.update(new)
        for name in new:
            self._last.setdefault(name, None)
        try:
            await self._hub._attach(self, new)
        except BaseException:
            self._channels.difference_update(new)
            raise

    async def __aenter__(self) -> LocalSubscription:
        await self._ensure_started()
        return self

    async def add(self, channels: Iterable[str]) -> None:
        if self._closed:
            raise BusUnavailable("subscription is closed")
        await self._ensure_started()
        await self._attach(list(channels))

    async def remove(self, channels: Iterable[str]) -> None:
        gone = {c for c in channels if c in self._channels or c in self._initial}
        if not gone:
            return
        self._initial = [c for c in self._initial if c not in gone]
        attached = gone & self._channels
        self._channels -= gone
        for name in gone:
            self._last.pop(name, None)
            self._gapped.pop(name, None)
            self._gap_open.discard(name)
            self.floor.pop(name, None)
        if attached:
            self._hub._detach(self, attached)
        if any(item.channel in gone for item in self._buffer):
            self._buffer = deque(item for item in self._buffer if item.channel not in gone)

    def close_now(self) -> None:
        """End iteration (called by the bus on close)."""
        if self._closed:
            return
        self._closed = True
        if self._channels:
            self._hub._detach(self, list(self._channels))
        self._channels.clear()
        self._initial = []
        self._buffer.clear()
        self._gapped.clear()
        self._gap_open.clear()
        self._wakeup.set()

    async def aclose(self) -> None:
        self.close_now()

    def wants(self, channel: str, position: Position) -> bool:
        """Whether an event at ``position`` is new to this subscription (see ``floor``)."""
        floor = self.floor.get(channel)
        return floor is None or floor.epoch != position.epoch or position.offset > floor.offset

    def push(self, delivery: Delivery) -> None:
        """Enqueue a durable delivery; on overflow drop it and remember a gap."""
        channel = delivery.channel
        if channel not in self._channels:
            return
        if channel in self._gapped:
            if len(self._buffer) >= self._buffer_size:
                return  # still full: keep dropping, the pending gap covers it
            # Room again: report the loss first, then continue live (may exceed by one).
            self._buffer.append(Gap(channel, self._gapped.pop(channel), "subscriber fell behind"))
        elif len(self._buffer) >= self._buffer_size:
            if channel not in self._gap_open:
                self._gapped[channel] = self._last.get(channel)
            return
        self._buffer.append(delivery)
        self._last[channel] = delivery.position
        self._gap_open.discard(channel)
        self._wakeup.set()

    def push_gap(self, gap: Gap) -> None:
        """Enqueue a gap detected by the backend (never dropped: it merges with a pending one)."""
        channel = gap.channel
        if channel not in self._channels or channel in self._gapped or channel in self._gap_open:
            return  # an earlier gap, pending or handed over, already covers this loss
        if len(self._buffer) >= self._buffer_size:
            self._gapped[channel] = self._last.get(channel)
            return
        self._buffer.append(Gap(channel, self._last.get(channel), gap.reason))
        self._gap_open.add(channel)
        self._wakeup.set()

    def push_ephemeral(self, delivery: Delivery) -> None:
        """Enqueue an ephemeral delivery; dropped without a gap when the buffer is full."""
        if delivery.channel in self._channels and len(self._buffer) < self._buffer_size:
            self._buffer.append(delivery)
            self._wakeup.set()

    async def receive(self) -> Delivery | Gap:
        await self._ensure_started()
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._gapped:
                channel = next(iter(self._gapped))
                self._gap_open.add(channel)
                return Gap(channel, self._gapped.pop(channel), "subscriber fell behind")
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
