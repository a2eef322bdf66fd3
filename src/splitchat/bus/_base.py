"""The fan-out bus contract that every backend implements.

A :class:`Bus` moves opaque ``bytes`` payloads from publishers to subscribers by *channel*.
It is the one piece of splitchat that knows about other processes; everything above it
(command endpoint, gateway, resume) is written against this contract only.

The guarantees a backend must give (the conformance kit in :mod:`splitchat.testing` checks them):

* ``publish`` returns only after the bus has *accepted* the event: once it returns a
  :class:`Position`, the event will be delivered to every current subscriber of the channel
  (or a :class:`Gap` will tell that subscriber it was not). A publish that cannot be accepted
  raises :class:`BusUnavailable` and publishes nothing.
* Positions are per channel, strictly increasing in publish order, and carry an *epoch* that
  changes whenever the channel's stream is recreated (a restarted memory bus, a deleted Redis
  stream), so a stale position is detected rather than misread.
* A subscription yields each event of its channels once, in position order per channel.
  Deliveries are not copied per local subscriber, and a process holds one backend
  subscription however many local listeners it has.
* Nothing is silently lost. A subscriber that falls too far behind, or a backend that lost its
  connection and could not refill the hole from history, yields a :class:`Gap` for the channel.
* ``history`` (optional: ``supports_history``) returns the deliveries after a position, or
  raises :class:`HistoryGone` when they are no longer all available.
* Ephemeral events (typing indicators) are delivered live only: no position, no history.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import ClassVar, Self

import msgspec

__all__ = (
    "Bus",
    "BusError",
    "BusUnavailable",
    "Delivery",
    "Gap",
    "HistoryGone",
    "HistoryUnsupported",
    "Position",
    "Subscription",
)


class Position(msgspec.Struct, frozen=True):
    """Where an event stands in its channel: ``offset`` within the stream ``epoch``.

    Offsets start at 1 for the first event of an epoch; ``offset == 0`` means "before the first
    event". Offsets of different epochs are not comparable.
    """

    epoch: str
    offset: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """Parse the ``"epoch:offset"`` form produced by ``str(position)``."""
        epoch, sep, offset = text.rpartition(":")
        if not sep or not epoch or not offset.isdigit():
            raise ValueError(f"not a position: {text!r}")
        return cls(epoch, int(offset))


class Delivery(msgspec.Struct, frozen=True, gc=False):
    """One event as a subscriber receives it. ``position`` is ``None`` for ephemeral events."""

    channel: str
    position: Position | None
    payload: bytes


class Gap(msgspec.Struct, frozen=True, gc=False):
    """Deliveries of ``channel`` after ``after`` were lost for this subscription.

    The next delivery of the channel is live again. A consumer that promised its own clients a
    gap-free stream must resynchronise them (the gateway sends INVALID_SESSION).
    ``after`` is ``None`` when the subscriber had not yet received anything of the channel.
    """

    channel: str
    after: Position | None
    reason: str = ""


class BusError(Exception):
    """Base class of bus errors."""


class BusUnavailable(BusError):
    """The bus cannot accept the operation now (not started, closed, or backend unreachable).

    Nothing was published; the operation is safe to retry.
    """


class HistoryGone(BusError):
    """The requested history is no longer (or never was) available: trimmed, or another epoch."""


class HistoryUnsupported(HistoryGone):
    """This bus keeps no history at all."""


class Subscription(abc.ABC):
    """A live, growable set of channels and the async iterator of their deliveries.

    Use it as ``async with bus.subscribe(["a"]) as sub: async for item in sub: ...``.
    Items are :class:`Delivery` or :class:`Gap`. Iteration ends when the subscription or the bus
    is closed.
    """

    @property
    @abc.abstractmethod
    def channels(self) -> frozenset[str]:
        """The channels currently subscribed."""

    @abc.abstractmethod
    async def add(self, channels: Iterable[str]) -> None:
        """Subscribe to more channels; events published after this returns will be delivered."""

    @abc.abstractmethod
    async def remove(self, channels: Iterable[str]) -> None:
        """Stop delivering these channels (undelivered events of them are discarded)."""

    @abc.abstractmethod
    async def receive(self) -> Delivery | Gap:
        """Wait for the next item; raises ``StopAsyncIteration`` once closed."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Unsubscribe from everything and end iteration. Idempotent."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delivery | Gap:
        return await self.receive()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Bus(abc.ABC):
    """Publish / subscribe / history across every process of an application.

    Lifecycle: ``async with bus:`` or ``await bus.start()`` ... ``await bus.close()``; the
    Starlette helpers tie it to the host app's lifespan.
    """

    #: Whether :meth:`history` and :meth:`current_position` are implemented.
    supports_history: ClassVar[bool] = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to the backend. Must be called (or ``async with``) before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close subscriptions and connections. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def publish(self, channel: str, payload: bytes) -> Position:
        """Publish and return the event's position once the bus has accepted it.

        Raises :class:`BusUnavailable` if the event could not be accepted (nothing published).
        """

    @abc.abstractmethod
    async def publish_ephemeral(self, channel: str, payload: bytes) -> None:
        """Deliver to current subscribers only: no position, no history, may be dropped under load."""

    @abc.abstractmethod
    def subscribe(self, channels: Iterable[str] = ()) -> Subscription:
        """Return a new subscription to ``channels`` (it can grow and shrink later)."""

    async def history(self, channel: str, since: Position, limit: int = 100) -> Sequence[Delivery]:
        """Return up to ``limit`` deliveries with positions after ``since``, oldest first.

        Raises :class:`HistoryGone` when ``since`` belongs to another epoch or some deliveries
        after it were trimmed, and :class:`HistoryUnsupported` on a bus without history.
        """
        raise HistoryUnsupported(f"{type(self).__name__} keeps no history")

    async def current_position(self, channel: str) -> Position:
        """The position of the newest event of ``channel`` (offset 0 if none yet).

        Raises :class:`HistoryUnsupported` on a bus without history.
        """
        raise HistoryUnsupported(f"{type(self).__name__} keeps no history")
