"""Shared fixtures. Async tests run on every anyio backend (asyncio and trio) unless a module
pins ``anyio_backend`` because it uses an asyncio-only client library (redis-py, nats-py)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in pyproject so the webapp branch needs no config change there.
    config.addinivalue_line(
        "markers", "browser: drives the distribution's Chromium through Playwright (skipped if missing)"
    )
