"""A small sans-I/O RFC 6455 server side: the opening handshake and the frame codec.

Only what a gateway server needs: parse one HTTP/1.1 upgrade request, answer it, parse masked
client frames (fragmented messages reassembled, control frames interleaved), and build unmasked
server frame headers. No extensions (per-message compression is never negotiated: the gateway's
frames are small and compressing each per recipient would cost more CPU than the fan-out), no
subprotocols. Everything is bounded: the request head by ``MAX_REQUEST_HEAD`` bytes, a message by
the caller's ``max_message_bytes`` (checked on the declared length, before buffering the payload).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = (
    "MAX_REQUEST_HEAD",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameParser",
    "HandshakeError",
    "HandshakeRequest",
    "MessageTooLarge",
    "ProtocolError",
    "accept_response",
    "close_frame",
    "frame_header",
    "parse_close",
    "parse_request",
    "reject_response",
)

MAX_REQUEST_HEAD = 8192
"""Largest accepted HTTP request head (request line + headers), as in most HTTP servers."""

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPS = frozenset({OP_TEXT, OP_BINARY})
_CONTROL_OPS = frozenset({OP_CLOSE, OP_PING, OP_PONG})
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ProtocolError(Exception):
    """The peer broke RFC 6455 (unmasked frame, reserved bits, bad opcode...): close 1002."""


class MessageTooLarge(Exception):
    """A frame or reassembled message exceeds ``max_message_bytes``."""


class HandshakeError(Exception):
    """The upgrade request cannot be accepted; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class HandshakeRequest:
    """A valid WebSocket upgrade request (names lower-cased, values latin-1)."""

    path: str
    query: str
    key: str
    headers: dict[str, str]


def parse_request(head: bytes) -> HandshakeRequest:
    """Parse the request head (everything before the blank line) of a WebSocket upgrade.

    Raises :class:`HandshakeError` with the status to answer.
    """
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise HandshakeError(400, "malformed request line") from None
    if version != "HTTP/1.1":
        raise HandshakeError(400, "HTTP/1.1 required")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HandshakeError(400, "malformed header")
        key = name.lower()
        value = value.strip()
        # Repeated headers are joined with commas (RFC 9110 5.3).
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if method != "GET":
        raise HandshakeError(405, "GET required")
    path, _, query = target.partition("?")
    if "websocket" not in {v.strip().lower() for v in headers.get("upgrade", "").split(",")}:
        raise HandshakeError(426, "WebSocket upgrade required")
    if "upgrade" not in {v.strip().lower() for v in headers.get("connection", "").split(",")}:
        raise HandshakeError(426, "Connection: Upgrade required")
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "Sec-WebSocket-Version 13 required")
    key = headers.get("sec-websocket-key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        raise HandshakeError(400, "invalid Sec-WebSocket-Key")
    return HandshakeRequest(path=unquote(path), query=query, key=key, headers=headers)


def accept_response(key: str) -> bytes:
    """The 101 response completing the handshake for ``key``."""
    accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def reject_response(status: int, reason: str) -> bytes:
    """A complete HTTP error response (the connection is closed after it)."""
    body = reason.encode("latin-1", "replace")
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
    extra = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" if status == 426 else ""
    return f"{head}{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[426] = "Upgrade Required"
_REASONS[408] = "Request Timeout"
_REASONS[431] = "Request Header Fields Too Large"
_REASONS[503] = "Service Unavailable"

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def frame_header(opcode: int, length: int) -> bytes:
    """The header of an unmasked, final server frame carrying ``length`` payload bytes."""
    if length < 126:
        return _SHORT.pack(0x80 | opcode, length)
    if length < 65536:
        return _MEDIUM.pack(0x80 | opcode, 126, length)
    return _LONG.pack(0x80 | opcode, 127, length)


def close_frame(code: int, reason: str = "") -> bytes:
    """A complete close frame (the reason is cut to fit the 125-byte control payload)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return frame_header(OP_CLOSE, len(payload)) + payload


def parse_close(payload: bytes) -> int:
    """The status code of a close frame's payload (1005 when it carries none)."""
    if len(payload) >= 2:
        code: int = struct.unpack_from("!H", payload)[0]
        return code
    return 1005


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR over big integers: one C-level operation per frame instead of a Python loop per byte.
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameParser:
    """Incremental parser of masked client frames.

    :meth:`feed` takes raw bytes and returns the complete messages as ``(opcode, payload)``:
    ``OP_TEXT``/``OP_BINARY`` with the reassembled payload, or a control frame (``OP_PING``,
    ``OP_PONG``, ``OP_CLOSE``) as soon as it arrives. Raises :class:`ProtocolError` or
    :class:`MessageTooLarge`; after either the parser must not be fed again.
    """

    __slots__ = ("_buffer", "_fragments", "_fragments_size", "_message_op", "max_message_bytes")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._message_op: int | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Parse ``data``; return every message completed by it."""
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buffer)
        while end - pos >= 2:
            b0 = buffer[pos]
            b1 = buffer[pos + 1]
            fin = b0 & 0x80
            if b0 & 0x70:
                raise ProtocolError("reserved bits set (no extension was negotiated)")
            opcode = b0 & 0x0F
            if not b1 & 0x80:
                raise ProtocolError("client frames must be masked")
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (buffer[pos + 2] << 8) | buffer[pos + 3]
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                header = 10
            if opcode in _CONTROL_OPS:
                if not fin or length > 125:
                    raise ProtocolError("control frames must be final and at most 125 bytes")
            elif opcode in _DATA_OPS or opcode == OP_CONTINUATION:
                if length + self._fragments_size > self.max_message_bytes:
                    raise MessageTooLarge(f"message over {self.max_message_bytes} bytes")
            else:
                raise ProtocolError(f"unknown opcode {opcode}")
            total = header + 4 + length
            if end - pos < total:
                break
            mask = bytes(buffer[pos + header : pos + header + 4])
            payload = _unmask(bytes(buffer[pos + header + 4 : pos + total]), mask)
            pos += total
            if opcode in _CONTROL_OPS:
                out.append((opcode, payload))
                continue
            if opcode == OP_CONTINUATION:
                if self._message_op is None:
                    raise ProtocolError("continuation frame without a message")
            elif self._message_op is not None:
                raise ProtocolError("new message before the previous one was finished")
            else:
                self._message_op = opcode
            if fin and not self._fragments:
                out.append((self._message_op, payload))
                self._message_op = None
                continue
            self._fragments.append(payload)
            self._fragments_size += length
            if fin:
                out.append((self._message_op, b"".join(self._fragments)))
                self._fragments = []
                self._fragments_size = 0
                self._message_op = None
        del buffer[:pos]
        return out
