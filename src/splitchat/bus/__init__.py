"""Fan-out buses: the :class:`Bus` contract, the in-memory default, and selection by URL.

Backends with third-party dependencies live in their own modules (``splitchat.bus.redis``,
``splitchat.bus.nats``) and are imported only when asked for, so ``import splitchat`` never
needs them.
"""

from __future__ import annotations

import importlib
from urllib.parse import parse_qsl, urlsplit

from ._base import (
    Bus,
    BusError,
    BusUnavailable,
    Delivery,
    Gap,
    HistoryGone,
    HistoryUnsupported,
    Position,
    Subscription,
)
from .memory import InMemoryBus

__all__ = (
    "Bus",
    "BusError",
    "BusUnavailable",
    "Delivery",
    "Gap",
    "HistoryGone",
    "HistoryUnsupported",
    "InMemoryBus",
    "Position",
    "Subscription",
    "bus_from_url",
)

_EXTRAS = {"redis": "redis", "rediss": "redis", "nats": "nats"}
_CLASSES = {"redis": "RedisBus", "nats": "NatsBus"}


def bus_from_url(url: str) -> Bus:
    """Build a bus from a URL, so an app picks its backend by configuration.

    * ``memory://`` (query: ``history_size``, ``history_ttl``) - :class:`InMemoryBus`
    * ``redis://host:port/db`` / ``rediss://`` - ``splitchat.bus.redis.RedisBus`` (extra ``redis``)
    * ``nats://host:port`` - ``splitchat.bus.nats.NatsBus`` (extra ``nats``)

    Raises ``ValueError`` for an unknown scheme and ``RuntimeError`` naming the extra to
    install when the backend's client library is missing.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        options = dict(parse_qsl(parts.query))
        return InMemoryBus(
            history_size=int(options.get("history_size", 2000)),
            history_ttl=float(options.get("history_ttl", 600.0)),
        )
    extra = _EXTRAS.get(scheme)
    if extra is None:
        raise ValueError(f"unknown bus URL scheme {scheme!r} (expected memory://, redis://, nats://)")
    try:
        module = importlib.import_module(f"splitchat.bus.{extra}")
    except ImportError as exc:
        raise RuntimeError(
            f"the {scheme}:// bus needs the {extra!r} extra: pip install 'splitchat[{extra}]' ({exc})"
        ) from exc
    factory = getattr(module, _CLASSES[extra])
    bus = factory.from_url(url)
    assert isinstance(bus, Bus)
    return bus
