"""The gateway fast path (GatewayServer + the RFC 6455 codec) and bounded memory on every path.

The protocol scenarios (fan-out order, resume, close codes, 4010, msgpack, drain...) run against
the fast path in test_gateway_e2e.py (parametrised). Here: the codec (hypothesis), handshake
answers over a raw socket, WebSocket-level behaviour (ping, fragmentation, masking, oversized
frames), the compact replay buffer, and that a client that stops reading is cut with 4010 while
the gateway's own accounting of its bytes stays bounded, under uvicorn's WebSocket
implementations and on the fast path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from collections import deque
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings, strategies as st

import splitchat
from splitchat import (
    Dispatch,
    Gateway,
    GatewayConnection,
    GatewayServer,
    InMemoryBus,
    Position,
    serve_gateway,
)
from splitchat._protocol import ReplayBuffer
from splitchat._websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    HandshakeError,
    MessageTooLarge,
    ProtocolError,
    accept_response,
    frame_header,
    parse_request,
)

from .gateway_harness import (
    RawClient,
    Server,
    authenticator,
    close_all,
    identify,
    make_app,
    post,
    recv,
    serve,
    wait_until,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # GatewayServer and uvicorn are asyncio-only


def masked(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A client frame (masked), any length."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


# ---- the codec ------------------------------------------------------------------------------

_message = st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=300), st.integers(1, 4))


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(_message, min_size=1, max_size=6),
    pings=st.lists(st.binary(max_size=125), max_size=3),
    cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=40),
    mask=st.binary(min_size=4, max_size=4),
)
def test_parser_reassembles_fragmented_messages_across_any_split(
    messages: list[tuple[int, bytes, int]], pings: list[bytes], cuts: list[int], mask: bytes
) -> None:
    stream = b""
    expected: list[tuple[int, bytes]] = []
    for index, (opcode, payload, pieces) in enumerate(messages):
        size = max(1, len(payload) // pieces)
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        for number, chunk in enumerate(chunks):
            last = number == len(chunks) - 1
            stream += masked(opcode if number == 0 else 0, chunk, fin=last, mask=mask)
            if last:
                expected.append((opcode, payload))
            if number == 0 and index < len(pings):  # a control frame, inside a fragmented message
                stream += masked(OP_PING, pings[index], mask=mask)
                expected.append((OP_PING, pings[index]))
    parser = FrameParser(max_message_bytes=300)
    got: list[tuple[int, bytes]] = []
    position = 0
    for cut in cuts:
        got += parser.feed(stream[position : position + cut])
        position += cut
    got += parser.feed(stream[position:])
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parser_never_fails_other_than_by_its_documented_errors(data: bytes) -> None:
    parser = FrameParser(max_message_bytes=128)
    try:
        for message in parser.feed(data):
            assert message[0] in (OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE)
    except (ProtocolError, MessageTooLarge):
        pass


def test_parser_rejects_what_rfc_6455_forbids() -> None:
    for bad in (
        struct.pack("!BB", 0x81, 3) + b"abc",  # unmasked client frame
        bytes([0xC1, 0x80]) + b"\0\0\0\0",  # RSV1 without an extension
        bytes([0x83, 0x80]) + b"\0\0\0\0",  # reserved opcode
        masked(OP_PING, b"x", fin=False),  # fragmented control frame
        masked(OP_PING, b"x" * 126),  # control frame too long
        masked(0, b"x"),  # continuation without a message
        masked(OP_TEXT, b"a", fin=False) + masked(OP_TEXT, b"b"),  # new message inside one
    ):
        with pytest.raises(ProtocolError):
            FrameParser(1000).feed(bad)
    # The declared length is checked before the payload arrives: nothing is buffered for it.
    with pytest.raises(MessageTooLarge):
        FrameParser(1000).feed(struct.pack("!BBQ", 0x81, 0xFF, 1 << 40))
    with pytest.raises(MessageTooLarge):
        FrameParser(10).feed(masked(OP_TEXT, b"x" * 6, fin=False) + masked(0, b"y" * 6))


def test_frame_header_lengths() -> None:
    assert frame_header(OP_TEXT, 5) == b"\x81\x05"
    assert frame_header(OP_BINARY, 300) == b"\x82\x7e\x01\x2c"
    assert frame_header(OP_TEXT, 70000) == b"\x81\x7f" + (70000).to_bytes(8, "big")


def _request(**overrides: str | None) -> bytes:
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
        "Sec-WebSocket-Version": "13",
    }
    for name, value in overrides.items():
        key = name.replace("_", "-")
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    lines = ["GET /gateway?encoding=msgpack HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines).encode()


def test_handshake_parse_and_answers() -> None:
    request = parse_request(_request())
    assert (request.path, request.query) == ("/gateway", "encoding=msgpack")
    # RFC 6455 section 1.3's example key and accept value.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in accept_response(
        "dGhlIHNhbXBsZSBub25jZQ=="
    )
    for overrides, status in (
        ({"Upgrade": None}, 426),
        ({"Connection": "keep-alive"}, 426),
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Sec-WebSocket-Key": "short"}, 400),
        ({"Sec-WebSocket-Key": None}, 400),
    ):
        with pytest.raises(HandshakeError) as info:
            parse_request(_request(**overrides))
        assert info.value.status == status, overrides
    with pytest.raises(HandshakeError) as info:
        parse_request(b"POST /gateway HTTP/1.1\r\nHost: x")
    assert info.value.status == 405


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_handshake_parser_only_raises_handshake_errors(head: bytes) -> None:
    try:
        parse_request(head)
    except HandshakeError as exc:
        assert 400 <= exc.status < 500


# ---- the compact replay buffer ----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["append", "popleft", "clear"]), st.integers(1, 3), st.integers(-1, 5)),
        max_size=60,
    )
)
def test_replay_buffer_behaves_like_a_deque_of_tuples(steps: list[tuple[str, int, int]]) -> None:
    buffer = ReplayBuffer()
    model: deque[tuple[int, float, Dispatch, Position | None]] = deque()
    seq = 0
    for op, step, offset in steps:
        if op == "append" or not model:
            seq += step  # a step > 1: ephemeral dispatches in between were not buffered
            previous = None if offset < 0 else Position(1, offset)  # the crash-checkpoint seam
            entry = (seq, float(seq), Dispatch("T", b"{}"), previous)
            buffer.append(entry)
            model.append(entry)
        elif op == "popleft":
            assert buffer.popleft() == model.popleft()
        else:
            buffer.clear()
            model.clear()
        assert list(buffer) == list(model)
        assert len(buffer) == len(model) and bool(buffer) == bool(model)
        if model:
            assert buffer.oldest_time() == model[0][1]


# ---- the fast path over real sockets ------------------------------------------------------------


async def _fast_gateway(**options: Any) -> tuple[InMemoryBus, Gateway, GatewayServer]:
    bus = InMemoryBus()
    await bus.start()
    gateway = Gateway(bus, authenticator, **options)
    await gateway.start()
    server = GatewayServer(gateway)
    await server.start()
    return bus, gateway, server


async def _stop(bus: InMemoryBus, gateway: Gateway, server: GatewayServer) -> None:
    await gateway.drain()
    await server.close()
    await gateway.close()
    await bus.close()


async def _raw(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request + b"\r\n\r\n")
    with anyio.fail_after(5):
        head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    with anyio.fail_after(5):
        b0, b1 = await reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        assert not b1 & 0x80, "server frames are never masked"
        return b0 & 0x0F, await reader.readexactly(length)


async def test_handshake_rejections_over_a_socket() -> None:
    bus, gateway, server = await _fast_gateway(allowed_origins=["https://app.example"])
    try:
        cases = [
            (_request().replace(b"/gateway?", b"/other?"), b" 404 "),
            (_request(Upgrade=None), b" 426 "),
            (_request(Sec_WebSocket_Key="bad"), b" 400 "),
            (_request(Origin="https://evil.example"), b" 403 "),
            (_request().replace(b"encoding=msgpack", b"encoding=xml"), b" 403 "),
        ]
        for request, status in cases:
            reader, writer, head = await _raw(server.port, request)
            assert status in head.split(b"\r\n")[0], (request, head)
            await _close(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /gateway HTTP/1.1\r\n" + b"X-Filler: " + b"x" * 9000)
        with anyio.fail_after(5):
            assert b" 431 " in await reader.readline()
        await _close(writer)
        assert gateway.connection_count == 0
    finally:
        await _stop(bus, gateway, server)


async def test_ping_fragmented_identify_and_close_handshake() -> None:
    bus, gateway, server = await _fast_gateway()
    try:
        reader, writer, head = await _raw(server.port, _request().replace(b"msgpack", b"json"))
        assert head.startswith(b"HTTP/1.1 101 ")
        opcode, hello = await _read_frame(reader)
        assert opcode == OP_TEXT and b'"op":10' in hello
        writer.write(masked(OP_PING, b"hi"))
        assert await _read_frame(reader) == (OP_PONG, b"hi")
        identify_frame = b'{"op":2,"d":{"token":"token-1","subscriptions":["room"]}}'
        writer.write(masked(OP_TEXT, identify_frame[:10], fin=False) + masked(0, identify_frame[10:]))
        opcode, ready = await _read_frame(reader)
        assert b'"t":"READY"' in ready and b'"s":1}' in ready
        writer.write(masked(OP_CLOSE, struct.pack("!H", 1000)))
        frame = await _read_frame(reader)
        while frame[0] != OP_CLOSE:  # the own PRESENCE_UPDATE may come first
            frame = await _read_frame(reader)
        assert frame == (OP_CLOSE, struct.pack("!H", 1000))
        with anyio.fail_after(5):
            assert await reader.read() == b""  # the server closes the TCP connection
        await _close(writer)
        await wait_until(lambda: not gateway.session_ids())  # a client close 1000 ends the session
    finally:
        await _stop(bus, gateway, server)


async def test_unmasked_frame_is_a_protocol_error_1002() -> None:
    bus, gateway, server = await _fast_gateway()
    try:
        reader, writer, _ = await _raw(server.port, _request())
        await _read_frame(reader)  # HELLO
        writer.write(struct.pack("!BB", 0x81, 2) + b"{}")
        opcode, payload = await _read_frame(reader)
        assert opcode == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == 1002
        await _close(writer)
    finally:
        await _stop(bus, gateway, server)


# ---- slow consumers: 4010 and bounded bytes, whatever serves the gateway --------------------------


@pytest.mark.parametrize("transport", ["uvicorn-auto", "uvicorn-wsproto", "fast"])
async def test_client_that_stops_reading_gets_4010_with_bounded_bytes(transport: str) -> None:
    """A client that stops reading must not make the server hold its backlog: its bytes in user
    space are bounded (the gateway's outbox by ``send_queue_bytes``; on the fast path the
    transport's buffer by ``write_buffer_limit`` + one batch) and it is closed with 4010 while a
    healthy client gets every event."""
    queue_bytes = 256 * 1024
    padding = "x" * 16_000
    events = 200  # 3.2 MB in total: far beyond every bound and the kernel's socket buffers
    async with InMemoryBus() as bus:
        gateway = Gateway(bus, authenticator, send_queue_bytes=queue_bytes, send_queue_frames=10_000)
        async with gateway:
            ws = {"uvicorn-auto": "auto", "uvicorn-wsproto": "wsproto"}.get(transport, "websockets-sansio")
            fast = gateway if transport == "fast" else None
            async with serve(make_app(bus, gateway), fast=fast, ws=ws) as server:
                await _slow_consumer_scenario(server, gateway, transport, queue_bytes, padding, events)


async def _slow_consumer_scenario(
    server: Server, gateway: Gateway, transport: str, queue_bytes: int, padding: str, events: int
) -> None:
    stalled = RawClient(server)
    await stalled.open()
    assert (await stalled.recv() or {}).get("op") == 10
    await stalled.send({"op": 2, "d": {"token": "token-0", "subscriptions": ["room"]}})
    ready = await stalled.recv()
    assert ready is not None and ready["t"] == "READY"
    session_id = ready["d"]["session_id"]
    core = gateway.connection_of(session_id)
    assert isinstance(core, GatewayConnection)
    healthy, _ = await identify(server, token="token-1", channels=["room"])
    got: list[int] = []

    async def reader() -> None:
        while len(got) < events:
            frame = await recv(healthy, timeout=30)
            if frame.get("t") == "MESSAGE_CREATE":
                got.append(frame["d"]["n"])

    peak_outbox = peak_transport = 0
    async with httpx.AsyncClient(base_url=server.base) as http, anyio.create_task_group() as tg:
        tg.start_soon(reader)
        for n in range(events):
            await post(http, "room", {"n": n, "pad": padding})
            peak_outbox = max(peak_outbox, core.outbox_bytes)
            if transport == "fast":
                for protocol in list(_gateway_servers_protocols(gateway)):
                    if protocol.transport is not None and not protocol.transport.is_closing():
                        peak_transport = max(peak_transport, protocol.transport.get_write_buffer_size())
    assert got == list(range(events))
    assert core.close_code == 4010
    assert 0 < peak_outbox <= queue_bytes
    if transport == "fast":
        # write_buffer_limit (64 KiB) + at most one batch that crossed it (one 16 KB frame + HELLO...)
        assert peak_transport <= 64 * 1024 + 32 * 1024
    with anyio.fail_after(15):
        while await stalled.recv() is not None:
            pass
    assert stalled.close_code == 4010
    stalled.close()
    await close_all([healthy])


def _gateway_servers_protocols(gateway: Gateway) -> list[Any]:
    from splitchat._gateway_server import _FastLocal

    return [local.protocol for local in gateway._connections if isinstance(local, _FastLocal)]


async def test_idle_fast_path_connection_holds_no_task() -> None:
    """No task per connection: once 50 clients are identified, no task of the server is alive."""
    bus, gateway, server = await _fast_gateway()
    try:
        before = _splitchat_tasks()
        harness: Any = _PortOnly(server.port)
        clients = [(await identify(harness, token=f"token-{i}", channels=["room"]))[0] for i in range(50)]
        assert gateway.connection_count == 50
        await asyncio.sleep(0.05)
        try:
            assert _splitchat_tasks() == before  # the hub and expiry tasks only, with 0 or 50 clients
        finally:
            await close_all(clients)
    finally:
        await _stop(bus, gateway, server)


def _splitchat_tasks() -> list[str]:
    """Names of the running tasks whose coroutine is splitchat's own code.

    Matched by the package's directory, not by the word "splitchat" in a path: a checkout named
    ``splitchat`` with its venv inside would otherwise count websockets' and anyio's tasks too.
    """
    package_dir = str(Path(splitchat.__file__).resolve().parent) + os.sep
    names = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and str(Path(code.co_filename).resolve()).startswith(package_dir):
            names.append(code.co_qualname)
    return sorted(names)


class _PortOnly:
    def __init__(self, port: int) -> None:
        self.port = self.ws_port = port

    def ws_url(self, encoding: str = "json") -> str:
        return f"ws://127.0.0.1:{self.port}/gateway?encoding={encoding}"


async def test_serve_gateway_runs_a_gateway_until_cancelled() -> None:
    import socket

    with socket.socket() as probe:  # a free port (serve_gateway takes a port number, like uvicorn)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with InMemoryBus() as bus:
        gateway = Gateway(bus, authenticator)
        task = asyncio.create_task(serve_gateway(gateway, "127.0.0.1", port))
        try:
            harness: Any = _PortOnly(port)
            with anyio.fail_after(5):
                while True:
                    try:
                        ws, ready = await identify(harness, channels=["room"])
                        break
                    except OSError:
                        await asyncio.sleep(0.02)  # not listening yet
            assert ready["d"]["subscriptions"] == ["room"]
            await ws.close()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert gateway.connection_count == 0
