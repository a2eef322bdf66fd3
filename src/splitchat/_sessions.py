"""Where resumable sessions wait between connections: the :class:`SessionStore` seam.

A node keeps its own disconnected sessions live in memory (they keep collecting events in their
replay buffer), so a RESUME on the same node needs no store at all. The store is for the other
cases: when a node drains it saves every resumable session here, and a RESUME that reaches a
node which does not host the session takes it from here and rebuilds what happened since the
snapshot from ``bus.history(channel, since=positions[channel])``.

A :class:`SessionRecord` is a plain msgspec struct (buffer entries carry the raw event bytes),
so a Redis-backed store is ``SET key msgpack(record) PXAT expires`` / ``GETDEL key``.
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from ._auth import Principal
from ._frames import Dispatch
from ._protocol import SessionState
from .bus._base import Position

__all__ = ("BufferedDispatch", "InMemorySessionStore", "SessionRecord", "SessionStore")


class BufferedDispatch(msgspec.Struct, frozen=True, kw_only=True):
    """One replayable dispatch of a saved session, with its original sequence number."""

    seq: int
    t: str
    data: msgspec.Raw
    event_id: str | None = None
    channel: str | None = None
    nonce: str | None = None
    position: Position | None = None


class SessionRecord(msgspec.Struct, kw_only=True):
    """Everything a node needs to resume a session it does not host.

    ``seq`` is the last sequence number the session assigned, ``buffer_floor`` the highest seq
    no longer replayable, ``positions`` the last delivered bus position per channel and
    ``expires_at`` a wall-clock (``time.time()``) deadline, shared by all nodes.
    """

    session_id: str
    principal: Principal
    channels: list[str]
    seq: int
    buffer_floor: int
    positions: dict[str, Position]
    buffer: list[BufferedDispatch]
    expires_at: float

    @classmethod
    def from_state(cls, state: SessionState, expires_at: float) -> SessionRecord:
        """Snapshot a live session."""
        buffer = [
            BufferedDispatch(
                seq=seq,
                t=d.t,
                data=msgspec.Raw(d.data),
                event_id=d.event_id,
                channel=d.channel,
                nonce=d.nonce,
                position=d.position,
            )
            for seq, _, d in state.buffer
        ]
        return cls(
            session_id=state.session_id,
            principal=state.principal,
            channels=sorted(state.channels),
            seq=state.seq,
            buffer_floor=state.buffer_floor,
            positions=dict(state.positions),
            buffer=buffer,
            expires_at=expires_at,
        )

    def to_state(self, now: float) -> SessionState:
        """Rebuild the live session; buffered entries are timestamped ``now`` (a monotonic clock
        is not comparable across nodes; the record's own expiry already bounded their age)."""
        state = SessionState(self.session_id, self.principal)
        state.channels = set(self.channels)
        state.seq = self.seq
        state.buffer_floor = self.buffer_floor
        state.positions = dict(self.positions)
        for item in self.buffer:
            dispatch = Dispatch(
                item.t,
                bytes(item.data),
                event_id=item.event_id,
                channel=item.channel,
                nonce=item.nonce,
                position=item.position,
            )
            state.buffer.append((item.seq, now, dispatch))
            state.buffer_bytes += dispatch.approximate_size()
        return state


class SessionStore(abc.ABC):
    """Storage of resumable sessions shared by the gateway nodes."""

    @abc.abstractmethod
    async def save(self, record: SessionRecord) -> None:
        """Store (or replace) a session until ``record.expires_at``."""

    @abc.abstractmethod
    async def take(self, session_id: str) -> SessionRecord | None:
        """Remove and return a live record: a session is resumed at most once (``GETDEL``)."""

    @abc.abstractmethod
    async def discard(self, session_id: str) -> None:
        """Forget a session (it ended or was resumed elsewhere)."""


class InMemorySessionStore(SessionStore):
    """Process-local store, bounded by ``max_sessions`` (oldest evicted first).

    Shared between :class:`~splitchat.Gateway` instances of one process it simulates a shared
    store (tests, single-process blue/green restarts).
    """

    def __init__(self, *, max_sessions: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.max_sessions = max_sessions
        self._clock = clock
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    async def save(self, record: SessionRecord) -> None:
        self._records.pop(record.session_id, None)
        self._records[record.session_id] = record
        while len(self._records) > self.max_sessions:
            self._records.popitem(last=False)

    async def take(self, session_id: str) -> SessionRecord | None:
        record = self._records.pop(session_id, None)
        if record is None or record.expires_at <= self._clock():
            return None
        return record

    async def discard(self, session_id: str) -> None:
        self._records.pop(session_id, None)
