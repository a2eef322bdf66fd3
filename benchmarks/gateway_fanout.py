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

Scale-out: ``--bus redis://127.0.0.1:6379/0`` or ``--bus nats://127.0.0.1:4222`` with
``--nodes 2`` starts that many gateway processes on one shared bus (a unique key prefix / stream
per run, deleted afterwards); clients are spread round-robin over the nodes and every POST goes
to node 0, so the clients of the other nodes measure cross-node delivery
(``cross_node_latency_ms_p50/p99``).

Run:  python benchmarks/gateway_fanout.py [--clients 1000] [--events 200] [--rate 50]
      python benchmarks/gateway_fanout.py --bus redis://127.0.0.1:6379/0 --nodes 2 --clients 300
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

    from splitchat import Gateway, Principal, bus_from_url, encode_event

    async def authenticate(token: str) -> Principal | None:
        return Principal(id=token) if token.startswith("bench-") else None

    bus = bus_from_url(os.environ.get("BENCH_BUS_URL", "memory://"))
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


def run_clients(ports: list[int], clients: int, events: int, timeout: float) -> None:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    cross_node: list[float] = []  # clients of nodes other than node 0 (which gets the POSTs)
    received = [0] * clients
    done = asyncio.Event()
    remaining = [clients]

    async def one(i: int, ready: asyncio.Event, all_ready: asyncio.Event) -> None:
        node = i % len(ports)
        async with connect(f"ws://127.0.0.1:{ports[node]}/gateway", max_queue=None) as ws:
            await ws.recv()  # HELLO
            await ws.send(json.dumps({"op": 2, "d": {"token": f"bench-{i}", "subscriptions": [CHANNEL]}}))
            while json.loads(await ws.recv()).get("t") != "READY":
                pass
            ready.set()
            await all_ready.wait()
            while received[i] < events:
                frame = json.loads(await ws.recv())
                if frame.get("t") == "BENCH":
                    latency = time.time() - frame["d"]["t"]
                    latencies.append(latency)
                    if node:
                        cross_node.append(latency)
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
        missing = clients * events - sum(received)
        print(json.dumps({"latencies": latencies, "cross_node": cross_node, "missing": missing}), flush=True)

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
    parser.add_argument("--bus", default="memory://", help="bus URL (memory://, redis://..., nats://...)")
    parser.add_argument("--nodes", type=int, default=1, help="gateway processes (>1 needs redis/nats)")
    parser.add_argument("--role", choices=["server", "clients"], help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        run_server()
        return
    if args.role == "clients":
        run_clients([int(p) for p in args.ports.split(",")], args.clients, args.events, args.timeout)
        return
    if args.nodes > 1 and args.bus.startswith("memory"):
        raise SystemExit("--nodes > 1 needs a shared bus (redis:// or nats://)")

    import os
    import uuid

    import httpx

    run_id = uuid.uuid4().hex[:10]
    bus_url = args.bus
    separator = "&" if "?" in bus_url else "?"
    if bus_url.startswith("redis"):
        bus_url += f"{separator}prefix=bench-{run_id}:"
    elif bus_url.startswith("nats"):
        bus_url += f"{separator}stream=BENCH_{run_id}&subject_prefix=bench{run_id}"
    me = [sys.executable, __file__]
    env = {**os.environ, "BENCH_PRESENCE": "1" if args.presence else "0", "BENCH_BUS_URL": bus_url}
    servers = [
        subprocess.Popen([*me, "--role", "server"], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(args.nodes)
    ]
    clients = None
    try:
        ports = []
        for proc in servers:
            assert proc.stdout is not None
            ports.append(int(proc.stdout.readline()))
        port = ports[0]
        clients = subprocess.Popen(
            [*me, "--role", "clients", "--ports", ",".join(map(str, ports)), "--clients", str(args.clients),
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
        server_cpu, clients_cpu = sum(cpu_seconds(p.pid) for p in servers), cpu_seconds(clients.pid)
        latencies = result["latencies"]
        cross = result["cross_node"]
        wall = finished - started
        print(
            json.dumps(
                {
                    "bus": args.bus.split("://")[0],
                    "nodes": args.nodes,
                    "clients": args.clients,
                    "events": args.events,
                    "deliveries": len(latencies),
                    "missing": result["missing"],
                    "wall_s": round(wall, 2),
                    "deliveries_per_s": round(len(latencies) / wall),
                    "latency_ms_p50": round(percentile(latencies, 50) * 1000, 1),
                    "latency_ms_p99": round(percentile(latencies, 99) * 1000, 1),
                    "latency_ms_max": round(max(latencies) * 1000, 1),
                    "cross_node_latency_ms_p50": round(percentile(cross, 50) * 1000, 1) if cross else None,
                    "cross_node_latency_ms_p99": round(percentile(cross, 99) * 1000, 1) if cross else None,
                    "server_cpu_s": round(server_cpu, 1),
                    "clients_cpu_s": round(clients_cpu, 1),
                }
            )
        )
    finally:
        for proc in (clients, *servers):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        cleanup(bus_url)


def cleanup(bus_url: str) -> None:
    """Delete this run's Redis keys / NATS stream."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(bus_url)
    options = dict(parse_qsl(parts.query))

    async def run() -> None:
        if parts.scheme.startswith("redis"):
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(bus_url.split("?")[0])
            keys = [key async for key in client.scan_iter(match=options["prefix"] + "*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()
        elif parts.scheme == "nats":
            import nats

            nc = await nats.connect(bus_url.split("?")[0])
            try:
                await nc.jsm().delete_stream(options["stream"])
            finally:
                await nc.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
