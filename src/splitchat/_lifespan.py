"""Tie splitchat components (bus, endpoint, gateway, ...) to the host application's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Protocol, runtime_checkable

__all__ = ("Lifecycle", "lifespan")


@runtime_checkable
class Lifecycle(Protocol):
    """Anything with ``async start()`` and ``async close()``: buses, the endpoint, the gateway."""

    async def start(self) -> None:
        """Acquire resources; called once at application startup."""

    async def close(self) -> None:
        """Release resources; called once at application shutdown."""


def lifespan(*components: Lifecycle) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """Return a Starlette/FastAPI ``lifespan=`` callable that starts ``components`` in order.

    They are closed in reverse order at shutdown; if one fails to start, those already started
    are closed before the error propagates. Usage::

        app = Starlette(routes=[...], lifespan=splitchat.lifespan(bus, endpoint))
    """
    for component in components:
        if not isinstance(component, Lifecycle):
            raise TypeError(f"{component!r} has no async start()/close()")

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for component in components:
                await component.start()
                stack.push_async_callback(component.close)
            yield

    return run
