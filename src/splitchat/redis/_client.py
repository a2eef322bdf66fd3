"""The redis-py import, kept in one place so the rest of splitchat never needs it."""

from __future__ import annotations

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised when the extra is missing
    raise ImportError(f"splitchat.redis needs redis-py: pip install 'splitchat[redis]' ({exc})") from exc

__all__ = ("RedisError", "aioredis")
