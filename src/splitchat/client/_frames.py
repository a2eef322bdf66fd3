"""Gateway frame vocabulary and codec for the client side (pure, no I/O).

Every frame is ``{"op", "d", "s", "t"}``; dispatches of bus events carry three extra top-level
keys (``id``, ``channel``, ``nonce``). The same :class:`Frame` struct decodes both encodings, so
the rest of the client never looks at bytes.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Literal

import msgspec

# One definition of the opcodes for both sides of the wire (the gateway's pure vocabulary module).
from .._protocol_types import Op as Opcode

__all__ = (
    "CloseCode",
    "Encoding",
    "Frame",
    "FrameCodec",
    "FrameDecodeError",
    "Opcode",
)

Encoding = Literal["json", "msgpack"]


class CloseCode(IntEnum):
    """Gateway close codes (fixed wire protocol)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNKNOWN_ERROR = 4000
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    INVALID_SEQ = 4007
    RATE_LIMITED = 4008
    SESSION_TIMED_OUT = 4009
    SLOW_CONSUMER = 4010


class Frame(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One gateway frame as seen by the client.

    ``id``/``channel``/``nonce`` are only present on dispatches of bus events.
    """

    op: int
    d: Any = None
    s: int | None = None
    t: str | None = None
    id: str | None = None
    channel: str | None = None
    nonce: Any = None


class FrameDecodeError(ValueError):
    """A frame from the server could not be decoded (wrong encoding, not an object, no ``op``)."""


class FrameCodec:
    """Encode client frames and decode server frames in one of the two wire encodings.

    ``json`` frames travel as WebSocket text messages, ``msgpack`` frames as binary messages.
    """

    def __init__(self, encoding: Encoding = "json") -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"unknown gateway encoding {encoding!r}")
        self.encoding: Encoding = encoding
        self._json_decoder = msgspec.json.Decoder(Frame)
        self._msgpack_decoder = msgspec.msgpack.Decoder(Frame)
        self._json_encoder = msgspec.json.Encoder()
        self._msgpack_encoder = msgspec.msgpack.Encoder()

    def encode(self, op: int, d: Any = None) -> str | bytes:
        """Encode a client-to-server frame (client frames never carry ``s``/``t``)."""
        frame = {"op": int(op), "d": d}
        if self.encoding == "json":
            return self._json_encoder.encode(frame).decode()
        return self._msgpack_encoder.encode(frame)

    def decode(self, message: str | bytes) -> Frame:
        """Decode a server frame; raise :class:`FrameDecodeError` for anything malformed.

        Either message type is accepted whatever the negotiated encoding: text is always JSON,
        binary is always msgpack, so a server that answers an error in JSON is still understood.
        """
        try:
            if isinstance(message, str):
                return self._json_decoder.decode(message)
            return self._msgpack_decoder.decode(message)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise FrameDecodeError(str(exc)) from exc
