"""Idempotency keys in Redis: a retry that lands on another node gets the first answer.

Each key holds one byte of state (``i`` in flight, ``c`` completed); an in-flight value then
holds its owner's 16-character claim token; a msgpack entry with the fingerprint (and the
response, once completed) follows.

* ``claim``: ``SET key entry NX PX ttl GET`` (one atomic command, Redis >= 7.0): ``nil`` means
  we own it, anything else is what is already there. The in-flight entry carries a random claim
  token, so a claim whose reply was lost and was retried recognises its own marker.
* ``complete``: a Lua script that stores the answer unless the key is now held by another
  owner's claim (a late ``complete`` from an owner whose claim expired must not overwrite it).
* ``release``: a Lua script deleting the key only while it is still in flight *and* held by the
  caller's claim token.

All three are safe to repeat, so a connection error is retried for up to ``retry_for`` seconds
(a Redis restart or failover): above all a ``complete`` after the event was published should
not be lost. After that, :class:`~splitchat.IdempotencyStoreUnavailable` (the endpoint: 503).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec

from .._idempotency import ClaimResult, IdempotencyStore, IdempotencyStoreUnavailable, StoredResponse
from ._client import RedisError, aioredis

T = TypeVar("T")

__all__ = ("RedisIdempotencyStore",)

_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'i' and (ARGV[1] == '' or string.sub(v, 2, 17) == ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and v and not (string.sub(v, 1, 1) == 'i' and string.sub(v, 2, 17) == ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    fingerprint: str
    token: str = ""
    response: StoredResponse | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Entry)


class RedisIdempotencyStore(IdempotencyStore):
    """:class:`~splitchat.IdempotencyStore` on Redis, shared by every endpoint node.

    Args:
        client: a ``redis.asyncio.Redis`` (not closed by the store: its owner closes it).
        prefix: key prefix; entries are ``<prefix>idem:<key>``.
        retry_for: seconds an operation is retried on connection errors before giving up.
    """

    def __init__(self, client: aioredis.Redis, *, prefix: str = "splitchat:", retry_for: float = 3.0) -> None:
        self.client = client
        self.prefix = prefix
        self.retry_for = retry_for
        self._release = client.register_script(_RELEASE)
        self._complete = client.register_script(_COMPLETE)

    def key(self, key: str) -> str:
        """The Redis key of an idempotency key."""
        return f"{self.prefix}idem:{key}"

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        deadline = anyio.current_time() + self.retry_for
        delay = 0.05
        while True:
            try:
                return await operation()
            except (RedisError, OSError) as exc:
                if anyio.current_time() + delay > deadline:
                    raise IdempotencyStoreUnavailable(f"Redis idempotency store: {exc!r}") from exc
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def claim(self, key: str, fingerprint: str, ttl: float) -> ClaimResult:
        token = secrets.token_hex(8)
        entry = b"i" + token.encode() + _encoder.encode(_Entry(fingerprint, token))
        held = await self._retrying(
            lambda: self.client.set(self.key(key), entry, nx=True, px=max(1, int(ttl * 1000)), get=True)
        )
        if not isinstance(held, bytes):  # nil: the key was free and is ours now
            return ClaimResult("claimed", fingerprint, owner=token)
        try:
            found = _decoder.decode(held[17:] if held[:1] == b"i" else held[1:])
        except msgspec.DecodeError:
            # Not ours to interpret (another version, manual write): treat it as busy.
            return ClaimResult("in_progress", "")
        if held[:1] == b"c" and found.response is not None:
            return ClaimResult("completed", found.fingerprint, found.response)
        if found.token == token:
            return ClaimResult("claimed", fingerprint, owner=token)
        return ClaimResult("in_progress", found.fingerprint)

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float, owner: str | None = None
    ) -> None:
        entry = b"c" + _encoder.encode(_Entry(fingerprint, "", response))
        args: list[bytes | str | int] = [owner or "", entry, max(1, int(ttl * 1000))]
        await self._retrying(lambda: self._complete(keys=[self.key(key)], args=args))

    async def release(self, key: str, owner: str | None = None) -> None:
        await self._retrying(lambda: self._release(keys=[self.key(key)], args=[owner or ""]))
