"""Several real node processes (uvicorn + tests.multinode_app) sharing Redis (and NATS).

Every process is started on an ephemeral loopback port and killed at the end; every wait is
bounded. Clients reach the nodes through TCP proxies that play the load balancer: re-pointing a
proxy sends new connections to another node (no sticky sessions).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import httpx
import nats
import pytest

from splitchat.client import Dispatch, Resumed, Resync, RetryPolicy, SplitchatClient

from ._proxy import TcpProxy
from ._servers import PrivateServer, redis_server
from .multinode_support import Node

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REDIS = "redis://127.0.0.1:6379/0"
NATS = "nats://127.0.0.1:4222"
ROOM = "room"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        yield started
    finally:
        for node in started:
            node.kill()


def start_node(nodes: list[Node], name: str, env: dict[str, str], tmp: Path) -> Node:
    node = Node(
        name, {"SPLITCHAT_HEARTBEAT_INTERVAL": "1.0", "SPLITCHAT_CHECKPOINT_INTERVAL": "0.2", **env}, tmp
    )
    nodes.append(node)
    node.start()
    return node


class Collector:
    """The application's view of one client: MESSAGE_CREATE ids in arrival order."""

    def __init__(self, client: SplitchatClient) -> None:
        self.client = client
        self.ids: list[str] = []
        self.resumed: list[Resumed] = []
        self.resyncs: list[Resync] = []

    async def run(self) -> None:
        async for item in self.client.events():
            if isinstance(item, Dispatch) and item.t == "MESSAGE_CREATE" and item.id is not None:
                self.ids.append(item.id)
            elif isinstance(item, Resumed):
                self.resumed.append(item)
            elif isinstance(item, Resync):
                self.resyncs.append(item)


def gateway_client(url: str, token: str) -> SplitchatClient:
    return SplitchatClient(
        url,
        token=token,
        subscriptions=[ROOM],
        reconnect_min_delay=0.05,
        reconnect_max_delay=0.5,
        event_buffer=1024,
    )


def sender(url: str) -> SplitchatClient:
    retry = RetryPolicy(max_attempts=60, deadline=45.0, min_delay=0.1, max_delay=1.0)
    return SplitchatClient(url, token="tok-sender", gateway=False, retry=retry)


async def send(client: SplitchatClient, n: int, sent: list[str]) -> None:
    receipt = await client.send("POST", f"/channels/{ROOM}/messages", {"n": n})
    assert receipt.status == 200 and receipt.event is not None
    sent.append(receipt.event.id)


