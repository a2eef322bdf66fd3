"""RateLimiter on a real Redis (``async+redis://``): one budget shared by several nodes."""

from __future__ import annotations

import uuid

import pytest

from splitchat import RateLimiter

pytestmark = pytest.mark.redis

REDIS = "async+redis://127.0.0.1:6379"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # limits' async Redis storage runs on redis-py's asyncio client


@pytest.mark.parametrize("strategy", ["moving", "fixed", "sliding"])
async def test_two_nodes_share_one_budget(strategy: str) -> None:
    node_a = RateLimiter(REDIS, strategy=strategy, implementation="redispy")  # type: ignore[arg-type]
    node_b = RateLimiter(REDIS, strategy=strategy, implementation="redispy")  # type: ignore[arg-type]
    assert node_a.is_async
    key = f"test:{uuid.uuid4().hex}"
    results = []
    for i in range(6):
        node = node_a if i % 2 else node_b
        results.append(await node.hit(key, "4/minute", bucket="shared-test"))
    assert [d.allowed for d in results] == [True] * 4 + [False] * 2
    assert results[3].remaining == 0
    assert 0 < results[-1].retry_after <= 60
    assert not (await node_a.peek(key, "4/minute")).allowed
    await node_b.clear(key, "4/minute")
    assert (await node_a.hit(key, "4/minute")).allowed
    await node_a.close()
    await node_b.close()
    await node_b.close()  # idempotent
