"""Idempotency keys: a retried command returns the first answer instead of running again.

The store's contract is three operations that map one-to-one onto a shared key-value store, so a
Redis implementation is a few lines (``claim`` = ``SET key inflight NX PX ttl`` falling back to
``GET``; ``complete`` = ``SET key response PX ttl``; ``release`` = ``DEL key`` if still in flight):

* :meth:`IdempotencyStore.claim` atomically either makes the caller the owner of the key (the
  command runs) or returns what is already there: an in-flight marker or a completed response,
  each with the fingerprint of the request that created it.
* :meth:`IdempotencyStore.complete` stores the response of the owner.
* :meth:`IdempotencyStore.release` drops the claim when the command failed in a way a retry may
  fix (bus unavailable, server error), so the retry runs for real.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import msgspec

__all__ = (
    "ClaimResult",
    "IdempotencyStore",
    "IdempotencyStoreUnavailable",
    "InMemoryIdempotencyStore",
    "StoredResponse",
    "request_fingerprint",
)


class IdempotencyStoreUnavailable(Exception):
    """The store's backend cannot be reached; the command endpoint answers 503 (safe to retry)."""


class StoredResponse(msgspec.Struct, frozen=True, gc=False):
    """A response kept for replay: status, the headers worth replaying, and the exact body bytes.

    (``gc=False``: it holds only strings and bytes, never a cycle, and thousands may be kept, so
    the cyclic garbage collector need not track them.)"""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class ClaimResult(msgspec.Struct, frozen=True, gc=False):
    """Outcome of :meth:`IdempotencyStore.claim`.

    ``state`` is ``"claimed"`` (the caller owns the key and must ``complete`` or ``release`` it),
    ``"in_progress"`` (another request with this key is running) or ``"completed"`` (``response``
    holds its answer). ``fingerprint`` is that of the request that first claimed the key.
    """

    state: Literal["claimed", "in_progress", "completed"]
    fingerprint: str
    response: StoredResponse | None = None


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """A digest of what makes two requests "the same": method, path and exact body bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(method.encode())
    digest.update(b"\0")
    digest.update(path.encode())
    digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


class IdempotencyStore(abc.ABC):
    """Where idempotency keys and their responses live (pluggable: memory, Redis, ...).

    Keys arrive already scoped (principal, command, client key), so a store needs no knowledge of
    either. Every method must be atomic with respect to the others for the same key.
    """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to the backend (optional)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (optional)."""

    @abc.abstractmethod
    async def claim(self, key: str, fingerprint: str, ttl: float) -> ClaimResult:
        """Claim ``key`` for a request with ``fingerprint`` or report what already holds it.

        A claim not completed or released expires after ``ttl`` seconds (a crashed worker never
        locks a key for ever).
        """

    @abc.abstractmethod
    async def complete(self, key: str, fingerprint: str, response: StoredResponse, ttl: float) -> None:
        """Store the owner's response for ``ttl`` seconds (replaces the in-flight marker)."""

    @abc.abstractmethod
    async def release(self, key: str) -> None:
        """Drop an in-flight claim so a retry can run; a completed entry is left alone."""


class _Entry:
    __slots__ = ("expires", "fingerprint", "response")

    def __init__(self, fingerprint: str, expires: float, response: StoredResponse | None) -> None:
        self.fingerprint = fingerprint
        self.expires = expires
        self.response = response


class InMemoryIdempotencyStore(IdempotencyStore):
    """A bounded, single-process store: at most ``max_entries`` keys, each for at most its TTL.

    Every operation is synchronous under the hood (no ``await`` between check and set), so a
    claim is atomic on any anyio backend. When full, the oldest entry is evicted first: the
    window shrinks under pressure rather than memory growing.
    """

    def __init__(self, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        # Entries are kept in insertion order and every TTL is the same order of magnitude, so
        # expired ones cluster at the front; stop at the first live one (amortised O(1)).
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.expires > now:
                break
            del entries[key]

    async def claim(self, key: str, fingerprint: str, ttl: float) -> ClaimResult:
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            del self._entries[key]
            entry = None
        if entry is not None:
            if entry.response is None:
                return ClaimResult("in_progress", entry.fingerprint)
            return ClaimResult("completed", entry.fingerprint, entry.response)
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = _Entry(fingerprint, now + ttl, None)
        return ClaimResult("claimed", fingerprint)

    async def complete(self, key: str, fingerprint: str, response: StoredResponse, ttl: float) -> None:
        now = self._clock()
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = _Entry(fingerprint, now + ttl, response)

    async def release(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.response is None:
            del self._entries[key]
