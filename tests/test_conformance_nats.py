"""NatsBus against the real NATS JetStream on 127.0.0.1:4222 (conformance kit) and private servers."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import anyio
import nats
import pytest
from hypothesis import given, strategies as st
from nats.aio.msg import Msg

from splitchat import Bus, BusUnavailable, Delivery, Gap, HistoryGone, Position, Subscription, bus_from_url
from splitchat.bus.nats import NatsBus, channel_token, token_channel
from splitchat.testing import BusConformance

from ._servers import PrivateServer, free_port, nats_server

pytestmark = pytest.mark.nats

SHARED = "nats://127.0.0.1:4222"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _delete_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        try:
            await nc.jsm().delete_stream(stream)
        except nats.js.errors.NotFoundError:
            pass
    finally:
        await nc.close()


@pytest.fixture
async def names() -> AsyncIterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:10]
    stream, prefix = f"SPLITCHAT_TEST_{suffix}", f"sctest{suffix}"
    yield stream, prefix
    await _delete_stream(SHARED, stream)


class TestNatsBusConformance(BusConformance):
    history_capacity = 20
    # The default NATS max_payload is 1 MiB including headers: "about 1 MiB".
    large_payload_bytes: ClassVar[int] = 1_000_000

    @pytest.fixture
    async def bus(self, names: tuple[str, str]) -> AsyncIterator[Bus]:
        stream, prefix = names
        async with NatsBus(SHARED, stream=stream, subject_prefix=prefix, history_size=20) as b:
            yield b


class TestNatsBusRestartConformance(BusConformance):
    """The whole kit on a private server, with break_connection = kill -9 and restart the server."""

    history_capacity = 20
    large_payload_bytes: ClassVar[int] = 1_000_000

    @pytest.fixture
    async def bus(self, tmp_path: Path) -> AsyncIterator[Bus]:
        self.server = nats_server(tmp_path)
        self.server.start()
        try:
            url = f"nats://127.0.0.1:{self.server.port}"
            async with NatsBus(url, history_size=20, timeout=1.0, idle_heartbeat=0.5) as b:
                yield b
        finally:
            self.server.kill()

    async def break_connection(self, bus: Bus) -> None:
        self.server.kill()
        self.server.start()


@given(st.text(max_size=50))
def test_channel_tokens_are_subject_safe_and_reversible(channel: str) -> None:
    token = channel_token(channel)
    assert token and all(c.isascii() and (c.isalnum() or c in "-_") for c in token)
    assert token_channel(token) == channel


@pytest.mark.parametrize("token", ["", "x", "c!!", "c" + "_" * 3])
def test_foreign_tokens_are_rejected(token: str) -> None:
    assert token_channel(token) is None


async def test_two_buses_publishing_to_one_channel_keep_offsets_contiguous(names: tuple[str, str]) -> None:
    stream, prefix = names
    async with (
        NatsBus(SHARED, stream=stream, subject_prefix=prefix) as a,
        NatsBus(SHARED, stream=stream, subject_prefix=prefix) as b,
        a.subscribe(["shared"]) as sub_a,
        b.subscribe(["shared"]) as sub_b,
    ):
        positions: list[Position] = []

        async def publisher(bus: Bus, tag: bytes) -> None:
            for i in range(20):
                position = await bus.publish("shared", tag + b"%d" % i)
                positions.append(position)

        async with anyio.create_task_group() as tg:
            for bus, tag in ((a, b"a"), (b, b"b"), (a, b"c"), (b, b"d")):
                tg.start_soon(publisher, bus, tag)
        assert sorted(p.offset for p in positions) == list(range(1, 81))
        assert len({p.epoch for p in positions}) == 1
        history = await a.history("shared", Position(positions[0].epoch, 0), limit=100)
        assert [d.position.offset for d in history if d.position] == list(range(1, 81))
        got_a = [await _receive(sub_a) for _ in range(80)]
        got_b = [await _receive(sub_b) for _ in range(80)]
        assert got_a == got_b == list(history), "each process sees every event once, in offset order"


async def test_history_binary_search_finds_every_start(names: tuple[str, str]) -> None:
    stream, prefix = names
    async with NatsBus(SHARED, stream=stream, subject_prefix=prefix, history_size=30) as bus:
        mine: list[Position] = []
        for i in range(45):  # interleave another channel so stream and channel sequences differ
            mine.append(await bus.publish("h", b"%d" % i))
            await bus.publish("noise", b"n")
        for since in range(15, 45):
            got = await bus.history("h", mine[since - 1] if since else Position(mine[0].epoch, 0), limit=5)
            assert [d.position for d in got] == mine[since : since + 5]
        with pytest.raises(HistoryGone):
            await bus.history("h", mine[10])


async def test_deleted_stream_is_recreated_with_a_new_epoch(names: tuple[str, str]) -> None:
    stream, prefix = names
    async with NatsBus(SHARED, stream=stream, subject_prefix=prefix) as bus:
        old = await bus.publish("r", b"1")
        await _delete_stream(SHARED, stream)
        new = await bus.publish("r", b"2")
        assert new.epoch != old.epoch and new.offset == 1
        with pytest.raises(HistoryGone):
            await bus.history("r", old)


async def test_reader_turns_holes_and_epoch_changes_into_gaps_and_drops_redeliveries(
    names: tuple[str, str],
) -> None:
    # Feeds the process-wide reader directly, as the ordered consumer would after a reset
    # (nothing is published to "h", so the real consumer adds nothing).
    stream, prefix = names
    async with NatsBus(SHARED, stream=stream, subject_prefix=prefix) as bus, bus.subscribe(["h"]) as sub:
        await _check_reader_gaps(bus, sub)


async def _check_reader_gaps(bus: NatsBus, sub: Subscription) -> None:
    async def feed(offset: int, epoch: str = "E") -> None:
        headers = {"Splitchat-Offset": str(offset), "Splitchat-Epoch": epoch}
        msg = Msg(None, subject=bus.subject("h"), data=b"%d" % offset, headers=headers)  # type: ignore[arg-type]
        await bus._on_message(msg)

    for offset in (1, 2, 2, 5):
        await feed(offset)
    await feed(1, "F")
    got = [await _receive(sub, 1) for _ in range(5)]
    assert got == [
        Delivery("h", Position("E", 1), b"1"),
        Delivery("h", Position("E", 2), b"2"),
        Gap("h", Position("E", 2), "events missing (trimmed or stream reset)"),
        Delivery("h", Position("E", 5), b"5"),
        Gap("h", Position("E", 5), "events missing (trimmed or stream reset)"),
    ]
    assert await _receive(sub, 1) == Delivery("h", Position("F", 1), b"1")


async def test_a_stream_of_other_subjects_is_refused_clearly(names: tuple[str, str]) -> None:
    stream, prefix = names
    async with NatsBus(SHARED, stream=stream, subject_prefix=prefix):
        pass
    with pytest.raises(BusUnavailable, match="does not capture"):
        async with NatsBus(SHARED, stream=stream, subject_prefix=prefix + "other"):
            pass


# -- restart of a private server ------------------------------------------------------------------


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateServer]:
    server = nats_server(tmp_path)
    server.start()
    yield server
    server.kill()


async def _receive(sub: object, timeout: float = 15.0) -> Delivery | Gap:
    with anyio.fail_after(timeout):
        return await sub.receive()  # type: ignore[attr-defined,no-any-return]


async def test_server_restart_loses_no_accepted_event(private_nats: PrivateServer) -> None:
    url = f"nats://127.0.0.1:{private_nats.port}"
    async with NatsBus(url, timeout=1.0, idle_heartbeat=0.5) as bus, bus.subscribe(["room"]) as sub:
        before = [await bus.publish("room", b"b%d" % i) for i in range(10)]
        got_before = [await _receive(sub) for _ in range(5)]
        private_nats.kill()
        with anyio.fail_after(10):
            with pytest.raises(BusUnavailable):
                await bus.publish("room", b"while down")
        private_nats.start()
        after: list[Position] = []
        with anyio.fail_after(30):
            while len(after) < 10:
                try:
                    after.append(await bus.publish("room", b"a%d" % len(after)))
                except BusUnavailable:
                    await anyio.sleep(0.1)
        assert {p.epoch for p in before + after} == {before[0].epoch}, "file storage keeps the stream"
        seen: Counter[Position] = Counter(d.position for d in got_before if isinstance(d, Delivery))
        while sum(seen.values()) < 20:
            item = await _receive(sub)
            assert isinstance(item, Delivery), f"no accepted event may be lost: {item}"
            assert item.position is not None
            seen[item.position] += 1
        assert set(seen) == set(before + after) and set(seen.values()) == {1}
        with anyio.move_on_after(0.5):
            extra = await sub.receive()
            raise AssertionError(f"duplicate after restart: {extra}")


async def test_publish_while_nats_is_down_raises_quickly() -> None:
    bus = NatsBus(f"nats://127.0.0.1:{free_port()}", timeout=0.5)
    with anyio.fail_after(5):
        with pytest.raises(BusUnavailable, match="unreachable"):
            await bus.start()
    with pytest.raises(BusUnavailable, match="not running"):
        await bus.publish("a", b"x")


def test_bus_from_url_builds_a_nats_bus_with_query_options() -> None:
    bus = bus_from_url("nats://127.0.0.1:4222?stream=CHAT&history_size=50&max_age=60&subject_prefix=app")
    assert isinstance(bus, NatsBus)
    assert (bus.stream, bus.history_size, bus.max_age, bus.subject_prefix) == ("CHAT", 50, 60.0, "app")
    assert bus.servers == ["nats://127.0.0.1:4222"]


def test_missing_nats_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "splitchat.bus.nats", raising=False)
    with pytest.raises(RuntimeError, match=r"splitchat\[nats\]"):
        bus_from_url("nats://127.0.0.1:4222")


async def test_credentials_in_the_url_never_reach_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    bus = NatsBus(f"nats://alice:s3cret-pw@127.0.0.1:{port}", timeout=0.5)
    with pytest.raises(BusUnavailable) as caught:
        await bus.start()
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value) and "alice" not in str(caught.value)
    # The connection callbacks nats-py calls while reconnecting.
    caplog.clear()
    with caplog.at_level("WARNING", logger="splitchat.bus.nats"):
        await bus._on_disconnected()
        await bus._on_reconnected()
        await bus._on_error(OSError("connect to nats://alice:s3cret-pw@127.0.0.1 failed"))
    messages = [r.getMessage() for r in caplog.records if r.name == "splitchat.bus.nats"]
    assert messages == [
        f"NATS bus disconnected from 127.0.0.1:{port}; reconnecting",
        f"NATS bus reconnected to 127.0.0.1:{port}",
        "NATS bus error: OSError('connect to nats://***@127.0.0.1 failed')",
    ]


def test_redact_url_keeps_only_host_and_port() -> None:
    from splitchat.bus._remote import redact_url

    assert redact_url("redis://user:pw@10.0.0.1:7000/0?password=x", 6379) == "10.0.0.1:7000"
    assert redact_url("nats://tok@127.0.0.1", 4222) == "127.0.0.1:4222"
    assert redact_url("127.0.0.1:4223", 4222) == "127.0.0.1:4223"
    assert redact_url("nats://h:notaport", 4222) == "<invalid url>"
