"""Gateway fan-out benchmark: deliveries/s and POST -> receive latency.

What it does:
  1. starts the gateway (InMemoryBus + Gateway + a tiny POST /publish route) under uvicorn in a
     subprocess, on an ephemeral 127.0.0.1 port;
  2. starts CLIENTS WebSocket clients (the `websockets` asyncio client) in a second process, all
     identified and subscribed to one channel;
  3. from this process, POSTs EVENTS events (each carrying its send time) one after another, at
     most RATE per second (presence announcements are off unless --presence: a join storm of
     N clients costs N^2/2 presence frames, see the Gateway docstring);
  4. the client process records, for each frame, receive time - send time, and reports.

Output: one JSON line: deliveries, wall seconds, deliveries/s, latency p50/p99/max (ms), missing.
All three processes share the machine's cores, so the numbers are a floor, not a ceiling.

Run:  python benchmarks/gateway_fanout.py [--clients 1000] [--events 200] [--rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

CHANNEL = "bench"


# ---- server process ------------------------------------------------------------------------------


def run_server() -> None:
    import os

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route, WebSocketRoute

    from splitchat import Gateway, InMemoryBus, Principal, encode_event

    async def authenticate(token: str) -> Principal | None:
        return Principal(id=token) if token.startswith("bench-") else None

    bus = InMemoryBus()
    presence = os.environ.get("BENCH_PRESENCE") == "1"
    gateway = Gateway(bus, authenticate, heartbeat_interval=300.0, announce_presence=presence)
    counter = 0

    async def publish(request: Request) -> Response:
        nonlocal counter
        counter += 1
        payload = encode_event(
            id=str(counter), type="BENCH", channel=CHANNEL, data=json.loads(await request.body())
        )
        await bus.publish(CHANNEL, payload)
        return Response(status_code=204)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        async with bus, gateway:
            yield

    app = Starlette(
        routes=[WebSocketRoute("/gateway", gateway), Route("/publish", publish, methods=["POST"])],
        lifespan=lifespan,
    )

    async def main() -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, ws="websockets-sansio", log_level="warning", backlog=2048
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes no event for this
            await asyncio.sleep(0.01)
        print(server.servers[0].sockets[0].getsockname()[1], flush=True)
        await task

    asyncio.run(main())


# ---- client process ------------------------------------------------------------------------------


def run_clients(port: int, clients: int, events: int, timeout: float) -> None:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    received = [0] * clients
    done = asyncio.Event()
    remaining = [clients]

    async def one(i: int, ready: asyncio.Event, all_ready: asyncio.Event) -> None:
        async with connect(f"ws://127.0.0.1:{port}/gateway", max_queue=None) as ws:
            await ws.recv()  # HELLO
            await ws.send(json.dumps({"op": 2, "d": {"token": f"bench-{i}", "subscriptions": [CHANNEL]}}))
            while json.loads(await ws.recv()).get("t") != "READY":
                pass
            ready.set()
            await all_ready.wait()
            while received[i] < events:
                frame = json.loads(await ws.recv())
                if frame.get("t") == "BENCH":
                    latencies.append(time.time() - frame["d"]["t"])
                    received[i] += 1
            remaining[0] -= 1
            if not remaining[0]:
                done.set()
            await done.wait()

    async def main() -> None:
        all_ready = asyncio.Event()
        tasks = []
        for start in range(0, clients, 50):  # connect in batches, not all 1000 SYNs at once
            batch = []
            for i in range(start, min(start + 50, clients)):
                ready = asyncio.Event()
                tasks.append(asyncio.create_task(one(i, ready, all_ready)))
                batch.append(ready.wait())
            await asyncio.wait_for(asyncio.gather(*batch), 30)
        all_ready.set()
        print("READY", flush=True)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            pass
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print(json.dumps({"latencies": latencies, "missing": clients * events - sum(received)}), flush=True)

    asyncio.run(main())


# ---- orchestrator ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to see which side saturates."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="max events per second")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--presence", action="store_true", help="announce presence (N^2/2 frames while N clients join)"
    )
    parser.add_argument("--role", choices=["server", "clients"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        run_server()
        return
    if args.role == "clients":
        run_clients(args.port, args.clients, args.events, args.timeout)
        return

    import os

    import httpx

    me = [sys.executable, __file__]
    env = {**os.environ, "BENCH_PRESENCE": "1" if args.presence else "0"}
    server = subprocess.Popen([*me, "--role", "server"], stdout=subprocess.PIPE, text=True, env=env)
    clients = None
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        clients = subprocess.Popen(
            [*me, "--role", "clients", "--port", str(port), "--clients", str(args.clients),
             "--events", str(args.events), "--timeout", str(args.timeout)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert clients.stdout is not None
        if clients.stdout.readline().strip() != "READY":
            raise SystemExit("clients failed to connect")
        interval = 1.0 / args.rate
        started = time.time()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            for n in range(args.events):
                due = started + n * interval
                if (delay := due - time.time()) > 0:
                    time.sleep(delay)
                http.post("/publish", content=json.dumps({"n": n, "t": time.time()})).raise_for_status()
        result = json.loads(clients.stdout.readline())
        finished = time.time()
        server_cpu, clients_cpu = cpu_seconds(server.pid), cpu_seconds(clients.pid)
        latencies = result["latencies"]
        wall = finished - started
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "events": args.events,
                    "deliveries": len(latencies),
                    "missing": result["missing"],
                    "wall_s": round(wall, 2),
                    "deliveries_per_s": round(len(latencies) / wall),
                    "latency_ms_p50": round(percentile(latencies, 50) * 1000, 1),
                    "latency_ms_p99": round(percentile(latencies, 99) * 1000, 1),
                    "latency_ms_max": round(max(latencies) * 1000, 1),
                    "server_cpu_s": round(server_cpu, 1),
                    "clients_cpu_s": round(clients_cpu, 1),
                }
            )
        )
    finally:
        for proc in (clients, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