async def wait_for(collectors: list[Collector], count: int, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while any(len(set(c.ids)) < count for c in collectors):  # noqa: ASYNC110 - polling other tasks' lists
            await anyio.sleep(0.05)


async def wait_connected(clients: list[SplitchatClient], timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not all(c.connected and ROOM in c.subscriptions for c in clients):  # noqa: ASYNC110
            await anyio.sleep(0.05)


def assert_exact(collectors: list[Collector], sent: list[str]) -> None:
    for c in collectors:
        duplicates = len(c.ids) - len(set(c.ids))
        lost = set(sent) - set(c.ids)
        assert (duplicates, sorted(lost), len(c.ids)) == (0, [], len(sent)), c.client.session_id
        assert not c.resyncs  # never fell back to a fresh session: every resume succeeded


async def delete_stream(stream: str) -> None:
    nc = await nats.connect(NATS)
    try:
        try:
            await nc.jsm().delete_stream(stream)
        except nats.js.errors.NotFoundError:
            pass
    finally:
        await nc.close()


@pytest.mark.parametrize("bus", ["redis", "nats"])
async def test_fan_out_across_nodes_resume_after_drain_and_after_sigkill(
    bus: str, prefix: str, nodes: list[Node], tmp_path: Path
) -> None:
    stream = f"SPLITCHAT_TEST_{uuid.uuid4().hex[:10]}"
    bus_url = (
        f"{REDIS}?prefix={prefix}bus:"
        if bus == "redis"
        else f"{NATS}?stream={stream}&subject_prefix=sct{stream[-10:]}"
    )
    env = {"SPLITCHAT_BUS_URL": bus_url, "SPLITCHAT_STATE_URL": REDIS, "SPLITCHAT_STATE_PREFIX": prefix}
    try:
        a, b, c = (start_node(nodes, name, env, tmp_path) for name in ("A", "B", "C"))
        sent: list[str] = []
        async with (
            TcpProxy("127.0.0.1", a.port) as lb1,  # u1, u2 start on A
            TcpProxy("127.0.0.1", b.port) as lb2,  # u3, u4 start on B
            AsyncExitStack() as stack,
        ):
            clients = [gateway_client(lb1.url, "tok-u1"), gateway_client(lb1.url, "tok-u2")]
            clients += [gateway_client(lb2.url, "tok-u3"), gateway_client(lb2.url, "tok-u4")]
            for client in clients:
                await stack.enter_async_context(client)
            send_a = await stack.enter_async_context(sender(a.url))
            send_b = await stack.enter_async_context(sender(b.url))
            send_c = await stack.enter_async_context(sender(c.url))
            collectors = [Collector(client) for client in clients]
            async with anyio.create_task_group() as tg:
                for collector in collectors:
                    tg.start_soon(collector.run)
                await wait_connected(clients)

                # 1. POSTs to A reach clients on B and the other way round.
                for n in range(20):
                    await send(send_a if n % 2 else send_b, n, sent)
                await wait_for(collectors, 20)

                # 2. A drains (RECONNECT) while events keep coming; its clients resume on B.
                lb1.target_port = b.port
                async with anyio.create_task_group() as drain_group:
                    drain_group.start_soon(anyio.to_thread.run_sync, a.drain)
                    for n in range(20, 40):
                        await send(send_b, n, sent)
                        await anyio.sleep(0.02)
                await wait_for(collectors, 40)

                # 3. Everyone is on B. B is SIGKILLed mid-stream; all resume on C from checkpoints.
                lb1.target_port = lb2.target_port = c.port
                await anyio.sleep(1.5)  # heartbeats (1 s) acknowledge, checkpoints (0.2 s) follow
                for n in range(40, 50):
                    await send(send_b, n, sent)
                b.kill()
                for n in range(50, 60):
                    await send(send_c, n, sent)
                await wait_for(collectors, 60, timeout=40)
                await anyio.sleep(0.5)  # anything duplicated would arrive by now
                tg.cancel_scope.cancel()
        assert len(sent) == len(set(sent)) == 60
        assert_exact(collectors, sent)
        assert all(len(c.resumed) >= 2 for c in collectors[:2])  # drain, then crash
        assert all(len(c.resumed) >= 1 for c in collectors[2:])  # crash
    finally:
        if bus == "nats":
            await delete_stream(stream)


async def test_rate_limit_and_idempotency_hold_across_nodes(
    prefix: str, nodes: list[Node], tmp_path: Path
) -> None:
    env = {
        "SPLITCHAT_BUS_URL": f"{REDIS}?prefix={prefix}bus:",
        "SPLITCHAT_STATE_URL": REDIS,
        "SPLITCHAT_STATE_PREFIX": prefix,
    }
    a, b = (start_node(nodes, name, env, tmp_path) for name in ("A", "B"))
    headers = {"Authorization": "Bearer tok-u1"}
    async with httpx.AsyncClient(timeout=10.0) as http:
        # "5/minute" per user: alternate nodes, 5 accepted in all, then 429 from either.
        statuses = [
            (await http.post(f"{(a, b)[i % 2].url}/api/limited/{ROOM}", headers=headers)).status_code
            for i in range(8)
        ]
        assert statuses == [200] * 5 + [429] * 3

        async with gateway_client(b.url, "tok-u2") as watcher:
            collector = Collector(watcher)
            async with anyio.create_task_group() as tg:
                tg.start_soon(collector.run)
                await wait_connected([watcher])
                keyed = {**headers, "Idempotency-Key": "retry-1"}
                first = await http.post(f"{a.url}/api/channels/{ROOM}/messages", json={"n": 1}, headers=keyed)
                retry = await http.post(f"{b.url}/api/channels/{ROOM}/messages", json={"n": 1}, headers=keyed)
                assert first.status_code == retry.status_code == 200
                assert retry.json() == first.json()  # the same event id: nothing published again
                marker = await http.post(
                    f"{b.url}/api/channels/{ROOM}/messages", json={"n": 2}, headers=headers
                )
                await wait_for([collector], 2)
                await anyio.sleep(0.5)
                tg.cancel_scope.cancel()
        assert collector.ids == [first.json()["event"]["id"], marker.json()["event"]["id"]]


async def test_redis_restart_mid_stream_loses_no_accepted_event(nodes: list[Node], tmp_path: Path) -> None:
    server: PrivateServer = redis_server(tmp_path, persistent=True)
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        env = {"SPLITCHAT_BUS_URL": url, "SPLITCHAT_STATE_URL": url, "SPLITCHAT_STATE_PREFIX": "t:"}
        a, b = (start_node(nodes, name, env, tmp_path) for name in ("A", "B"))
        sent: list[str] = []
        async with AsyncExitStack() as stack:
            clients = [gateway_client(a.url, "tok-u1"), gateway_client(b.url, "tok-u2")]
            for client in clients:
                await stack.enter_async_context(client)
            senders = [await stack.enter_async_context(sender(node.url)) for node in (a, b)]
            collectors = [Collector(client) for client in clients]
            async with anyio.create_task_group() as tg:
                for collector in collectors:
                    tg.start_soon(collector.run)
                await wait_connected(clients)
                for n in range(15):
                    await send(senders[n % 2], n, sent)
                await wait_for(collectors, 15)
                server.kill()  # kill -9 mid-stream ...
                restarted = anyio.Event()

                async def restart() -> None:
                    await anyio.sleep(1.0)
                    await anyio.to_thread.run_sync(server.start)  # ... and back on the same port
                    restarted.set()

                tg.start_soon(restart)
                for n in range(15, 30):  # sends retry (503/5xx/network) until Redis is back
                    await send(senders[n % 2], n, sent)
                await restarted.wait()
                await wait_for(collectors, 30, timeout=40)
                await anyio.sleep(0.5)
                tg.cancel_scope.cancel()
        assert len(sent) == 30
        assert_exact(collectors, sent)
    finally:
        server.kill()
