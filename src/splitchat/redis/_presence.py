"""Presence across nodes with leases, in Redis.

Per channel, three keys:

* ``<prefix>pz:<channel>`` - sorted set of connection leases: member ``<len(pid)>:<pid><connection>``,
  score = lease expiry (ms since the epoch). Connection ids include the node id.
* ``<prefix>pc:<channel>`` - hash principal id -> live connection count.
* ``<prefix>pi:<channel>`` - hash principal id -> public identity (JSON), for ``members``.

``join`` / ``leave`` / expiry are Lua scripts, so "first join" and "last leave" are decided
atomically in Redis: with any number of nodes, exactly one caller sees the first join and
exactly one sees the last leave. Each node refreshes the leases of its own connections every
``refresh_interval`` (from :meth:`sweep`, which the gateway calls about once a second); a crashed
node stops refreshing, its leases run out after ``lease_ttl``, and the next sweep on any node
removes them and reports the principals who thereby left (once, atomically) to be announced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from .._auth import Principal
from .._presence import Presence
from ._client import aioredis

__all__ = ("RedisPresence",)

# KEYS: leases, counts, identities, channel index. ARGV: member, expiry ms, pid, identity, channel.
_JOIN = """
redis.call('SADD', KEYS[4], ARGV[5])
if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[3], 1) == 1 then
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

# KEYS: leases, counts, identities. ARGV: member, pid.
_LEAVE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
  return 1
end
return 0
"""

# KEYS: leases, counts, identities, channel index. ARGV: now ms, channel, max leases per call.
_EXPIRE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, m in ipairs(gone) do
  redis.call('ZREM', KEYS[1], m)
  local colon = string.find(m, ':', 1, true)
  local pid = string.sub(m, colon + 1, colon + tonumber(string.sub(m, 1, colon - 1)))
  if redis.call('HINCRBY', KEYS[2], pid, -1) <= 0 then
    local identity = redis.call('HGET', KEYS[3], pid)
    redis.call('HDEL', KEYS[2], pid)
    redis.call('HDEL', KEYS[3], pid)
    if identity then table.insert(out, identity) end
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[4], ARGV[2])
  redis.call('DEL', KEYS[2], KEYS[3])
end
return out
"""


class RedisPresence(Presence):
    """:class:`~splitchat.Presence` shared by every node, with per-connection leases.

    Args:
        client: a ``redis.asyncio.Redis`` (not closed by this object).
        prefix: key prefix.
        lease_ttl: seconds a connection stays present without its node refreshing it (how long
            a crashed node's users still look online).
        refresh_interval: seconds between lease refreshes and expiry sweeps (default a third
            of ``lease_ttl``).
        clock: wall-clock seconds (leases are compared across nodes: keep clocks in sync).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "splitchat:",
        lease_ttl: float = 30.0,
        refresh_interval: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.refresh_interval = refresh_interval if refresh_interval is not None else lease_ttl / 3
        self._clock = clock
        self._join = client.register_script(_JOIN)
        self._leave = client.register_script(_LEAVE)
        self._expire = client.register_script(_EXPIRE)
        # This node's leases: (channel, member) -> (principal id, identity JSON).
        self._mine: dict[tuple[str, str], tuple[str, str]] = {}
        self._next_sweep = 0.0

    def _keys(self, channel: str) -> list[str]:
        p = self.prefix
        return [f"{p}pz:{channel}", f"{p}pc:{channel}", f"{p}pi:{channel}", f"{p}pchannels"]

    @staticmethod
    def _member(principal_id: str, connection_id: str) -> str:
        return f"{len(principal_id)}:{principal_id}{connection_id}"

    def _expiry_ms(self) -> int:
        return int((self._clock() + self.lease_ttl) * 1000)

    async def join(self, channel: str, principal: Principal, connection_id: str) -> bool:
        member = self._member(principal.id, connection_id)
        identity = json.dumps(principal.identity(), separators=(",", ":"))
        self._mine[(channel, member)] = (principal.id, identity)
        args: list[str | int] = [member, self._expiry_ms(), principal.id, identity, channel]
        return bool(await self._join(keys=self._keys(channel), args=args))

    async def leave(self, channel: str, principal: Principal, connection_id: str) -> bool:
        member = self._member(principal.id, connection_id)
        self._mine.pop((channel, member), None)
        return bool(await self._leave(keys=self._keys(channel)[:3], args=[member, principal.id]))

    async def members(self, channel: str) -> list[dict[str, Any]]:
        keys = self._keys(channel)
        live = await self.client.zrangebyscore(keys[0], int(self._clock() * 1000), "+inf")
        ids: list[str] = []
        for raw in live:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            length, _, rest = member.partition(":")
            ids.append(rest[: int(length)])
        unique = list(dict.fromkeys(ids))
        if not unique:
            return []
        identities = await self.client.hmget(keys[2], unique)
        return [json.loads(identity) for identity in identities if identity is not None]

    async def sweep(self) -> list[tuple[str, dict[str, Any]]]:
        """Refresh this node's leases, then expire everyone's dead ones (at most every
        ``refresh_interval``); returns the principals whose last lease just expired."""
        now = self._clock()
        if now < self._next_sweep:
            return []
        self._next_sweep = now + self.refresh_interval
        expiry = self._expiry_ms()
        if self._mine:
            async with self.client.pipeline(transaction=False) as pipe:
                for (channel, member), (pid, identity) in list(self._mine.items()):
                    await self._join(
                        keys=self._keys(channel), args=[member, expiry, pid, identity, channel], client=pipe
                    )
                await pipe.execute()
        gone: list[tuple[str, dict[str, Any]]] = []
        for raw in await self.client.smembers(f"{self.prefix}pchannels"):
            channel = raw.decode() if isinstance(raw, bytes) else str(raw)
            identities = await self._expire(keys=self._keys(channel), args=[int(now * 1000), channel, 1000])
            gone.extend((channel, json.loads(identity)) for identity in identities)
        return gone
