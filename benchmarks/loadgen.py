"""The load generator: one asyncio process that drives one scenario against one running contender.

Started by ``run.py`` as ``python -m benchmarks.loadgen '<json spec>'``; prints ``RESULT {json}``.
It timestamps every publish in the payload (``seq``, ``sent_ns`` from the monotonic clock; sender
and receivers are this same process, so no clock skew), records every receipt, and measures its
own CPU so a saturated generator is flagged instead of being mistaken for a slow server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import sys
import time
from array import array
from collections import Counter
from typing import Any

import msgspec

from benchmarks._httpclient import HttpConnection
from benchmarks._proc import cpu_seconds, raise_fd_limit, rss_bytes, self_cpu_seconds
from benchmarks._wsclient import DIALECTS, Dialect, WsClient, connect

HOST = "127.0.0.1"
SATURATION = 0.9
"""A generator using more than 90% of one core may be the bottleneck: its result is flagged."""

_encode = msgspec.json.Encoder().encode


class Collector:
    """Every receipt: loss, duplicates, per-client order, latency of first receipts.

    Reordering is judged against the channel's order as the *server* chose it: concurrent POSTs
    may be accepted in any order, but every subscriber must then see the same order. A client
    whose order differs from the majority order counts as ``order_diverged``.
    """

    def __init__(self, clients: int, posts: int, slow: frozenset[int] | set[int] = frozenset()) -> None:
        self.posts = posts
        self.seen = [bytearray(posts) for _ in range(clients)]
        self.order = [array("i") for _ in range(clients)]
        self.slow = slow
        self.latencies = array("q")
        self.deliveries = self.duplicates = self.unexpected = self.slow_deliveries = 0
        self.expected = 0
        self.first_ns = self.last_ns = 0
        self.complete = asyncio.Event()

    def record(self, index: int, seq: int, sent_ns: int, recv_ns: int) -> None:
        if not 0 <= seq < self.posts:
            self.unexpected += 1
            return
        seen = self.seen[index]
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        self.order[index].append(seq)
        if index in self.slow:
            self.slow_deliveries += 1
            return
        self.latencies.append(recv_ns - sent_ns)
        self.deliveries += 1
        if not self.first_ns:
            self.first_ns = recv_ns
        self.last_ns = recv_ns
        if self.deliveries >= self.expected > 0:
            self.complete.set()

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        orders = [o.tobytes() for i, o in enumerate(self.order) if i not in self.slow and len(o)]
        majority = Counter(orders).most_common(1)[0][0] if orders else b""

        def pct(p: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1e6 if ordered else None

        return {
            "deliveries": self.deliveries,
            "expected": self.expected,
            "loss": self.expected - self.deliveries,
            "duplicates": self.duplicates,
            "order_diverged": sum(1 for o in orders if o != majority),
            "unexpected": self.unexpected,
            "latency_ms": {
                "p50": pct(0.50),
                "p90": pct(0.90),
                "p99": pct(0.99),
                "max": ordered[-1] / 1e6 if ordered else None,
            },
        }


class Run:
    """One scenario run: the spec, the contender's addresses, the clients."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.server = spec["server"]
        # Two-node scenario: clients alternate between every node, POSTs go to the first one.
        self.nodes: list[dict[str, Any]] = [self.server, *spec.get("extra_servers", [])]
        self.pid: int = self.server["pid"]
        self.pids: list[int] = [node["pid"] for node in self.nodes]
        self.channel: str = spec.get("channel", "bench")
        options = {**self.server, "channel": self.channel}
        self.dialect: Dialect = DIALECTS[self.server["dialect"]](options)
        self.clients: list[WsClient] = []
        self.padding = "x" * int(spec.get("padding", 64))
        self.post_path = self.server["post_path"].replace("{channel}", self.channel)
        self.post_errors = 0
        self.post_latencies: list[int] = []
        self.nonce_prefix = f"{os.getpid()}-{time.monotonic_ns()}"
        self.nonces = itertools.count()  # unique per POST, also across warm-up and measured rounds
        self.error_statuses: Counter[int] = Counter()

    async def connect_clients(self, collector: Collector, count: int, slow: set[int]) -> int:
        """Open ``count`` clients, at most ``connect_concurrency`` handshakes at a time; returns failures."""
        gate = asyncio.Semaphore(int(self.spec.get("connect_concurrency", 100)))
        timeout = float(self.spec.get("connect_timeout", 15))
        failures = 0

        async def one(index: int) -> None:
            nonlocal failures
            async with gate:
                try:
                    client = await connect(
                        host=HOST,
                        port=self.nodes[index % len(self.nodes)]["ws_port"],
                        dialect=self.dialect,
                        channel=self.channel,
                        index=index,
                        sink=collector.record,
                        timeout=timeout,
                        receive_buffer=4096 if index in slow else None,
                    )
                except (OSError, TimeoutError) as exc:
                    failures += 1
                    if failures <= 3:
                        print(f"loadgen: client {index} failed: {exc!r}", file=sys.stderr)
                    return
            if index in slow:
                client.pause()
            self.clients.append(client)

        await asyncio.gather(*(one(i) for i in range(count)))
        return failures

    def body(self, seq: int, sent_ns: int) -> bytes:
        nonce = f"{self.nonce_prefix}-{next(self.nonces)}"
        return _encode({"seq": seq, "sent_ns": sent_ns, "content": self.padding, "nonce": nonce})

    async def post(self, connection: HttpConnection, seq: int, sent_ns: int | None = None) -> None:
        sent = time.perf_counter_ns() if sent_ns is None else sent_ns
        try:
            status, _ = await connection.post(self.post_path, self.body(seq, sent))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status = 0
            await connection.close()
        self.post_latencies.append(time.perf_counter_ns() - sent)
        if status != 200:
            self.post_errors += 1
            self.error_statuses[status] += 1

    def connection(self) -> HttpConnection:
        return HttpConnection(HOST, self.server["http_port"], dict(self.server.get("post_headers", {})))

    async def closed_loop(self, posts: int, inflight: int) -> None:
        """``posts`` POSTs, as fast as ``inflight`` concurrent keep-alive connections allow."""
        sequence = iter(range(posts))

        async def worker() -> None:
            connection = self.connection()
            try:
                for seq in sequence:
                    await self.post(connection, seq)
            finally:
                await connection.close()

        await asyncio.gather(*(worker() for _ in range(inflight)))

    async def open_loop(self, rate: float, duration: float, pool_size: int) -> int:
        """POST at a fixed ``rate`` for ``duration`` seconds regardless of responses (open loop).

        ``sent_ns`` is the *scheduled* time, so a server that stalls is charged for the wait
        (no coordinated omission). In-flight requests are bounded by the connection pool.
        """
        posts = int(rate * duration)
        pool: asyncio.Queue[HttpConnection] = asyncio.Queue(maxsize=pool_size)
        for _ in range(pool_size):
            pool.put_nowait(self.connection())
        start = time.perf_counter_ns()
        tasks = set()

        async def send(seq: int, scheduled: int) -> None:
            connection = await pool.get()
            try:
                await self.post(connection, seq, scheduled)
            finally:
                pool.put_nowait(connection)

        for seq in range(posts):
            scheduled = start + int(seq * 1e9 / rate)
            delay = (scheduled - time.perf_counter_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(seq, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        while not pool.empty():
            await pool.get_nowait().close()
        return posts

    async def drain(self, collector: Collector) -> None:
        try:
            await asyncio.wait_for(collector.complete.wait(), float(self.spec.get("drain_timeout", 10)))
        except TimeoutError:
            pass

    async def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.05)


def percentile_ms(values: list[int], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1e6


class Meter:
    """Server CPU (summed over every node) and generator CPU over a measured phase."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.wall0 = time.perf_counter()
        self.server0 = sum(cpu_seconds(pid) for pid in pids)
        self.self0 = self_cpu_seconds()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        own = (self_cpu_seconds() - self.self0) / wall if wall else 0.0
        return {
            "wall_s": wall,
            "server_cpu_s": sum(cpu_seconds(pid) for pid in self.pids) - self.server0,
            "server_rss_mb": sum(rss_bytes(pid) for pid in self.pids) / 2**20,
            "loadgen_cpu_fraction": own,
            "loadgen_saturated": own > SATURATION,
        }


async def fanout(run: Run, slow_fraction: float = 0.0) -> dict[str, Any]:
    """N subscribers of one channel, M POSTs with K in flight; optionally a share of clients stop reading."""
    clients, posts, inflight = int(run.spec["clients"]), int(run.spec["posts"]), int(run.spec["inflight"])
    slow = set(range(math.ceil(clients * slow_fraction))) if slow_fraction else set()
    collector = Collector(clients, posts, slow)
    failures = await run.connect_clients(collector, clients, slow)
    healthy = len([c for c in run.clients if c.index not in slow])
    collector.expected = healthy * posts
    samples: list[tuple[float, float]] = []
    sampling = asyncio.create_task(sample_rss(run.pid, samples, float(run.spec.get("sample_interval", 0.1))))
    meter = Meter(run.pids)
    start_ns = time.perf_counter_ns()
    await run.closed_loop(posts, inflight)
    await run.drain(collector)
    measured = meter.stop()
    sampling.cancel()
    end_ns = collector.last_ns or time.perf_counter_ns()
    seconds = (end_ns - start_ns) / 1e9
    result = {
        **collector.summary(),
        **measured,
        "connected": len(run.clients),
        "connect_failures": failures,
        "posts": posts,
        "post_errors": run.post_errors,
        "post_error_statuses": dict(run.error_statuses),
        "deliveries_per_s": collector.deliveries / seconds if seconds > 0 else 0.0,
        "server_cpu_us_per_delivery": 1e6 * measured["server_cpu_s"] / max(collector.deliveries, 1),
    }
    if slow:
        # A paused reader cannot see the server's close: resume the slow clients and give them a
        # moment to read what was buffered, then count the connections the server had cut.
        for client in run.clients:
            if client.index in slow:
                client.resume()
        await asyncio.sleep(float(run.spec.get("slow_grace", 2.0)))
        result.update(
            slow_clients=len(slow),
            slow_disconnected=sum(1 for c in run.clients if c.index in slow and c.closed),
            slow_deliveries=collector.slow_deliveries,
            rss_samples=samples,
            rss_growth_mb=(max(s[1] for s in samples) - samples[0][1]) if samples else None,
        )
    await run.close_clients()
    return result


async def sample_rss(pid: int, samples: list[tuple[float, float]], interval: float) -> None:
    start = time.perf_counter()
    while True:
        samples.append((round(time.perf_counter() - start, 3), rss_bytes(pid) / 2**20))
        await asyncio.sleep(interval)


async def latency(run: Run) -> dict[str, Any]:
    """N subscribers; POSTs at a fixed rate for a fixed time (open loop); latency percentiles."""
    clients, rate, duration = int(run.spec["clients"]), float(run.spec["rate"]), float(run.spec["duration"])
    posts = int(rate * duration)
    collector = Collector(clients, posts)
    failures = await run.connect_clients(collector, clients, set())
    collector.expected = len(run.clients) * posts
    meter = Meter(run.pids)
    await run.open_loop(rate, duration, int(run.spec.get("pool", 32)))
    await run.drain(collector)
    measured = meter.stop()
    result = {
        **collector.summary(),
        **measured,
        "connected": len(run.clients),
        "connect_failures": failures,
        "posts": posts,
        "post_errors": run.post_errors,
        "post_error_statuses": dict(run.error_statuses),
        "offered_deliveries_per_s": rate * len(run.clients),
        "deliveries_per_s": collector.deliveries / measured["wall_s"] if measured["wall_s"] else 0.0,
        "server_cpu_us_per_delivery": 1e6 * measured["server_cpu_s"] / max(collector.deliveries, 1),
    }
    await run.close_clients()
    return result


async def idle(run: Run) -> dict[str, Any]:
    """RSS growth per idle subscribed connection; one POST afterwards proves every connection is live."""
    clients = int(run.spec["idle_clients"])
    collector = Collector(clients, 1)
    await asyncio.sleep(0.3)
    before = rss_bytes(run.pid)
    meter = Meter(run.pids)
    failures = await run.connect_clients(collector, clients, set())
    await asyncio.sleep(float(run.spec.get("settle", 1.0)))
    after = rss_bytes(run.pid)
    measured = meter.stop()
    collector.expected = len(run.clients)
    connection = run.connection()
    await run.post(connection, 0)
    await connection.close()
    await run.drain(collector)
    result = {
        **collector.summary(),
        **measured,
        "connected": len(run.clients),
        "connect_failures": failures,
        "post_errors": run.post_errors,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "rss_kb_per_connection": (after - before) / 1024 / max(len(run.clients), 1),
    }
    await run.close_clients()
    return result


async def ingest(run: Run) -> dict[str, Any]:
    """POST throughput and latency with no subscribers; also the bare JSON route when the server has one."""
    requests, concurrency = int(run.spec["ingest_requests"]), int(run.spec["ingest_concurrency"])
    targets = [("", run.post_path)]
    if run.server.get("bare_post_path"):
        targets.append(("bare_", run.server["bare_post_path"].replace("{channel}", run.channel)))
    result: dict[str, Any] = {}
    for prefix, path in targets:
        run.post_path = path
        await run.closed_loop(min(50, requests), concurrency)  # warm-up: connections, caches
        run.post_errors, run.post_latencies = 0, []
        meter = Meter(run.pids)
        await run.closed_loop(requests, concurrency)
        measured = meter.stop()
        result.update(
            {
                f"{prefix}requests": requests,
                f"{prefix}post_errors": run.post_errors,
                f"{prefix}requests_per_s": requests / measured["wall_s"],
                f"{prefix}p50_ms": percentile_ms(run.post_latencies, 0.5),
                f"{prefix}p99_ms": percentile_ms(run.post_latencies, 0.99),
                f"{prefix}server_cpu_us_per_request": 1e6 * measured["server_cpu_s"] / requests,
                f"{prefix}loadgen_cpu_fraction": measured["loadgen_cpu_fraction"],
                f"{prefix}loadgen_saturated": measured["loadgen_saturated"],
            }
        )
    result["post_error_statuses"] = dict(run.error_statuses)
    result["post_errors"] = sum(v for k, v in result.items() if k.endswith("post_errors"))
    result["loadgen_saturated"] = any(v for k, v in result.items() if k.endswith("loadgen_saturated"))
    return result


SCENARIOS = {
    "fanout": fanout,
    "latency": latency,
    "idle": idle,
    "ingest": ingest,
    "slow": lambda run: fanout(run, float(run.spec.get("slow_fraction", 0.05))),
    "redis": fanout,  # the fan-out, with clients spread over two nodes sharing a Redis bus
}


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    run = Run(spec)
    try:
        return await asyncio.wait_for(SCENARIOS[spec["scenario"]](run), float(spec.get("timeout", 120)))
    finally:
        for client in run.clients:
            client.close()


def entry() -> None:
    raise_fd_limit()
    spec = json.loads(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main(spec))
    else:
        result = uvloop.run(main(spec))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    entry()
