"""Shared state on Redis for running many gateway/endpoint nodes (extra ``redis``).

Importing this package needs redis-py; ``import splitchat`` never does.

* :class:`RedisSessionStore` - resumable sessions and crash checkpoints, with ownership.
* :class:`RedisIdempotencyStore` - idempotency keys (a retry on another node is deduplicated).
* :class:`RedisPresence` - presence with per-connection leases (a crashed node's users expire).
* :class:`RedisState` - all of the above plus a Redis rate limiter on one connection pool.

See docs/deployment.md.
"""

from __future__ import annotations

from ._idempotency import RedisIdempotencyStore
from ._presence import RedisPresence
from ._sessions import RedisSessionStore
from ._state import RedisState

__all__ = ("RedisIdempotencyStore", "RedisPresence", "RedisSessionStore", "RedisState")
