"""Idempotency keys: a retried command returns the first answer instead of running again.

The store's contract is three operations that map one-to-one onto a shared key-value store, so a
Redis implementation is a few lines (``claim`` = ``SET key inflight NX PX ttl`` falling back to
``GET``; ``complete`` = ``SET key response PX ttl``; ``release`` = ``DEL key`` if still in flight).
A store may also hand out an *owner* token with each claim (``ClaimResult.owner``); the
endpoint then passes it back to ``complete``/``release``, which leave someone else's claim alone:

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
import itertools
import math
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
    ``"in_progress"`` (another request with this key is running), ``"completed"`` (``response``
    holds its answer) or ``"full"`` (the store has no room for another claim without dropping
    one that is in flight; the endpoint answers 503 ``idempotency_store_full``).
    ``fingerprint`` is that of the request that first claimed the key (the caller's own for
    ``"claimed"`` and ``"full"``).

    ``owner`` is set with ``"claimed"`` by stores that track owners: an opaque token to pass to
    ``complete``/``release`` so that a late call from an owner whose claim expired cannot
    overwrite or delete a newer owner's claim. ``None`` (the default) means the store does not
    track owners; callers then call ``complete``/``release`` without it.
    """

    state: Literal["claimed", "in_progress", "completed", "full"]
    fingerprint: str
    response: StoredResponse | None = None
    owner: str | None = None


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """A digest of what makes two requests "the same": method, path and exact body bytes."""
    # One buffer, one update: the same digest as feeding the parts one by one.
    head = f"{method}\0{path}\0".encode()
    return hashlib.blake2b(head + body, digest_size=16).hexdigest()


