"""Resumable sessions in Redis: one msgpack record per session, plus its owner (which node hosts it).

* ``save`` / ``save_many``: one Lua script per record (pipelined for a batch) that writes the
  record with ``PXAT`` unless another node has claimed the session since: a node that lost the
  session (a zombie connection, a stale detached copy) can never overwrite the new host's record.
* ``claim``: ``SET owner node PXAT .. GET`` - atomic, and it returns the previous owner.
* ``take``: ``GETDEL`` - a session is resumed at most once.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from .._sessions import SessionRecord, SessionStore
from ._client import aioredis

__all__ = ("RedisSessionStore",)

# KEYS: record, owner. ARGV: owner, expires at (ms since the epoch), record bytes.
_SAVE = """
local held = redis.call('GET', KEYS[2])
if held and ARGV[1] ~= '' and held ~= ARGV[1] then return 0 end
if ARGV[1] ~= '' then redis.call('SET', KEYS[2], ARGV[1], 'PXAT', ARGV[2]) end
redis.call('SET', KEYS[1], ARGV[3], 'PXAT', ARGV[2])
return 1
"""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SessionRecord)


class RedisSessionStore(SessionStore):
    """:class:`~splitchat.SessionStore` on Redis (shared by every gateway node).

    Args:
        client: a ``redis.asyncio.Redis`` (not closed by the store: its owner closes it).
        prefix: key prefix; records are ``<prefix>session:<id>``, owners ``<prefix>owner:<id>``.
    """

    def __init__(self, client: aioredis.Redis, *, prefix: str = "splitchat:") -> None:
        self.client = client
        self.prefix = prefix
        self._save = client.register_script(_SAVE)

    def record_key(self, session_id: str) -> str:
        """The key holding ``session_id``'s record."""
        return f"{self.prefix}session:{session_id}"

    def owner_key(self, session_id: str) -> str:
        """The key naming the node that hosts ``session_id``."""
        return f"{self.prefix}owner:{session_id}"

    def _args(self, record: SessionRecord) -> tuple[list[str], list[str | int | bytes]]:
        keys = [self.record_key(record.session_id), self.owner_key(record.session_id)]
        return keys, [record.owner, int(record.expires_at * 1000), _encoder.encode(record)]

    async def save(self, record: SessionRecord) -> None:
        keys, args = self._args(record)
        await self._save(keys=keys, args=args)

    async def save_many(self, records: Sequence[SessionRecord]) -> list[bool]:
        if not records:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for record in records:
                keys, args = self._args(record)
                await self._save(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [bool(result) for result in results]

    async def take(self, session_id: str) -> SessionRecord | None:
        raw = await self.client.getdel(self.record_key(session_id))
        if not isinstance(raw, bytes):
            return None
        try:
            return _decoder.decode(raw)
        except msgspec.DecodeError:
            return None  # written by an incompatible version: not resumable

    async def discard(self, session_id: str) -> None:
        await self.client.delete(self.record_key(session_id), self.owner_key(session_id))

    async def claim(self, session_id: str, owner: str, expires_at: float) -> str | None:
        previous = await self.client.set(
            self.owner_key(session_id), owner, pxat=int(expires_at * 1000), get=True
        )
        if previous is None:
            return None
        return previous.decode() if isinstance(previous, bytes) else str(previous)
