"""Where resumable sessions wait between connections: the :class:`SessionStore` seam.

A node keeps its own disconnected sessions live in memory (they keep collecting events in their
replay buffer), so a RESUME on the same node needs no store at all. The store is for the other
cases: when a node drains it saves every resumable session here, and a RESUME that reaches a
node which does not host the session takes it from here and rebuilds what happened since the
snapshot from ``bus.history(channel, since=positions[channel])``.

A :class:`SessionRecord` is a plain msgspec struct (buffer entries carry the raw JSON of each ``d``),
so a Redis-backed store is ``SET key msgpack(record) PXAT expires`` / ``GETDEL key``
(``splitchat.redis.RedisSessionStore``).

Crash safety: a node also writes *checkpoints* of its attached sessions (``checkpoint=True``:
the seq the client acknowledged and the bus positions at that seq, no buffer), batched, so a
RESUME after the node died can rebuild the session from bus history. Every record names its
``owner`` (the node hosting the session); :meth:`SessionStore.claim` moves ownership, and a
store that tracks it refuses writes from a node that lost the session to another one, so a
zombie connection on the old node can never overwrite the live session's record.
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import msgspec

from ._auth import Principal
from ._frames import Dispatch
from ._session_state import SessionState
from .bus._base import Position

__all__ = ("BufferedDispatch", "InMemorySessionStore", "SessionRecord", "SessionStore")


class BufferedDispatch(msgspec.Struct, frozen=True, kw_only=True):
    """One replayable dispatch of a saved session, with its original sequence number."""

    seq: int
    t: str
    data: bytes  # the raw JSON of ``d`` (bytes, so msgpack and JSON stores both keep it verbatim)
    event_id: str | None = None
    channel: str | None = None
    nonce: str | None = None
    position: Position | None = None
    previous: Position | None = None  # the channel's position before this event (checkpoints)


class SessionRecord(msgspec.Struct, kw_only=True):
    """Everything a node needs to resume a session it does not host.

    ``seq`` is the last sequence number the session assigned, ``buffer_floor`` the highest seq
    no longer replayable, ``positions`` the last delivered bus position per channel and
    ``expires_at`` a wall-clock (``time.time()``) deadline, shared by all nodes.

    A *checkpoint* (``checkpoint=True``, written periodically while the session is connected)
    instead has ``seq`` = the seq the client acknowledged, ``positions`` at that seq and no
    buffer: see :meth:`GatewayConnection.resume_begin`'s ``from_checkpoint``. ``owner`` is the
    node that wrote the record.
    """

    session_id: str
    principal: Principal
    channels: list[str]
    seq: int
    buffer_floor: int
    positions: dict[str, Position]
    buffer: list[BufferedDispatch]
    expires_at: float
    owner: str = ""
    checkpoint: bool = False

    @classmethod
    def from_state(cls, state: SessionState, expires_at: float, owner: str = "") -> SessionRecord:
        """Snapshot a live session (complete: buffer included)."""
        buffer = [
            BufferedDispatch(
                seq=seq,
                t=d.t,
                data=d.data,
                event_id=d.event_id,
                channel=d.channel,
                nonce=d.nonce,
                position=d.position,
                previous=previous,
            )
            for seq, _, d, previous in state.buffer
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
            owner=owner,
        )

    @classmethod
    def checkpoint_of(cls, state: SessionState, expires_at: float, owner: str = "") -> SessionRecord:
        """The session's crash checkpoint: acknowledged seq and positions, no buffer (small)."""
        return cls(
            session_id=state.session_id,
            principal=state.principal,
            channels=sorted(state.channels),
            seq=state.acked_seq,
            buffer_floor=state.acked_seq,
            positions={c: p for c, p in state.acked_positions.items() if c in state.channels},
            buffer=[],
            expires_at=expires_at,
            owner=owner,
            checkpoint=True,
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
                item.data,
                event_id=item.event_id,
                channel=item.channel,
                nonce=item.nonce,
                position=item.position,
            )
            state.buffer.append((item.seq, now, dispatch, item.previous))
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

    async def claim(self, session_id: str, owner: str, expires_at: float) -> str | None:
        """Make ``owner`` the session's host until ``expires_at``; return the previous owner.

        From then on records of this session written by another owner are refused. The default
        tracks nothing and returns ``None`` (a store without ownership: fine for one node).
        """
        return None

    async def save_many(self, records: Sequence[SessionRecord]) -> list[bool]:
        """Save a batch (checkpoints); per record, ``False`` if refused because its ``owner`` lost
        the session to another node. The default saves one by one and refuses nothing."""
        for record in records:
            await self.save(record)
        return [True] * len(records)


class InMemorySessionStore(SessionStore):
    """Process-local store, bounded by ``max_sessions`` (oldest evicted first).

    Shared between :class:`~splitchat.Gateway` instances of one process it simulates a shared
    store (tests, single-process blue/green restarts).
    """

    def __init__(self, *, max_sessions: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.max_sessions = max_sessions
        self._clock = clock
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def _owned_by_other(self, record: SessionRecord) -> bool:
        held = self._owners.get(record.session_id)
        return held is not None and bool(record.owner) and held[0] != record.owner and held[1] > self._clock()

    async def claim(self, session_id: str, owner: str, expires_at: float) -> str | None:
        held = self._owners.pop(session_id, None)
        self._owners[session_id] = (owner, expires_at)
        while len(self._owners) > self.max_sessions:
            self._owners.popitem(last=False)
        return held[0] if held is not None and held[1] > self._clock() else None

    async def save_many(self, records: Sequence[SessionRecord]) -> list[bool]:
        results = []
        for record in records:
            refused = self._owned_by_other(record)
            if not refused:
                await self.save(record)
            results.append(not refused)
        return results

    async def save(self, record: SessionRecord) -> None:
        if self._owned_by_other(record):
            return  # a node that lost the session must not overwrite the new host's record
        if record.owner:
            self._owners.pop(record.session_id, None)
            self._owners[record.session_id] = (record.owner, record.expires_at)
            while len(self._owners) > self.max_sessions:
                self._owners.popitem(last=False)
        self._records.pop(record.session_id, None)
        self._records[record.session_id] = record
        # Records are kept in write order and all live for about one resume window, so the
        # expired ones sit at the front: drop them here (amortised O(1)), so that memory follows
        # the sessions of the last resume window, not max_sessions.
        now = self._clock()
        while self._records:
            oldest = next(iter(self._records.values()))
            if oldest.expires_at > now and len(self._records) <= self.max_sessions:
                break
            self._records.popitem(last=False)

    async def take(self, session_id: str) -> SessionRecord | None:
        record = self._records.pop(session_id, None)
        if record is None or record.expires_at <= self._clock():
            return None
        return record

    async def discard(self, session_id: str) -> None:
        self._records.pop(session_id, None)
        self._owners.pop(session_id, None)
