"""The one-call wiring of shared state for many nodes (the Redis parts load lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .redis import RedisState

__all__ = ("redis_state",)


def redis_state(url: str, *, prefix: str = "splitchat:", lease_ttl: float = 30.0) -> RedisState:
    """Session store, idempotency store, presence and rate limiter on one Redis (extra ``redis``).

    Returns a :class:`splitchat.redis.RedisState` whose ``session_store``, ``idempotency_store``,
    ``presence`` and ``rate_limiter`` go to the gateway and the command endpoint; put the state
    itself first in :func:`splitchat.lifespan`. See docs/deployment.md.
    """
    try:
        from .redis import RedisState
    except ImportError as exc:
        raise RuntimeError(
            f"redis_state needs the 'redis' extra: pip install 'splitchat[redis]' ({exc})"
        ) from exc
    return RedisState(url, prefix=prefix, lease_ttl=lease_ttl)
