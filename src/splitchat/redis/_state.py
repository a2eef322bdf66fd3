"""One Redis connection pool for every piece of shared gateway/endpoint state."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from .._ratelimit import RateLimiter
from ._client import aioredis
from ._idempotency import RedisIdempotencyStore
from ._presence import RedisPresence
from ._sessions import RedisSessionStore

__all__ = ("RedisState",)


class RedisState:
    """The Redis-backed stores of a scaled-out deployment, sharing one connection pool.

    Pass its parts to the components::

        state = RedisState("redis://127.0.0.1:6379/0", prefix="myapp:")
        endpoint = CommandEndpoint(..., rate_limiter=state.rate_limiter,
                                   idempotency_store=state.idempotency_store)
        gateway = Gateway(..., session_store=state.session_store, presence=state.presence)
        app = Starlette(..., lifespan=lifespan(state, bus, endpoint, gateway))

    ``state`` is first in the lifespan so it closes last (the gateway saves sessions on drain).

    Args:
        url: ``redis://[user:password@]host:port/db`` (or ``rediss://``).
        prefix: prefix of every key (sessions, owners, idempotency keys, presence, rate limits).
        timeout: socket timeout in seconds of every store call.
        lease_ttl: presence lease, see :class:`RedisPresence`.
        rate_limit_strategy: ``limits`` strategy of the shared rate limiter.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "splitchat:",
        timeout: float = 2.0,
        lease_ttl: float = 30.0,
        rate_limit_strategy: str = "moving",
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=10
        )
        self.session_store = RedisSessionStore(self.client, prefix=prefix)
        self.idempotency_store = RedisIdempotencyStore(self.client, prefix=prefix)
        self.presence = RedisPresence(self.client, prefix=prefix, lease_ttl=lease_ttl)
        self.rate_limiter = RateLimiter(
            "async+" + url,
            strategy=rate_limit_strategy,  # type: ignore[arg-type]
            implementation="redispy",
            key_prefix=f"{prefix}limits",
            socket_timeout=timeout,
        )

    async def start(self) -> None:
        """Check that Redis answers (fail fast at startup)."""
        await self.client.ping()

    async def close(self) -> None:
        """Close the connection pools (the stores' and the rate limiter's)."""
        await self.rate_limiter.close()
        await self.client.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
