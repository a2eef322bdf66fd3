"""A minimal, cheap WebSocket client on asyncio protocols, so the load generator is not the bottleneck.

The ``websockets`` client costs tens of microseconds per received message in Python; with 1,000
clients x 200 posts that is seconds of generator CPU and it would measure itself. This client
parses server frames (never masked) straight out of ``data_received``, timestamps a whole TCP read
at once, and decodes only the two integers it needs with a typed msgspec decoder. It offers no
compression (no ``Sec-WebSocket-Extensions``), so every contender sends plain frames.

Each contender speaks its own framing on top of WebSocket; a :class:`Dialect` turns frames into
"ready" and "delivery(seq, sent_ns)" and answers the protocol's keep-alives.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec

__all__ = ("DIALECTS", "Dialect", "WsClient", "connect")

Sink = Callable[[int, int, int, int], None]
"""``sink(client_index, seq, sent_ns, recv_ns)`` records one delivery."""


class Body(msgspec.Struct):
    """The part of the benchmark payload the generator reads back (other fields are ignored)."""

    seq: int
    sent_ns: int


class PlainMessage(msgspec.Struct):
    """The peers' outgoing JSON: ``{"t": "READY"}`` once subscribed, then ``{"t", "channel", "d"}``."""

    t: str
    d: Body | None = None


class GatewayFrame(msgspec.Struct):
    """A splitchat gateway frame; ``d`` stays raw until ``op``/``t`` say what it is."""

    op: int
    d: msgspec.Raw = msgspec.Raw(b"null")
    s: int | None = None
    t: str | None = None


class WsClient(asyncio.Protocol):
    """One WebSocket connection: handshake, frame parsing, masked client frames."""

    def __init__(self, *, host: str, port: int, path: str, dialect: Dialect, index: int, sink: Sink) -> None:
        self.host, self.port, self.path = host, port, path
        self.dialect, self.index, self.sink = dialect, index, sink
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.closed = False
        self.buffer = bytearray()
        self.fragments: list[bytes] = []
        self.state: dict[str, Any] = {}
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before ready: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buf = self.buffer
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            del buf[: end + 4]
            if b" 101 " not in status + b" ":
                self.fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self.upgraded = True
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4])
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10])
                head = 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            self.frame(b0 & 0x80, b0 & 0x0F, payload, now)
            if self.closed:
                break
        del buf[:pos]

    # -- frames ----------------------------------------------------------------------------
    def frame(self, fin: int, opcode: int, payload: bytes, now: int) -> None:
        if opcode in (1, 2, 0):
            if not fin:
                self.fragments.append(payload)
                return
            if self.fragments:
                payload = b"".join([*self.fragments, payload])
                self.fragments.clear()
            try:
                self.dialect.on_message(self, payload, now)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                self.fail(f"undecodable message {payload[:80]!r}: {exc}")
        elif opcode == 8:
            code = int.from_bytes(payload[:2]) if len(payload) >= 2 else 1005
            self.fail(f"server closed the connection with code {code}")
        elif opcode == 9:
            self.send(payload, opcode=10)

    def send(self, payload: bytes, opcode: int = 1) -> None:
        """Send one masked frame (client frames must be masked, RFC 6455 5.3)."""
        if self.transport is None or self.closed:
            return
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload) ^ int.from_bytes(repeated)).to_bytes(n) if n else b""
        self.transport.write(header + mask + masked)

    def fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        self.close()

    def close(self) -> None:
        """Send a normal close frame (1000) and drop the connection."""
        if self.closed or self.transport is None:
            return
        if self.upgraded:
            self.send(struct.pack("!H", 1000), opcode=8)
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.transport.close()

    def pause(self) -> None:
        """Stop reading: the slow-consumer scenario's misbehaving client."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        """Read again (to find out whether the server closed this connection meanwhile)."""
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


class Dialect:
    """Turns a contender's messages into ready/delivery events. Subclasses override ``on_message``."""

    name = "plain"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def path(self, channel: str) -> str:
        return f"{self.options.get('ws_path', '/ws')}?channel={channel}"

    def on_message(self, client: WsClient, payload: bytes, now: int) -> None:
        raise NotImplementedError


class PlainDialect(Dialect):
    """The peers' JSON: ``{"t":"READY"}`` after the server subscribed us, then ``{"t","channel","d"}``."""

    name = "plain"
    _decode = msgspec.json.Decoder(PlainMessage).decode

    def on_message(self, client: WsClient, payload: bytes, now: int) -> None:
        message = self._decode(payload)
        if message.d is not None:
            client.sink(client.index, message.d.seq, message.d.sent_ns, now)
        elif message.t == "READY" and not client.ready.done():
            client.ready.set_result(None)


