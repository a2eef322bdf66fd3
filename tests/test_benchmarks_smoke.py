"""Smoke test of the benchmark harness (benchmarks/): every scenario at a tiny size, one repetition,
against each contender whose packages are installed, through real subprocesses and sockets.

The dev extra installs ``websockets`` (the reference peer) but not broadcaster or python-socketio,
so in CI those peers are skipped; splitchat's contender runs once the Gateway and CommandEndpoint
exist on the branch. Also: the load generator's WebSocket frame parser and its bookkeeping.
"""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from benchmarks import run as bench_run
from benchmarks._wsclient import Dialect, WsClient
from benchmarks.contenders import CONTENDERS
from benchmarks.loadgen import Collector
from hypothesis import given, settings, strategies as st

SMOKE = bench_run.parse_args(["--smoke"])


def _check_delivery(result: dict[str, object], expected: int) -> None:
    assert result["expected"] == expected
    assert result["deliveries"] == expected
    assert result["loss"] == 0
    assert result["duplicates"] == 0
    assert result["order_diverged"] == 0
    assert result["unexpected"] == 0
    assert result["post_errors"] == 0
    latency = result["latency_ms"]
    assert isinstance(latency, dict)
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("name", list(CONTENDERS))
def test_every_scenario_runs_against_contender(name: str, tmp_path: pytest.TempPathFactory) -> None:
    contender = CONTENDERS[name]
    if contender.node_script is None:  # a Node peer's requirements are npm packages
        for package in contender.requires:
            pytest.importorskip(package)
    reason = contender.unavailable()
    if reason:
        pytest.skip(reason)

    document = bench_run.main(["--smoke", "--contenders", name, "--no-plot", "--out", str(tmp_path)])

    results = {run["scenario"]: run for run in document["runs"]}
    assert set(results) == set(bench_run.SCENARIOS)
    redis_reason = contender.cross_node_unavailable()
    if redis_reason:
        assert results["redis"]["skipped"] == redis_reason
    else:  # two nodes sharing the Redis bus: clients on both, POSTs to one
        _check_delivery(results["redis"]["result"], SMOKE.clients * SMOKE.posts)
    for scenario in ("fanout", "latency", "idle", "ingest", "slow"):
        assert results[scenario]["contender"] == name
        assert "error" not in results[scenario]["result"], results[scenario]["result"]

    fanout = results["fanout"]["result"]
    _check_delivery(fanout, SMOKE.clients * SMOKE.posts)
    assert fanout["connected"] == SMOKE.clients
    assert fanout["deliveries_per_s"] > 0
    assert fanout["server_cpu_us_per_delivery"] >= 0
    assert fanout["server_rss_mb"] > 1

    latency = results["latency"]["result"]
    _check_delivery(latency, SMOKE.clients * int(SMOKE.rate * SMOKE.duration))

    idle = results["idle"]["result"]
    assert idle["connected"] == SMOKE.idle_clients
    assert idle["deliveries"] == SMOKE.idle_clients  # every idle connection was live
    assert idle["rss_after_mb"] >= idle["rss_before_mb"] > 1

    ingest = results["ingest"]["result"]
    assert ingest["requests"] == SMOKE.ingest_requests
    assert ingest["post_errors"] == 0
    assert ingest["requests_per_s"] > 0
    assert ingest["p99_ms"] > 0

    slow = results["slow"]["result"]
    assert slow["slow_clients"] == 1  # ceil(5 clients x 0.2)
    _check_delivery(slow, (SMOKE.clients - 1) * SMOKE.slow_posts)
    assert slow["rss_samples"]

    written = list(tmp_path.glob("bench-*.json"))
    assert len(written) == 1
    on_disk = json.loads(written[0].read_text())
    assert on_disk["summary"]["fanout"][name]["stats"]["deliveries_per_s"]["n"] == 1
    assert name in document["table"]


def test_collector_counts_loss_duplicates_and_divergent_order() -> None:
    collector = Collector(clients=3, posts=3)
    collector.expected = 9
    for index, order in ((0, [0, 1, 2]), (1, [0, 1, 2]), (2, [1, 0])):
        for seq in order:
            collector.record(index, seq, sent_ns=100, recv_ns=100 + 1_000_000 * (seq + 1))
    collector.record(0, 1, sent_ns=0, recv_ns=5)  # a duplicate is not a delivery
    collector.record(0, 7, sent_ns=0, recv_ns=5)  # a sequence number never posted
    summary = collector.summary()
    assert summary["deliveries"] == 8
    assert summary["loss"] == 1
    assert summary["duplicates"] == 1
    assert summary["unexpected"] == 1
    assert summary["order_diverged"] == 1  # client 2 saw 1 before 0, unlike the majority
    assert summary["latency_ms"]["max"] == 3.0


class _Recorder(Dialect):
    def __init__(self) -> None:
        super().__init__({})
        self.messages: list[bytes] = []

    def on_message(self, client: WsClient, payload: bytes, now: int) -> None:
        self.messages.append(payload)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        pass


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=0, max_size=70_000), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=30),
    fragment_first=st.booleans(),
)
def test_frame_parser_reassembles_any_split_of_the_stream(
    messages: list[bytes], cuts: list[int], fragment_first: bool
) -> None:
    async def scenario() -> tuple[list[bytes], list[bytes]]:
        dialect = _Recorder()
        client = WsClient(host="127.0.0.1", port=1, path="/", dialect=dialect, index=0, sink=lambda *a: None)
        transport = _Transport()
        client.connection_made(transport)
        stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        stream += _server_frame(9, b"ping")  # answered with a masked pong, not delivered
        for i, message in enumerate(messages):
            if i == 0 and fragment_first and len(message) > 1:
                half = len(message) // 2
                stream += _server_frame(1, message[:half], fin=False) + _server_frame(0, message[half:])
            else:
                stream += _server_frame(2, message)
        position = 0
        for cut in cuts:
            client.data_received(stream[position : position + cut])
            position += cut
        client.data_received(stream[position:])
        return dialect.messages, transport.written

    received, written = asyncio.run(scenario())
    assert received == messages
    pong = written[-1]
    assert pong[0] == 0x8A and pong[1] == 0x80 | 4  # FIN + pong, masked, 4 bytes
    mask, body = pong[2:6], pong[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == b"ping"
