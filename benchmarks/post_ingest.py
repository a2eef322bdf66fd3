"""POST ingest benchmark: CommandEndpoint vs a bare Starlette JSON POST route, in the same run.

Usage::

    python benchmarks/post_ingest.py [--duration 10] [--concurrency 32] [--rounds 2]

For each target the script starts uvicorn in a subprocess on a free 127.0.0.1 port:

* ``bare``: a Starlette route that decodes the JSON body (``await request.json()``) and returns
  a JSON object;
* ``endpoint``: a :class:`splitchat.CommandEndpoint` served as the ASGI app, with one declared
  command: bearer authentication, msgspec body validation, a per-channel rate limit and a global
  limit both sized never to trigger, an idempotency nonce per request, and a publish to an
  :class:`splitchat.InMemoryBus`;
* ``mounted`` (opt-in with ``--targets``): the same endpoint inside Starlette under
  ``Mount("/api")``.

This process then drives the server with a bounded closed loop: ``--concurrency`` keep-alive
connections (raw asyncio sockets, so the client stays cheap), each sending the next request as
soon as the previous answer arrived, for ``--duration`` seconds. Targets alternate for
``--rounds`` rounds (noise on a shared machine hits both). It prints requests/s, p50 and p99
latency per target and, for the best round of each, the ratio to ``bare``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

USERS = 32


def token_for(n: int) -> str:
    """The bearer token of benchmark user ``n`` (each connection acts as its own user)."""
    return f"bench-token-{n:04d}-0123456789abcdef"


def build_app(kind: str) -> Any:
    """The ASGI app served by ``--serve KIND``."""
    import msgspec
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    import splitchat

    if kind == "bare":

        async def create(request: Request) -> JSONResponse:
            data = await request.json()
            channel_id = request.path_params["channel_id"]
            return JSONResponse({"id": "1", "channel_id": channel_id, "content": data["content"]})

        return Starlette(routes=[Route("/api/channels/{channel_id}/messages", create, methods=["POST"])])

    bus = splitchat.InMemoryBus(history_size=1000)
    endpoint = splitchat.CommandEndpoint(
        bus=bus,
        authenticator=splitchat.StaticTokenAuthenticator(
            {token_for(n): splitchat.Principal(id=str(n), name=f"bench{n}") for n in range(USERS)}
        ),
        # Sized not to trigger at ~10k req/s spread over USERS users, but realistic in shape: the
        # in-memory moving window keeps one entry per hit in the window, so its cost grows with it.
        global_rate_limit="2000/second",
    )

    class CreateMessage(msgspec.Struct):
        content: str
        nonce: str | None = None

    prefix = "" if kind == "mounted" else "/api"

    @endpoint.command(
        "POST",
        prefix + "/channels/{channel_id}/messages",
        body=CreateMessage,
        channel="{channel_id}",
        rate_limit="2000/second",
    )
    async def create_message(ctx: splitchat.CommandContext, body: CreateMessage) -> dict[str, Any]:
        message = {
            "id": ctx.snowflakes.next_str(),
            "channel_id": ctx.params["channel_id"],
            "content": body.content,
        }
        ctx.publish("MESSAGE_CREATE", message)
        return message

    if kind == "mounted":
        return Starlette(routes=[Mount("/api", app=endpoint)], lifespan=splitchat.lifespan(bus, endpoint))
    # Served as the top-level ASGI app (it runs its own lifespan); paths keep the /api prefix
    # by declaring the command under it, so both targets see identical requests.
    return endpoint


def serve(kind: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        build_app(kind), host="127.0.0.1", port=port, log_level="warning", access_log=False, ws="none"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent / "src")])}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def connection_loop(
    port: int, worker: int, stop_at: float, latencies: list[float], statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    counter = itertools.count()
    try:
        while time.perf_counter() < stop_at:
            n = next(counter)
            body = b'{"content":"hello world","nonce":"w%d-%d"}' % (worker, n)
            request = (
                b"POST /api/channels/c%d/messages HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (worker, token_for(worker % USERS).encode(), len(body), body)
            )
            started = time.perf_counter()
            writer.write(request)
            status = await read_response(reader)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


async def drive(port: int, duration: float, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    # Warm up (imports, caches) for one second, then measure.
    await asyncio.gather(
        *(connection_loop(port, 1000 + w, time.perf_counter() + 1, [], {}) for w in range(concurrency))
    )
    started = time.perf_counter()
    stop_at = started + duration
    await asyncio.gather(
        *(connection_loop(port, w, stop_at, latencies, statuses) for w in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per target and round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--targets", default="bare,endpoint", help="comma-separated: bare, endpoint, mounted (in Starlette)"
    )
    parser.add_argument("--serve", choices=["bare", "endpoint", "mounted"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    duration = min(args.duration, 20.0)  # bounded: never more than 20 s per measurement
    best: dict[str, dict[str, Any]] = {}
    for round_no in range(1, args.rounds + 1):
        for kind in args.targets.split(","):
            proc, port = start_server(kind)
            try:
                result = asyncio.run(drive(port, duration, args.concurrency))
            finally:
                proc.terminate()
                proc.wait(10)
            print(
                f"round {round_no} {kind:9s} {result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.2f} ms  "
                f"p99 {result['p99_ms']:6.2f} ms  statuses {result['statuses']}",
                flush=True,
            )
            if kind not in best or result["rps"] > best[kind]["rps"]:
                best[kind] = result
    for kind, result in best.items():
        ratio = result["rps"] / best["bare"]["rps"]
        print(f"best {kind:9s} {result['rps']:8.0f} req/s  ratio to bare {ratio:.2f}")


if __name__ == "__main__":
    main()
