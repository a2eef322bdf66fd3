"""Discord-style snowflake ids: 64-bit, time-sortable, unique per worker.

Layout (most significant first): 42 bits of milliseconds since ``SPLITCHAT_EPOCH_MS``,
10 bits of worker id, 12 bits of per-millisecond sequence. Ids from different workers never
collide as long as each live process has its own worker id; ids sort by creation time.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

__all__ = ("SPLITCHAT_EPOCH_MS", "SnowflakeGenerator", "snowflake_time")

#: 2025-01-01T00:00:00Z, the zero of every splitchat snowflake.
SPLITCHAT_EPOCH_MS = 1_735_689_600_000

_WORKER_BITS = 10
_SEQUENCE_BITS = 12
_MAX_WORKER = (1 << _WORKER_BITS) - 1
_MAX_SEQUENCE = (1 << _SEQUENCE_BITS) - 1


class SnowflakeGenerator:
    """Generates unique, time-ordered 64-bit ids for one worker.

    Thread-safe. If the wall clock steps backwards the generator keeps using the last
    timestamp it issued (ids stay monotonic) rather than risk a duplicate.
    """

    def __init__(self, worker_id: int = 0, *, clock_ms: object = None) -> None:
        if not 0 <= worker_id <= _MAX_WORKER:
            raise ValueError(f"worker_id must be in 0..{_MAX_WORKER}, got {worker_id}")
        self.worker_id = worker_id
        self._clock_ms = clock_ms if callable(clock_ms) else None  # None: the wall clock, inlined
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequence = 0

    def next_id(self) -> int:
        """Return a new id, strictly greater than every id this generator returned before."""
        with self._lock:
            clock = self._clock_ms
            millis = time.time_ns() // 1_000_000 if clock is None else int(clock())
            now = max(millis - SPLITCHAT_EPOCH_MS, self._last_ms)
            if now == self._last_ms:
                self._sequence = (self._sequence + 1) & _MAX_SEQUENCE
                if self._sequence == 0:
                    # 4096 ids in one millisecond: borrow the next millisecond.
                    now += 1
            else:
                self._sequence = 0
            self._last_ms = now
            return (
                (now << (_WORKER_BITS + _SEQUENCE_BITS)) | (self.worker_id << _SEQUENCE_BITS) | self._sequence
            )

    def next_str(self) -> str:
        """Return :meth:`next_id` as a decimal string (JSON-safe for JavaScript clients)."""
        return str(self.next_id())


def snowflake_time(snowflake: int | str) -> datetime:
    """Return the UTC creation time encoded in a snowflake."""
    ms = (int(snowflake) >> (_WORKER_BITS + _SEQUENCE_BITS)) + SPLITCHAT_EPOCH_MS
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
