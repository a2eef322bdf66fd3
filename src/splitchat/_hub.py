"""The hub: this process's ONE bus subscription and the local fan-out behind it.

The subscription's channels are the union of the local sessions' channels; :attr:`Hub.routes`
maps each channel to the sessions hosted here that receive it. A delivery is decoded once
(:meth:`Hub.decode`) and the same :class:`~splitchat._frames.Dispatch` handed to every routed
session's machine, which never awaits a socket: it appends to the session's bounded outbox and
the writer is woken. A ``Gap`` invalidates every session routed to its channel.

Presence (join on first route, leave on unroute, PRESENCE_UPDATE on a principal's first join /
last leave) lives here because it changes exactly when routing does.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import msgspec

from ._auth import Principal
from ._events import decode_event, encode_event
from ._frames import Dispatch
from ._local import _Local
from ._payloads import PresenceUpdatePayload
from ._presence import Presence
from ._protocol import Action
from ._snowflake import SnowflakeGenerator
from .bus._base import Bus, Delivery, Gap, Subscription

__all__ = ("Hub",)

logger = logging.getLogger("splitchat.gateway")


class Hub:
    """Channel -> local sessions routing over one bus subscription, with presence.

    Args:
        bus: the started bus to subscribe to.
        presence: channel membership.
        announce_presence: publish PRESENCE_UPDATE on first join / last leave.
        clock: monotonic seconds, passed to the machines on delivery.
        after: applies the actions a delivery produces (closes, checkpoints) without awaiting.
    """

    def __init__(
        self,
        bus: Bus,
        presence: Presence,
        *,
        announce_presence: bool,
        clock: Callable[[], float],
        after: Callable[[_Local, Sequence[Action]], None],
    ) -> None:
        self.bus = bus
        self.presence = presence
        self.announce_presence = announce_presence
        self.routes: dict[str, set[_Local]] = {}
        self.subscription: Subscription | None = None
        self._clock = clock
        self._after = after
        self._ids = SnowflakeGenerator(secrets.randbelow(1024))

    # ---- subscription ----------------------------------------------------------------------

    def open(self) -> Subscription:
        """Open the bus subscription (its channels follow :meth:`add` / :meth:`remove`)."""
        self.subscription = self.bus.subscribe()
        return self.subscription

    async def aclose(self) -> None:
        """Close the bus subscription (fan-out must have stopped)."""
        if self.subscription is not None:
            await self.subscription.aclose()

    async def run(self, subscription: Subscription) -> None:
        """Fan out everything ``subscription`` yields, until it ends or the task is cancelled."""
        async for item in subscription:
            try:
                self.fan_out(item)
            except Exception:  # a bug must not stop delivery to everyone else
                logger.exception("fan-out of an item on %r failed", item.channel)

    # ---- fan-out ---------------------------------------------------------------------------

    @staticmethod
    def decode(delivery: Delivery) -> Dispatch | None:
        """A bus delivery as a shareable dispatch; ``None`` (logged) if its event is undecodable."""
        try:
            event = decode_event(delivery.payload)
        except msgspec.DecodeError:
            logger.warning("undecodable event on channel %r dropped", delivery.channel)
            return None
        return Dispatch(
            event.type,
            bytes(event.data),
            event_id=event.id,
            channel=delivery.channel,
            nonce=event.nonce,
            position=delivery.position,
            ephemeral=event.ephemeral or delivery.position is None,
        )

    def fan_out(self, item: Delivery | Gap) -> None:
        """Hand one bus item to every session routed to its channel (never awaits)."""
        routes = self.routes.get(item.channel)
        if not routes:
            return
        now = self._clock()
        if isinstance(item, Gap):
            for local in list(routes):
                self._after(local, local.core.invalidate(now))
            return
        dispatch = self.decode(item)  # once per delivery, shared by every recipient
        if dispatch is None:
            return
        for local in routes:
            if dispatch.ephemeral and not local.attached:
                continue  # never replayed, so a session waiting for a resume skips them
            actions = local.core.deliver(dispatch, now)
            if actions:
                self._after(local, actions)
            elif local.attached:
                local.wake()

    # ---- routing ---------------------------------------------------------------------------

    async def add(self, local: _Local, channels: Sequence[str], *, announce: bool = True) -> None:
        """Route ``channels`` to ``local`` (subscribing the bus to the new ones) and join presence."""
        session = local.core.session
        if session is not None and self.bus.supports_history:
            # The resume seam of a channel with no delivery yet, read BEFORE routing: an event
            # published in between is then after the seam (replayed from history if missed),
            # never deduplicated away.
            for channel in channels:
                if channel not in session.positions:
                    try:
                        session.seed_position(channel, await self.bus.current_position(channel))
                    except Exception:
                        logger.debug("no current position for %r", channel, exc_info=True)
        new: list[str] = []
        for channel in channels:
            routes = self.routes.get(channel)
            if routes is None:
                routes = self.routes[channel] = set()
                new.append(channel)
            routes.add(local)
        if new and self.subscription is not None:
            await self.subscription.add(new)
        if announce:
            await self.presence_join(local, channels)

    async def remove(self, local: _Local, channels: Iterable[str], *, announce: bool = True) -> None:
        """Stop routing ``channels`` to ``local`` (unsubscribing the bus from the emptied ones)
        and leave presence."""
        empty: list[str] = []
        for channel in channels:
            routes = self.routes.get(channel)
            if routes is None:
                continue
            routes.discard(local)
            if not routes:
                del self.routes[channel]
                empty.append(channel)
        if empty and self.subscription is not None:
            try:
                await self.subscription.remove(empty)
            except Exception:
                logger.debug("hub remove failed", exc_info=True)
        if announce:
            await self.presence_leave(local, channels)

    def unroute(self, local: _Local, channels: Iterable[str]) -> None:
        """Stop routing to ``local`` at once, keeping the bus subscription (drain freezes sessions)."""
        for channel in channels:
            routes = self.routes.get(channel)
            if routes is not None:
                routes.discard(local)

    def move(self, old: _Local, new: _Local, channels: Iterable[str]) -> None:
        """Route ``channels`` to ``new`` instead of ``old`` in one step (same-node resume)."""
        for channel in channels:
            routes = self.routes.get(channel)
            if routes is not None:
                routes.discard(old)
                routes.add(new)

    # ---- presence --------------------------------------------------------------------------

    async def presence_join(self, local: _Local, channels: Iterable[str]) -> None:
        """Join presence on ``channels``; announce the principal's first join."""
        session = local.core.session
        if session is None:
            return
        for channel in channels:
            try:
                first = await self.presence.join(channel, session.principal, local.connection_id)
            except Exception:  # presence is advisory: its backend failing must not drop the client
                logger.warning("presence join failed on %r", channel, exc_info=True)
                continue
            if first:
                await self._announce(channel, session.principal, "online")

    async def presence_leave(self, local: _Local, channels: Iterable[str]) -> None:
        """Leave presence on ``channels``; announce the principal's last leave."""
        session = local.core.session
        if session is None:
            return
        for channel in channels:
            try:
                last = await self.presence.leave(channel, session.principal, local.connection_id)
            except Exception:  # the lease expires on its own
                logger.warning("presence leave failed on %r", channel, exc_info=True)
                continue
            if last:
                await self._announce(channel, session.principal, "offline")

    async def _announce(
        self, channel: str, principal: Principal, status: Literal["online", "offline"]
    ) -> None:
        await self.announce_identity(channel, principal.identity(), status)

    async def announce_identity(
        self, channel: str, identity: dict[str, Any], status: Literal["online", "offline"]
    ) -> None:
        """Publish PRESENCE_UPDATE (ephemeral) unless announcements are off; never raises."""
        if not self.announce_presence:
            return
        data = PresenceUpdatePayload(channel=channel, user=identity, status=status)
        payload = encode_event(
            id=self._ids.next_str(), type="PRESENCE_UPDATE", channel=channel, data=data, ephemeral=True
        )
        try:
            await self.bus.publish_ephemeral(channel, payload)
        except Exception:
            logger.debug("presence update not published", exc_info=True)
