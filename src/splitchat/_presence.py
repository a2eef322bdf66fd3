"""Who is connected to which channel: the :class:`Presence` seam and its in-memory implementation.

A principal counts once per channel however many sessions (tabs, devices) it has there:
:meth:`Presence.join` reports only the first connection and :meth:`Presence.leave` only the
last, which is exactly when the gateway dispatches ``PRESENCE_UPDATE``. The Redis implementation
(``splitchat.redis.RedisPresence``) keeps per-connection leases that their node refreshes, so a
crashed node's connections expire instead of staying "online" forever; :meth:`Presence.sweep`
reports the principals whose last lease ran out, and the gateway announces them offline.
"""

from __future__ import annotations

import abc
from typing import Any

from ._auth import Principal

__all__ = ("InMemoryPresence", "Presence")


class Presence(abc.ABC):
    """Membership of principals in channels, counted per connection."""

    @abc.abstractmethod
    async def join(self, channel: str, principal: Principal, connection_id: str) -> bool:
        """Record a connection in ``channel``; ``True`` if the principal was not there before."""

    @abc.abstractmethod
    async def leave(self, channel: str, principal: Principal, connection_id: str) -> bool:
        """Remove a connection; ``True`` if it was the principal's last one in ``channel``."""

    @abc.abstractmethod
    async def members(self, channel: str) -> list[dict[str, Any]]:
        """The public identities of the principals present in ``channel``."""

    async def sweep(self) -> list[tuple[str, dict[str, Any]]]:
        """Housekeeping, called about once a second by every gateway: refresh this node's
        leases and expire dead ones. Returns ``(channel, identity)`` for each principal whose
        last connection expired (exactly once across nodes), to be announced offline.
        The in-memory presence has nothing to expire."""
        return []


class InMemoryPresence(Presence):
    """Presence of one process (each gateway node sees its own connections)."""

    def __init__(self) -> None:
        # channel -> principal id -> (identity, connection ids)
        self._channels: dict[str, dict[str, tuple[dict[str, Any], set[str]]]] = {}

    async def join(self, channel: str, principal: Principal, connection_id: str) -> bool:
        members = self._channels.setdefault(channel, {})
        entry = members.get(principal.id)
        if entry is None:
            members[principal.id] = (principal.identity(), {connection_id})
            return True
        entry[1].add(connection_id)
        return False

    async def leave(self, channel: str, principal: Principal, connection_id: str) -> bool:
        members = self._channels.get(channel)
        entry = members.get(principal.id) if members else None
        if members is None or entry is None or connection_id not in entry[1]:
            return False
        entry[1].discard(connection_id)
        if entry[1]:
            return False
        del members[principal.id]
        if not members:
            del self._channels[channel]
        return True

    async def members(self, channel: str) -> list[dict[str, Any]]:
        return [identity for identity, _ in self._channels.get(channel, {}).values()]
