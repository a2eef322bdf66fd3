"""The embedded, single-process bus: the default, and the reference implementation.

Design: each channel keeps a bounded log (count and age). A subscription holds no queue at
all, only a *cursor* per channel into that log plus a small "ready" set of channels with
unread events, so a publish costs O(subscribers of the channel) set insertions and the payload
is never copied. A subscriber that falls behind the log's tail gets a :class:`Gap` and resumes
at the live end, so memory is bounded by the history limits, never by a slow reader.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import anyio

from ._base import Bus, BusUnavailable, Delivery, Gap, HistoryGone, Position, Subscription

__all__ = ("InMemoryBus",)


class _Channel:
    __slots__ = ("ephemeral", "ephemeral_seq", "epoch", "log", "offset", "subscribers", "times")

    def __init__(self, epoch: str, ephemeral_size: int) -> None:
        self.epoch = epoch
        self.offset = 0  # offset of the newest event
        self.log: deque[Delivery] = deque()
        self.times: deque[float] = deque()
        self.ephemeral: deque[Delivery] = deque(maxlen=ephemeral_size)
        self.ephemeral_seq = 0  # count of ephemeral events ever published
        self.subscribers: set[_MemorySubscription] = set()

    @property
    def first_offset(self) -> int:
        """Offset of the oldest retained event (``offset + 1`` when the log is empty)."""
        return self.offset - len(self.log) + 1


class InMemoryBus(Bus):
    """Single-process bus with bounded per-channel history.

    Args:
        history_size: events kept per channel for :meth:`history` and resume.
        history_ttl: seconds an event stays in history.
        ephemeral_buffer: ephemeral events buffered per channel for subscribers that are
            momentarily behind; older ones are dropped (they are never replayed anyway).
        clock: monotonic clock in seconds (tests pass a fake one).
    """

    supports_history = True

    def __init__(
        self,
        *,
        history_size: int = 2000,
        history_ttl: float = 600.0,
        ephemeral_buffer: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be >= 1")
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.ephemeral_buffer = ephemeral_buffer
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        self._subscriptions: set[_MemorySubscription] = set()
        # A new epoch per bus instance: positions from before a restart are detectably stale.
        self.epoch = secrets.token_hex(6)
        self._running = False

    def __repr__(self) -> str:
        return f"InMemoryBus(history_size={self.history_size}, history_ttl={self.history_ttl})"

    async def start(self) -> None:
        self._running = True

    async def close(self) -> None:
        self._running = False
        for sub in list(self._subscriptions):
            sub._close()

    def _channel(self, name: str) -> _Channel:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel(self.epoch, self.ephemeral_buffer)
        return ch

    def _release(self, name: str, ch: _Channel) -> None:
        """Forget ``ch`` if nothing about it needs remembering.

        Channel names are client-chosen (subscribe, history, ...), so an entry per name ever
        *seen* would grow without bound. A channel is dropped when it has no subscribers and was
        never published to. One that was published to is kept even when its log has been trimmed
        empty: its offset counter must continue, or a re-created channel would hand out offsets
        1, 2, ... again in the same epoch and two different events would share a position.
        """
        if not ch.subscribers and ch.offset == 0 and self._channels.get(name) is ch:
            del self._channels[name]

    def _trim(self, ch: _Channel) -> None:
        deadline = self._clock() - self.history_ttl
        log, times = ch.log, ch.times
        while len(log) > self.history_size or (times and times[0] < deadline):
            log.popleft()
            times.popleft()

    def _check_running(self) -> None:
        if not self._running:
            raise BusUnavailable("the bus is not running (use `async with bus:` or `await bus.start()`)")

    async def publish(self, channel: str, payload: bytes) -> Position:
        self._check_running()
        ch = self._channel(channel)
        ch.offset += 1
        position = Position(ch.epoch, ch.offset)
        ch.log.append(Delivery(channel, position, payload))
        ch.times.append(self._clock())
        self._trim(ch)
        for sub in ch.subscribers:
            sub._notify(channel)
        return position

    async def publish_ephemeral(self, channel: str, payload: bytes) -> None:
        self._check_running()
        ch = self._channels.get(channel)
        if ch is None:
            # Nobody subscribes to it and ephemeral events are never replayed: nothing to keep.
            return
        ch.ephemeral_seq += 1
        ch.ephemeral.append(Delivery(channel, None, payload))
        for sub in ch.subscribers:
            sub._notify(channel)

    def subscribe(self, channels: Iterable[str] = ()) -> Subscription:
        self._check_running()
        sub = _MemorySubscription(self)
        self._subscriptions.add(sub)
        sub._add_now(channels)
        return sub

    async def history(self, channel: str, since: Position, limit: int = 100) -> Sequence[Delivery]:
        ch = self._channels.get(channel)
        if ch is None:
            # Read-only: an unknown channel is an empty one at (epoch, 0); creating it here
            # would let any caller grow the bus's state with made-up channel names.
            if since == Position(self.epoch, 0):
                return []
            raise HistoryGone(f"position {since} is not in channel {channel!r}")
        self._trim(ch)
        if since.epoch != ch.epoch:
            raise HistoryGone(f"position {since} is from another epoch than {ch.epoch}")
        if since.offset > ch.offset or since.offset < 0:
            raise HistoryGone(f"position {since} is not in channel {channel!r}")
        if since.offset + 1 < ch.first_offset:
            raise HistoryGone(f"history of {channel!r} after {since} was trimmed")
        start = since.offset + 1 - ch.first_offset
        stop = min(len(ch.log), start + max(limit, 0))
        return [ch.log[i] for i in range(start, stop)]

    async def current_position(self, channel: str) -> Position:
        ch = self._channels.get(channel)
        if ch is None:
            return Position(self.epoch, 0)  # read-only: see history()
        return Position(ch.epoch, ch.offset)


class _MemorySubscription(Subscription):
    def __init__(self, bus: InMemoryBus) -> None:
        self._bus = bus
        self._cursors: dict[str, int] = {}  # channel -> offset of the last delivered event
        self._ephemeral_cursors: dict[str, int] = {}  # channel -> last delivered ephemeral seq
        self._ready: dict[str, None] = {}  # ordered set of channels that may have unread items
        self._wakeup = anyio.Event()
        self._closed = False

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._cursors)

    def _add_now(self, channels: Iterable[str]) -> None:
        for name in channels:
            if name in self._cursors:
                continue
            ch = self._bus._channel(name)
            self._cursors[name] = ch.offset
            self._ephemeral_cursors[name] = ch.ephemeral_seq
            ch.subscribers.add(self)

    async def add(self, channels: Iterable[str]) -> None:
        if self._closed:
            raise BusUnavailable("subscription is closed")
        self._add_now(channels)

    async def remove(self, channels: Iterable[str]) -> None:
        for name in channels:
            if self._cursors.pop(name, None) is None:
                continue
            self._ephemeral_cursors.pop(name, None)
            self._ready.pop(name, None)
            ch = self._bus._channels.get(name)
            if ch is not None:
                ch.subscribers.discard(self)
                self._bus._release(name, ch)

    def _notify(self, channel: str) -> None:
        self._ready[channel] = None
        self._wakeup.set()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in self._cursors:
            ch = self._bus._channels.get(name)
            if ch is not None:
                ch.subscribers.discard(self)
                self._bus._release(name, ch)
        self._cursors.clear()
        self._ephemeral_cursors.clear()
        self._ready.clear()
        self._bus._subscriptions.discard(self)
        self._wakeup.set()

    async def aclose(self) -> None:
        self._close()

    def _next_of(self, name: str) -> Delivery | Gap | None:
        ch = self._bus._channels[name]
        cursor = self._cursors[name]
        if cursor < ch.offset:
            first = ch.first_offset
            if cursor + 1 < first:
                # Fell behind the retained log: say so, then continue live.
                self._cursors[name] = ch.offset
                self._ephemeral_cursors[name] = ch.ephemeral_seq
                return Gap(name, Position(ch.epoch, cursor), "subscriber fell behind")
            self._cursors[name] = cursor + 1
            return ch.log[cursor + 1 - first]
        seen = self._ephemeral_cursors[name]
        if seen < ch.ephemeral_seq:
            # Ephemeral events older than the small buffer are dropped without a gap.
            seen = max(seen, ch.ephemeral_seq - len(ch.ephemeral))
            self._ephemeral_cursors[name] = seen + 1
            return ch.ephemeral[seen - (ch.ephemeral_seq - len(ch.ephemeral))]
        return None

    async def receive(self) -> Delivery | Gap:
        while True:
            while self._ready:
                name = next(iter(self._ready))
                del self._ready[name]
                item = self._next_of(name)
                if item is None:
                    continue
                # Round-robin between channels: a busy channel goes to the back of the line.
                self._ready[name] = None
                return item
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
