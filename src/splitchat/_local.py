"""A session (or a not-yet-identified connection) hosted by this process, as the gateway, the hub
and the fast path (:mod:`splitchat._gateway_server`) see it: the protocol machine plus the
anyio events that wake its writer and its close watchdog."""

from __future__ import annotations

import anyio

from ._protocol import Close, GatewayConnection

__all__ = ("_Local",)


class _Local:
    """A session (or a not-yet-identified connection) hosted by this process.

    ``core`` is the protocol machine; after a same-node RESUME the new connection's ``_Local``
    takes the session's place in the routes and the old one is dropped.
    """

    __slots__ = (
        "_closing",
        "_waiting",
        "_wake",
        "attached",
        "checkpointed_at",
        "close_sent",
        "closing",
        "connection_id",
        "core",
        "expires_at",
    )

    def __init__(self, core: GatewayConnection, connection_id: str) -> None:
        self.core = core
        self.connection_id = connection_id
        self.attached = True
        self.expires_at = 0.0
        self.checkpointed_at = 0.0  # monotonic time of the last checkpoint written
        self.closing: Close | None = None
        self.close_sent = False
        self._wake = anyio.Event()
        self._waiting = False
        self._closing = anyio.Event()

    def notify_closing(self) -> None:
        self._closing.set()

    async def wait_closing(self) -> None:
        await self._closing.wait()

    def wake(self) -> None:
        # Only a writer parked in wait() needs the event: a busy writer takes every queued frame
        # before it parks again (no await between its empty check and wait()). Setting it on
        # every delivery was ~10% of the ASGI path's CPU in fan-out.
        if self._waiting:
            self._waiting = False
            self._wake.set()

    async def wait(self) -> None:
        """Park until :meth:`wake`; the caller checked the outbox was empty just before."""
        self._wake = anyio.Event()
        self._waiting = True
        try:
            await self._wake.wait()
        finally:
            self._waiting = False
