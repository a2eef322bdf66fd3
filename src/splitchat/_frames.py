"""Pure codec of gateway frames for the two encodings (JSON text frames, msgpack binary frames).

Decoding enforces the frame size limit *before* parsing, so an oversized frame costs nothing.
Encoding of bus events is done once per delivery (see :class:`Dispatch`): the frame is built as
a prefix and a suffix around the only per-session value, the sequence number ``s``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = (
    "ClientFrame",
    "Dispatch",
    "Encoding",
    "FrameError",
    "OutFrame",
    "decode_client_frame",
    "encode_control",
)

Encoding = Literal["json", "msgpack"]
OutFrame = str | bytes
"""An encoded server frame: ``str`` for JSON text frames, ``bytes`` for msgpack binary frames."""


class ClientFrame(msgspec.Struct, frozen=True):
    """A decoded client frame ``{"op", "d"}`` (``s``/``t`` are ignored from clients)."""

    op: int
    d: Any = None


class FrameError(Exception):
    """A client frame that cannot be accepted: too large or undecodable (close 4002)."""


_json_decoder = msgspec.json.Decoder(ClientFrame)
_msgpack_decoder = msgspec.msgpack.Decoder(ClientFrame)
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def decode_client_frame(data: str | bytes, encoding: Encoding, max_frame_bytes: int) -> ClientFrame:
    """Decode one client frame, raising :class:`FrameError` when too large or malformed.

    The size is checked before any work: a text frame of n characters is at least n UTF-8 bytes,
    so ``len(str)`` over the limit is rejected without encoding it; only a str within the limit
    is encoded and its byte length checked again.
    """
    if len(data) > max_frame_bytes:
        unit = "characters" if isinstance(data, str) else "bytes"
        raise FrameError(f"frame of {len(data)} {unit} exceeds {max_frame_bytes} bytes")
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_frame_bytes:
        raise FrameError(f"frame of {len(raw)} bytes exceeds {max_frame_bytes}")
    try:
        if encoding == "json":
            return _json_decoder.decode(raw)
        return _msgpack_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FrameError(f"undecodable frame: {exc}") from None


def encode_control(
    encoding: Encoding, op: int, d: Any = None, s: int | None = None, t: str | None = None
) -> OutFrame:
    """Encode a gateway-originated frame (HELLO, HEARTBEAT_ACK, READY, ...)."""
    frame = {"op": op, "d": d, "s": s, "t": t}
    if encoding == "json":
        return _json_encoder.encode(frame).decode()
    return _msgpack_encoder.encode(frame)


class Dispatch:
    """One op-0 payload shared by every recipient; rendered per session with only ``s`` differing.

    ``data`` is the raw JSON of ``d``. For bus events ``event_id``/``channel``/``nonce`` are the
    extra top-level keys of the wire protocol; ``position`` is the bus position (``None`` for
    ephemeral or gateway-made dispatches). Each encoding's prefix is computed at most once, the
    first time a session of that encoding needs it.
    """

    __slots__ = (
        "_json_prefix",
        "_json_prefix_bytes",
        "_msgpack_prefix",
        "channel",
        "data",
        "ephemeral",
        "event_id",
        "nonce",
        "position",
        "t",
    )

    def __init__(
        self,
        t: str,
        data: bytes,
        *,
        event_id: str | None = None,
        channel: str | None = None,
        nonce: str | None = None,
        position: Any = None,
        ephemeral: bool = False,
    ) -> None:
        self.t = t
        self.data = data
        self.event_id = event_id
        self.channel = channel
        self.nonce = nonce
        self.position = position
        self.ephemeral = ephemeral
        self._json_prefix: str | None = None
        self._json_prefix_bytes: bytes | None = None
        self._msgpack_prefix: bytes | None = None

    @classmethod
    def of(cls, t: str, d: Any, *, ephemeral: bool = False, channel: str | None = None) -> Dispatch:
        """A gateway-made dispatch (READY, SUBSCRIBED, ...) from a Python value."""
        return cls(t, _json_encoder.encode(d), ephemeral=ephemeral, channel=channel)

    def _extras(self) -> list[tuple[str, str]]:
        extras: list[tuple[str, str]] = []
        if self.event_id is not None:
            extras.append(("id", self.event_id))
        if self.channel is not None and self.event_id is not None:
            extras.append(("channel", self.channel))
        if self.nonce is not None:
            extras.append(("nonce", self.nonce))
        return extras

    def json_prefix(self) -> str:
        """The JSON frame up to the value of ``s`` (which is the last key)."""
        if self._json_prefix is None:
            parts = [b'{"op":0,"t":', _json_encoder.encode(self.t), b',"d":', self.data]
            for key, value in self._extras():
                parts += [b',"', key.encode(), b'":', _json_encoder.encode(value)]
            parts.append(b',"s":')
            self._json_prefix = b"".join(parts).decode()
        return self._json_prefix

    def json_prefix_bytes(self) -> bytes:
        """:meth:`json_prefix` as UTF-8 bytes (for I/O layers writing bytes to a transport)."""
        if self._json_prefix_bytes is None:
            self._json_prefix_bytes = self.json_prefix().encode()
        return self._json_prefix_bytes

    def msgpack_prefix(self) -> bytes:
        """The msgpack map header and every entry but ``s``; ``d`` is transcoded once here."""
        if self._msgpack_prefix is None:
            entries: list[tuple[str, Any]] = [("op", 0), ("t", self.t), ("d", msgspec.json.decode(self.data))]
            entries += self._extras()
            count = len(entries) + 1  # + "s"
            # fixmap header (count < 16 always: at most 7 keys)
            body = b"".join(_msgpack_encoder.encode(k) + _msgpack_encoder.encode(v) for k, v in entries)
            self._msgpack_prefix = bytes([0x80 | count]) + body + _msgpack_encoder.encode("s")
        return self._msgpack_prefix

    def render(self, encoding: Encoding, seq: int) -> OutFrame:
        """This dispatch as one session's frame with sequence number ``seq``."""
        if encoding == "json":
            return f"{self.json_prefix()}{seq}}}"
        return self.msgpack_prefix() + _msgpack_encoder.encode(seq)

    def approximate_size(self) -> int:
        """Bytes the frame takes on the wire (for queue accounting), without rendering it."""
        return (
            len(self.data)
            + len(self.t)
            + 64
            + (len(self.event_id or "") + len(self.channel or "") if self.event_id else 0)
        )
