"""Publish -> receive throughput and latency of the buses (memory, redis, nats).

Usage: python benchmarks/bus_throughput.py [--events 2000] [--publishers 1] [--payload 200]
           [--backends memory,redis,nats] [--time-limit 30]

One subscriber receives while ``--publishers`` tasks publish ``--events`` events in total to one
channel. Latency = receive time - time just before ``publish`` was called (same process, same
clock), so it includes the publish round trip and the fan-out path. Bounded in count and time;
uses a unique key prefix / stream and deletes it afterwards. Needs Redis on 127.0.0.1:6379 and
NATS JetStream on 127.0.0.1:4222 for those backends (skipped with a note if unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from splitchat import Bus, BusUnavailable, Delivery, InMemoryBus

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"


@asynccontextmanager
async def memory_bus() -> AsyncIterator[Bus]:
    async with InMemoryBus(history_size=10_000) as bus:
        yield bus


@asynccontextmanager
async def redis_bus() -> AsyncIterator[Bus]:
    import redis.asyncio as aioredis

    from splitchat.bus.redis import RedisBus

    prefix = f"splitchat-bench:{uuid.uuid4().hex[:8]}:"
    try:
        async with RedisBus(REDIS_URL, prefix=prefix, maxlen=10_000) as bus:
            yield bus
    finally:
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@asynccontextmanager
async def nats_bus() -> AsyncIterator[Bus]:
    import nats

    from splitchat.bus.nats import NatsBus

    suffix = uuid.uuid4().hex[:8]
    stream = f"SPLITCHAT_BENCH_{suffix}"
    try:
        bus = NatsBus(NATS_URL, stream=stream, subject_prefix=f"scbench{suffix}", history_size=10_000)
        async with bus:
            yield bus
    finally:
        nc = await nats.connect(NATS_URL)
        try:
            await nc.jsm().delete_stream(stream)
        except Exception:  # best-effort cleanup of a stream that may not exist
            pass
        await nc.close()


BACKENDS: dict[str, Callable[[], AbstractAsyncContextManager[Bus]]] = {
    "memory": memory_bus,
    "redis": redis_bus,
    "nats": nats_bus,
}


async def measure(bus: Bus, events: int, publishers: int, payload_size: int) -> dict[str, float]:
    channel = "bench"
    latencies: list[float] = []
    padding = b"x" * max(0, payload_size - 8)
    per_publisher = events // publishers
    total = per_publisher * publishers

    async with bus.subscribe([channel]) as sub:

        async def consume() -> None:
            while len(latencies) < total:
                item = await sub.receive()
                if not isinstance(item, Delivery):
                    raise RuntimeError(f"benchmark subscriber got {item!r}")
                (sent,) = struct.unpack_from("d", item.payload)
                latencies.append(time.perf_counter() - sent)

        async def publish(n: int) -> None:
            for _ in range(per_publisher):
                await bus.publish(channel, struct.pack("d", time.perf_counter()) + padding)
                # The memory bus never suspends in publish: yield so the subscriber runs.
                await asyncio.sleep(0)

        started = time.perf_counter()
        consumer = asyncio.create_task(consume())
        await asyncio.gather(*(publish(n) for n in range(publishers)))
        published = time.perf_counter()
        await consumer
        finished = time.perf_counter()

    latencies.sort()
    return {
        "events": total,
        "publish_per_s": total / (published - started),
        "end_to_end_per_s": total / (finished - started),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--payload", type=int, default=200)
    parser.add_argument("--backends", default="memory,redis,nats")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per backend")
    args = parser.parse_args()
    events = max(1, min(args.events, 100_000))
    print(f"{events} events of {args.payload} B, {args.publishers} publisher(s), 1 subscriber")
    print(f"{'bus':8} {'publish/s':>10} {'e2e/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name in args.backends.split(","):
        try:
            async with asyncio.timeout(args.time_limit):
                async with BACKENDS[name]() as bus:
                    r = await measure(bus, events, max(1, args.publishers), args.payload)
        except BusUnavailable as exc:
            print(f"{name:8} skipped: {exc}")
            continue
        except TimeoutError:
            print(f"{name:8} did not finish within {args.time_limit}s")
            continue
        print(
            f"{name:8} {r['publish_per_s']:10.0f} {r['end_to_end_per_s']:10.0f} "
            f"{r['p50_ms']:8.3f} {r['p99_ms']:8.3f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