class SocketIODialect(Dialect):
    """Engine.IO v4 / Socket.IO v5 over a bare WebSocket transport (no long-polling)."""

    name = "socketio"
    _decode_event = msgspec.json.Decoder(tuple[str, Body]).decode

    def path(self, channel: str) -> str:
        return f"/socket.io/?EIO=4&transport=websocket&channel={channel}"

    def on_message(self, client: WsClient, payload: bytes, now: int) -> None:
        kind = payload[:1]
        if kind == b"4":  # engine.io MESSAGE carrying a socket.io packet
            packet = payload[1:2]
            if packet == b"2":  # EVENT: 42["MESSAGE_CREATE", {...}]
                _, body = self._decode_event(payload[2:])
                client.sink(client.index, body.seq, body.sent_ns, now)
            elif packet == b"0" and not client.ready.done():  # CONNECT ack: the room was joined
                client.ready.set_result(None)
            elif packet in (b"1", b"4"):
                client.fail(f"socket.io refused: {payload[:80]!r}")
        elif kind == b"0":  # engine.io OPEN: connect to the default namespace
            client.send(b"40")
        elif kind == b"2":  # engine.io PING from the server: answer PONG
            client.send(b"3")


class SplitchatDialect(Dialect):
    """The splitchat gateway protocol: HELLO -> IDENTIFY(token, subscriptions) -> READY, heartbeats."""

    name = "splitchat"
    _decode_frame = msgspec.json.Decoder(GatewayFrame).decode
    _decode_body = msgspec.json.Decoder(Body).decode
    _decode_any = msgspec.json.Decoder().decode
    _encode = msgspec.json.Encoder().encode

    def path(self, channel: str) -> str:
        return f"{self.options.get('ws_path', '/gateway')}?encoding=json"

    def on_message(self, client: WsClient, payload: bytes, now: int) -> None:
        frame = self._decode_frame(payload)
        if frame.s is not None:
            client.state["seq"] = frame.s
        if frame.op == 0:
            if frame.t == "READY":
                ready = self._decode_any(frame.d)
                channel = self.options["channel"]
                if channel not in ready.get("subscriptions", []):
                    client.fail(f"gateway did not grant {channel!r}: {ready.get('denied')}")
                elif not client.ready.done():
                    client.ready.set_result(None)
            elif frame.t == self.options.get("event_type", "MESSAGE_CREATE"):
                body = self._decode_body(frame.d)
                client.sink(client.index, body.seq, body.sent_ns, now)
        elif frame.op == 10:  # HELLO
            hello = self._decode_any(frame.d)
            identify = {"token": self.options["token"], "subscriptions": [self.options["channel"]]}
            client.send(self._encode({"op": 2, "d": identify, "s": None, "t": None}))
            self._schedule_heartbeat(client, hello["heartbeat_interval"] / 1000)
        elif frame.op == 1:
            self._heartbeat(client, None)
        elif frame.op in (7, 9):
            client.fail(f"gateway sent op {frame.op}")

    def _schedule_heartbeat(self, client: WsClient, interval: float) -> None:
        loop = asyncio.get_running_loop()
        client.timer = loop.call_later(interval * 0.8, self._heartbeat, client, interval)

    def _heartbeat(self, client: WsClient, interval: float | None) -> None:
        client.send(self._encode({"op": 1, "d": client.state.get("seq"), "s": None, "t": None}))
        if interval is not None and not client.closed:
            self._schedule_heartbeat(client, interval)


DIALECTS: dict[str, type[Dialect]] = {d.name: d for d in (PlainDialect, SocketIODialect, SplitchatDialect)}


async def connect(
    *,
    host: str,
    port: int,
    dialect: Dialect,
    channel: str,
    index: int,
    sink: Sink,
    timeout: float,
    receive_buffer: int | None = None,
) -> WsClient:
    """Open one client and wait until the contender says it is subscribed to ``channel``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if receive_buffer is not None:  # a slow consumer with a small kernel buffer backs up sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    path = dialect.path(channel)
    _, client = await loop.create_connection(
        lambda: WsClient(host=host, port=port, path=path, dialect=dialect, index=index, sink=sink), sock=sock
    )
    try:
        await asyncio.wait_for(asyncio.shield(client.ready), timeout)
    except BaseException:
        client.close()
        raise
    return client
