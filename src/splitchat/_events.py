"""The event envelope: what the command endpoint publishes and the gateway dispatches.

A bus carries opaque ``bytes``; splitchat's own components put a JSON-encoded :class:`Event`
there. ``data`` stays raw JSON (``msgspec.Raw``) so the gateway can splice it into every
dispatch frame without decoding and re-encoding it per recipient.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ("Event", "decode_event", "encode_event")


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One application event on a channel.

    Attributes:
        id: stable event id (a snowflake string), the same on every node and on replay.
        type: dispatch name, e.g. ``MESSAGE_CREATE``; becomes the frame's ``t``.
        channel: the channel it was published to.
        data: the JSON-encoded payload; becomes the frame's ``d``.
        nonce: the client's nonce from the command that caused it, for optimistic-UI reconciliation.
        ephemeral: not kept in history and never replayed (typing indicators).
    """

    id: str
    type: str
    channel: str
    data: msgspec.Raw
    nonce: str | None = None
    ephemeral: bool = False


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode_event(
    *,
    id: str,
    type: str,
    channel: str,
    data: Any,
    nonce: str | None = None,
    ephemeral: bool = False,
) -> bytes:
    """Encode an event for the bus; ``data`` is any msgspec-encodable value."""
    raw = msgspec.Raw(_encoder.encode(data))
    event = Event(id=id, type=type, channel=channel, data=raw, nonce=nonce, ephemeral=ephemeral)
    return _encoder.encode(event)


def decode_event(payload: bytes) -> Event:
    """Decode a bus payload written by :func:`encode_event` (raises ``msgspec.DecodeError``)."""
    return _decoder.decode(payload)