class IdempotencyStore(abc.ABC):
    """Where idempotency keys and their responses live (pluggable: memory, Redis, ...).

    Keys arrive already scoped as ``<principal>\0<command>\0<client key>`` (the principal part
    is the caller's id, or its IP when anonymous), so a store may read the principal from the
    text before the first NUL, e.g. to bound entries per principal. Every method must be atomic
    with respect to the others for the same key.
    """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to the backend (optional)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (optional)."""

    @abc.abstractmethod
    async def claim(self, key: str, fingerprint: str, ttl: float) -> ClaimResult:
        """Claim ``key`` for a request with ``fingerprint`` or report what already holds it.

        A claim not completed or released expires after ``ttl`` seconds (a crashed worker never
        locks a key for ever). A store that tracks owners puts a token in ``ClaimResult.owner``.
        """

    @abc.abstractmethod
    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float, owner: str | None = None
    ) -> None:
        """Store the owner's response for ``ttl`` seconds (replaces the in-flight marker).

        With ``owner`` (the token ``claim`` returned), a store that tracks owners must not
        replace a claim that belongs to someone else (the caller's own claim expired and the key
        was claimed again). The endpoint passes ``owner`` only when ``claim`` returned one.
        """

    @abc.abstractmethod
    async def release(self, key: str, owner: str | None = None) -> None:
        """Drop an in-flight claim so a retry can run; a completed entry is left alone.

        With ``owner``, only a claim held by that owner is dropped.
        """


def principal_of(key: str) -> str:
    """The principal part of a scoped idempotency key (the text before the first NUL)."""
    return key.partition("\0")[0]


class _Entry:
    __slots__ = ("expires", "fingerprint", "owner", "response", "scope")

    def __init__(
        self, fingerprint: str, expires: float, response: StoredResponse | None, owner: str | None, scope: str
    ) -> None:
        self.fingerprint = fingerprint
        self.expires = expires
        self.response = response
        self.owner = owner
        self.scope = scope


class InMemoryIdempotencyStore(IdempotencyStore):
    """A bounded, single-process store: at most ``max_entries`` keys (``max_entries_per_principal``
    per principal), each for at most its TTL.

    Every operation is synchronous under the hood (no ``await`` between check and set), so a
    claim is atomic on any anyio backend. When a bound is reached, expired entries are purged,
    then the oldest *completed* entry (of that principal, or overall) is evicted: the replay
    window shrinks under pressure rather than memory growing. An in-flight claim is never
    evicted (that would let a duplicate run concurrently, and let one principal cancel other
    principals' protection); when only in-flight claims fill the bound, ``claim`` answers
    ``"full"``.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_entries_per_principal: int = 1_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_entries_per_principal < 1:
            raise ValueError("max_entries and max_entries_per_principal must be >= 1")
        self.max_entries = max_entries
        self.max_entries_per_principal = max_entries_per_principal
        self._clock = clock
        # Insertion (claim or completion) order, so expired entries cluster at the front.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._completed: OrderedDict[str, None] = OrderedDict()  # completion order (eviction)
        self._per_principal: dict[str, OrderedDict[str, None]] = {}  # every key of a principal
        self._owners = itertools.count(1)
        # A lower bound on the earliest expiry of any entry: no entry can be expired before it.
        # Lets _purge skip its full scan; without it, a principal at its bound (one busy user,
        # a benchmark) paid an O(entries) scan per request (~100 us at 1,000 entries).
        self._earliest_expiry = math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._completed.pop(key, None)
        keys = self._per_principal[entry.scope]
        del keys[key]
        if not keys:
            del self._per_principal[entry.scope]

    def _add(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        if entry.expires < self._earliest_expiry:
            self._earliest_expiry = entry.expires
        if entry.response is not None:
            self._completed[key] = None
        self._per_principal.setdefault(entry.scope, OrderedDict())[key] = None

    def _expire(self, now: float) -> None:
        entries = self._entries
        # Every TTL is the same order of magnitude, so expired entries cluster at the front;
        # stop at the first live one (amortised O(1)).
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.expires > now:
                break
            self._remove(key)

    def _purge(self, now: float) -> None:
        # Only when a bound is hit: an expired entry behind a live one must not take the room.
        # Removals only raise the true earliest expiry, so the bound stays a lower bound and the
        # scan runs only once something may really have expired (then the bound is made exact).
        if now < self._earliest_expiry:
            return
        earliest = math.inf
        expired: list[str] = []
        for key, entry in self._entries.items():
            if entry.expires <= now:
                expired.append(key)
            elif entry.expires < earliest:
                earliest = entry.expires
        for key in expired:
            self._remove(key)
        self._earliest_expiry = earliest

    def _make_room(self, scope: str, now: float) -> bool:
        mine = self._per_principal.get(scope)
        if len(self._entries) >= self.max_entries or (
            mine is not None and len(mine) >= self.max_entries_per_principal
        ):
            self._purge(now)
        mine = self._per_principal.get(scope)
        if mine is not None and len(mine) >= self.max_entries_per_principal:
            oldest = next((k for k in mine if k in self._completed), None)
            if oldest is None:
                return False
            self._remove(oldest)
        if len(self._entries) >= self.max_entries:
            if not self._completed:
                return False
            self._remove(next(iter(self._completed)))
        return True

    async def claim(self, key: str, fingerprint: str, ttl: float) -> ClaimResult:
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            self._remove(key)
            entry = None
        if entry is not None:
            if entry.response is None:
                return ClaimResult("in_progress", entry.fingerprint)
            return ClaimResult("completed", entry.fingerprint, entry.response)
        scope = principal_of(key)
        if not self._make_room(scope, now):
            return ClaimResult("full", fingerprint)
        owner = str(next(self._owners))
        self._add(key, _Entry(fingerprint, now + ttl, None, owner, scope))
        return ClaimResult("claimed", fingerprint, owner=owner)

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float, owner: str | None = None
    ) -> None:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if owner is not None and entry.owner != owner and entry.expires > now:
                return  # our claim expired and someone else holds the key now
            if entry.response is None:
                # The usual case, the owner completing its claim: update the entry in place and
                # move it to the back of each order, exactly what removing and re-adding it does
                # (with the entry gone there is always room again, so no eviction can happen).
                entry.fingerprint, entry.expires = fingerprint, now + ttl
                entry.response, entry.owner = response, None
                self._entries.move_to_end(key)
                self._completed[key] = None
                self._per_principal[entry.scope].move_to_end(key)
                if entry.expires < self._earliest_expiry:
                    self._earliest_expiry = entry.expires
                return
            self._remove(key)
        scope = principal_of(key)
        if not self._make_room(scope, now):
            return  # no room without dropping in-flight claims: this answer is not remembered
        self._add(key, _Entry(fingerprint, now + ttl, response, None, scope))

    async def release(self, key: str, owner: str | None = None) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.response is None and (owner is None or entry.owner == owner):
            self._remove(key)
