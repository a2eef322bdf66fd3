"""Shared fixtures. Async tests run on every anyio backend (asyncio and trio) unless a module
pins ``anyio_backend`` because it uses an asyncio-only client library (redis-py, nats-py)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
