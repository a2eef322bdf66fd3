"""What the distributed buses (Redis, NATS) share: lifecycle and credential-free addresses.

Both hold one backend connection per process, a set of local subscriptions and a per-channel
routing table; both start once, close once and cannot be restarted (their background tasks and
connections are gone). Their URLs may carry credentials (``redis://user:secret@host``), which
must never reach a log line or an exception message: :meth:`RemoteBus._where` and
:meth:`RemoteBus._describe` are how a bus names its backend and reports its errors.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from ._base import Bus, BusUnavailable
from ._local import LocalSubscription

__all__ = ("RemoteBus", "redact_url")


def redact_url(url: str, default_port: int) -> str:
    """``host:port`` of ``url``: no scheme, userinfo, path or query (any of which may hold secrets)."""
    try:
        parts = urlsplit(url if "//" in url else f"//{url}")
        port = parts.port or default_port
    except ValueError:
        return "<invalid url>"
    return f"{parts.hostname or '?'}:{port}"


class RemoteBus(Bus):
    """Base of the buses backed by a server: ``start``/``close`` once, addresses without secrets.

    Subclasses set ``default_port``, implement :meth:`_connect` (open connections and start
    background work; clean up after themselves if it fails) and :meth:`_disconnect`, and list
    their server URLs in :meth:`_urls`.
    """

    default_port: int = 0

    def __init__(self) -> None:
        self._running = False
        self._closed = False
        self._channels: dict[str, Any] = {}
        self._subscriptions: set[LocalSubscription] = set()

    @abc.abstractmethod
    def _urls(self) -> Sequence[str]:
        """The configured server URLs (may contain credentials: never print them)."""

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Connect and start background work; raise :class:`BusUnavailable` if unreachable."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Stop background work and close connections (called once, by :meth:`close`)."""

    async def start(self) -> None:
        if self._running:
            return
        if self._closed:
            raise BusUnavailable(f"a closed {type(self).__name__} cannot be restarted; create a new one")
        await self._connect()
        self._running = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._running = False
        for sub in list(self._subscriptions):
            sub.close_now()
        self._subscriptions.clear()
        self._channels.clear()
        await self._disconnect()

    def _detach(self, sub: LocalSubscription, channels: Iterable[str]) -> None:
        """Stop routing ``channels`` to ``sub``; a channel nobody here reads is forgotten."""
        for name in channels:
            state = self._channels.get(name)
            if state is None:
                continue
            state.subs.discard(sub)
            if not state.subs:
                del self._channels[name]
        if not sub.channels:
            self._subscriptions.discard(sub)

    def _where(self) -> str:
        """The servers as ``host:port`` (comma-separated), safe for logs and exceptions."""
        return ", ".join(redact_url(url, self.default_port) for url in self._urls())

    def _describe(self, exc: BaseException) -> str:
        """``repr(exc)`` of a client library's exception, with any URL userinfo masked."""
        return self._scrub(repr(exc))

    def _scrub(self, text: str) -> str:
        """``text`` (e.g. a client library's exception) with any URL userinfo masked."""
        for url in self._urls():
            try:
                parts = urlsplit(url if "//" in url else f"//{url}")
            except ValueError:
                continue
            userinfo = parts.netloc.rpartition("@")[0]
            if userinfo:
                text = text.replace(userinfo, "***")
                if parts.password:
                    text = text.replace(parts.password, "***")
        return text
