"""What :meth:`SplitchatClient.events` yields: dispatches and the session signals around them."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ("ClientEvent", "Dispatch", "Ready", "Resumed", "Resync")


class Dispatch(msgspec.Struct, frozen=True, kw_only=True):
    """One dispatch (op 0) from the gateway, delivered to the app exactly once.

    ``id``/``channel``/``nonce`` are set for events published on the bus (``nonce`` echoes the
    one the command was sent with, to reconcile optimistic UI); they are ``None`` for the
    gateway's own dispatches (``SUBSCRIBED``, ``PRESENCE_UPDATE``, ``RATE_LIMITED`` ...).
    """

    t: str
    d: Any
    s: int
    id: str | None = None
    channel: str | None = None
    nonce: Any = None


class Ready(msgspec.Struct, frozen=True, kw_only=True):
    """The first session is up (``READY``): what was granted and who we are."""

    session_id: str
    user: Any
    subscriptions: tuple[str, ...]
    denied: tuple[str, ...]


class Resumed(msgspec.Struct, frozen=True, kw_only=True):
    """The connection dropped and the session resumed: nothing but non-ephemeral events was lost.

    ``replayed`` missed dispatches follow this item (each delivered once, deduplicated);
    ``skipped_ephemeral`` ephemeral ones (typing indicators) were missed for good.
    Apps may ignore this item: it is informational.
    """

    replayed: int
    skipped_ephemeral: int


class Resync(msgspec.Struct, frozen=True, kw_only=True):
    """The old session was lost and a fresh one replaced it: **refetch your state over HTTP**.

    Events published between the loss and the new ``READY`` were not delivered. The new session
    is already subscribed when this item arrives, so state fetched after it is complete and any
    change from then on arrives as a dispatch. ``reason`` says why (``"invalid_session"``,
    ``"invalid_seq"``, ``"not_resumable"``).
    """

    reason: str
    session_id: str
    user: Any
    subscriptions: tuple[str, ...]
    denied: tuple[str, ...]


ClientEvent = Dispatch | Ready | Resumed | Resync
"""Any item of the :meth:`SplitchatClient.events` stream."""
