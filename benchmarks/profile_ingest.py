"""In-process cost of one ingest POST: the splitchat contender's app called as ASGI, no server.

Usage::

    python -m benchmarks.profile_ingest [--requests 20000] [--profile]

Builds the same Starlette app the ``splitchat`` contender serves (``/api`` -> CommandEndpoint,
``/bare/...`` -> a bare Starlette JSON route) and calls it directly with the request the load
generator sends (same headers, same body with a fresh nonce), alternating between the two
targets in blocks so machine noise hits both. Prints microseconds per request for each and their
ratio; ``--profile`` also prints a cProfile of the endpoint requests (cProfile inflates the cost
of Python calls: read its table for where, not how much).

No sockets and no HTTP parsing: this prices what the application does per request. The server's
own per-request cost (uvicorn's parser, the event loop, the kernel) comes on top of both targets.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import pstats
import time
from typing import Any

from benchmarks.servers.splitchat_server import TOKEN, app

_HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"content-type", b"application/json"),
    (b"content-length", b"0"),
    (b"authorization", f"Bearer {TOKEN}".encode()),
]


def _scope(path: str, body: bytes) -> dict[str, Any]:
    headers = list(_HEADERS)
    headers[2] = (b"content-length", str(len(body)).encode())
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


class _Driver:
    def __init__(self) -> None:
        self.nonces = itertools.count()
        self.statuses: dict[int, int] = {}

    async def one(self, path: str) -> None:
        body = b'{"seq":1,"sent_ns":123456789,"content":"hello world","nonce":"n-%d"}' % next(self.nonces)
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                self.statuses[status] = self.statuses.get(status, 0) + 1

        await app(_scope(path, body), receive, send)


async def _measure(requests: int, profile: bool, sort: str) -> None:
    driver = _Driver()
    targets = {"endpoint": "/api/channels/c1/messages", "bare": "/bare/channels/c1/messages"}
    async with app.router.lifespan_context(app):
        for path in targets.values():  # warm up: imports, caches
            for _ in range(500):
                await driver.one(path)
        totals = dict.fromkeys(targets, 0.0)
        block = 1000
        for _ in range(max(1, requests // block)):
            for name, path in targets.items():
                started = time.perf_counter()
                for _ in range(block):
                    await driver.one(path)
                totals[name] += time.perf_counter() - started
        per = {name: total / max(1, requests // block) / block * 1e6 for name, total in totals.items()}
        for name, us in per.items():
            print(f"{name:9s} {us:7.1f} us/request")
        print(f"bare/endpoint time ratio {per['bare'] / per['endpoint']:.2f}  statuses {driver.statuses}")
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(requests // 2):
                await driver.one(targets["endpoint"])
            profiler.disable()
            pstats.Stats(profiler).sort_stats(sort).print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000, help="requests per target (bounded: 200k)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the endpoint")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    args = parser.parse_args()
    asyncio.run(_measure(min(args.requests, 200_000), args.profile, args.sort))


if __name__ == "__main__":
    main()
