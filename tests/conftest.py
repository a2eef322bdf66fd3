"""Shared fixtures. Async tests run on every anyio backend (asyncio and trio) unless a module
pins ``anyio_backend`` because it uses an asyncio-only client library (redis-py, nats-py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A unique Redis key prefix for one test; every key under it is deleted afterwards.

    Only for modules pinned to asyncio (redis-py's asyncio client).
    """
    from redis import asyncio as aioredis

    value = f"splitchat-test:{uuid.uuid4().hex[:10]}:"
    yield value
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [key async for key in client.scan_iter(match=f"{value}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
