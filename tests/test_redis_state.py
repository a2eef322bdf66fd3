"""Redis-backed shared state against the real Redis on 127.0.0.1:6379 (unique key prefix per test).

Two store objects on two separate clients stand for two nodes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

import splitchat
from splitchat import Position, Principal, SessionRecord, StoredResponse
from splitchat.redis import RedisIdempotencyStore, RedisPresence, RedisSessionStore, RedisState

pytestmark = pytest.mark.redis

URL = "redis://127.0.0.1:6379/0"
ALICE = Principal(id="alice", name="Alice")
BOB = Principal(id="bob:1", name="Bob")  # a ':' in the id must not confuse lease parsing


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def clients() -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    a, b = aioredis.Redis.from_url(URL), aioredis.Redis.from_url(URL)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def record(session_id: str, *, owner: str = "", expires_in: float = 60.0, seq: int = 3) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        principal=ALICE,
        channels=["a", "b"],
        seq=seq,
        buffer_floor=1,
        positions={"a": Position("e1", 7), "b": Position("e1", 2)},
        buffer=[
            splitchat.BufferedDispatch(
                seq=2,
                t="MESSAGE_CREATE",
                data=b'{"n":1}',
                event_id="9",
                channel="a",
                position=Position("e1", 7),
                previous=Position("e1", 6),
            )
        ],
        expires_at=time.time() + expires_in,
        owner=owner,
    )


# ---- sessions ------------------------------------------------------------------------------


async def test_session_record_round_trips_and_is_taken_once(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    node_a, node_b = (RedisSessionStore(c, prefix=prefix) for c in clients)
    saved = record("s1", owner="A")
    await node_a.save(saved)
    assert await node_b.take("s1") == saved  # the other node sees it, byte-exact
    assert await node_a.take("s1") is None  # resumed at most once
    assert await node_b.take("missing") is None


async def test_session_record_expires_at_its_wall_clock_deadline(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    store = RedisSessionStore(clients[0], prefix=prefix)
    await store.save(record("s1", expires_in=0.2))
    await anyio.sleep(0.4)
    assert await store.take("s1") is None


async def test_a_node_that_lost_the_session_cannot_overwrite_the_new_hosts_record(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    node_a, node_b = (RedisSessionStore(c, prefix=prefix) for c in clients)
    expires = time.time() + 60
    assert await node_a.save_many([record("s1", owner="A", seq=3)]) == [True]
    assert await node_b.claim("s1", "B", expires) == "A"  # B takes over and learns who had it
    # A's zombie connection keeps checkpointing: refused, and the record stays A's last one.
    assert await node_a.save_many([record("s1", owner="A", seq=99), record("s2", owner="A")]) == [False, True]
    await node_a.save(record("s1", owner="A", seq=100))  # a plain save is refused the same way
    taken = await node_b.take("s1")
    assert taken is not None and taken.seq == 3
    assert await node_b.save_many([record("s1", owner="B", seq=5)]) == [True]
    assert await node_b.claim("s1", "B", expires) == "B"
    await node_b.discard("s1")
    assert await node_a.claim("s1", "A", expires) is None  # discarded: nobody held it


# ---- idempotency ----------------------------------------------------------------------------


async def test_idempotency_key_claimed_once_across_nodes(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    node_a, node_b = (RedisIdempotencyStore(c, prefix=prefix) for c in clients)
    assert (await node_a.claim("u:k1", "fp1", 10)).state == "claimed"
    busy = await node_b.claim("u:k1", "fp1", 10)
    assert (busy.state, busy.fingerprint) == ("in_progress", "fp1")
    response = StoredResponse(200, [("content-type", "application/json")], b'{"ok":true}')
    await node_a.complete("u:k1", "fp1", response, 10)
    await node_b.release("u:k1")  # a completed entry is never released
    done = await node_b.claim("u:k1", "fp1", 10)
    assert (done.state, done.fingerprint, done.response) == ("completed", "fp1", response)


async def test_idempotency_release_lets_a_retry_run_and_claims_expire(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    node_a, node_b = (RedisIdempotencyStore(c, prefix=prefix) for c in clients)
    assert (await node_a.claim("k", "fp", 10)).state == "claimed"
    await node_a.release("k")
    assert (await node_b.claim("k", "fp", 0.2)).state == "claimed"
    assert (await node_a.claim("k", "fp", 10)).state == "in_progress"
    await anyio.sleep(0.35)  # a crashed owner never locks a key for ever
    assert (await node_a.claim("k", "fp", 10)).state == "claimed"


async def test_a_late_owner_cannot_release_or_overwrite_a_newer_claim(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    node_a, node_b = (RedisIdempotencyStore(c, prefix=prefix) for c in clients)
    first = await node_a.claim("k", "fp", 0.2)
    assert first.state == "claimed" and first.owner
    await anyio.sleep(0.35)  # A's claim expires while A is still (slowly) running
    second = await node_b.claim("k", "fp", 10)
    assert second.state == "claimed" and second.owner and second.owner != first.owner
    await node_a.release("k", owner=first.owner)  # late: must not delete B's claim
    assert (await node_a.claim("k", "fp", 10)).state == "in_progress"
    late = StoredResponse(500, [], b"late")
    await node_a.complete("k", "fp", late, 10, owner=first.owner)  # late: must not overwrite
    assert (await node_a.claim("k", "fp", 10)).state == "in_progress"
    mine = StoredResponse(200, [], b"{}")
    await node_b.complete("k", "fp", mine, 10, owner=second.owner)
    done = await node_a.claim("k", "fp", 10)
    assert (done.state, done.response) == ("completed", mine)
    await node_b.release("k", owner=second.owner)  # a completed entry is never released
    assert (await node_a.claim("k", "fp", 10)).state == "completed"


async def test_idempotency_store_down_is_reported_as_unavailable() -> None:
    from ._servers import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    try:
        store = RedisIdempotencyStore(client, prefix="x:", retry_for=0.3)
        with pytest.raises(splitchat.IdempotencyStoreUnavailable):
            await store.claim("k", "fp", 10)
    finally:
        await client.aclose()


async def test_concurrent_claims_from_two_nodes_have_exactly_one_owner(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    stores = [RedisIdempotencyStore(c, prefix=prefix) for c in clients]
    states: list[str] = []

    async def claim(store: RedisIdempotencyStore) -> None:
        states.append((await store.claim("race", "fp", 10)).state)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(claim, stores[i % 2])
    assert sorted(states) == ["claimed"] + ["in_progress"] * 19


# ---- presence -------------------------------------------------------------------------------


async def test_presence_first_join_and_last_leave_are_race_free_across_nodes(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    nodes = [RedisPresence(c, prefix=prefix) for c in clients]
    joins: list[bool] = []
    leaves: list[bool] = []

    async def join(i: int) -> None:
        joins.append(await nodes[i % 2].join("room", ALICE, f"n{i % 2}:c{i}"))

    async def leave(i: int) -> None:
        leaves.append(await nodes[i % 2].leave("room", ALICE, f"n{i % 2}:c{i}"))

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(join, i)
    assert joins.count(True) == 1 and len(joins) == 30
    assert await nodes[1].members("room") == [ALICE.identity()]
    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(leave, i)
    assert leaves.count(True) == 1 and len(leaves) == 30
    assert await nodes[0].members("room") == []
    assert await nodes[0].leave("room", ALICE, "n0:c0") is False  # already gone


async def test_presence_of_a_crashed_node_expires_and_is_reported_once(
    prefix: str, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    alive = RedisPresence(clients[0], prefix=prefix, lease_ttl=0.6, refresh_interval=0.1)
    crashed = RedisPresence(clients[1], prefix=prefix, lease_ttl=0.6, refresh_interval=0.1)
    assert await crashed.join("room", BOB, "dead:c1")
    assert await crashed.join("room", ALICE, "dead:c2")
    assert await alive.join("room", ALICE, "live:c1") is False  # Alice is also on the live node
    assert sorted(m["id"] for m in await alive.members("room")) == ["alice", "bob:1"]
    # The crashed node stops refreshing; the live one keeps sweeping (and refreshing its own).
    gone: list[tuple[str, dict[str, object]]] = []
    with anyio.fail_after(5):
        while not gone:
            await anyio.sleep(0.15)
            gone += await alive.sweep()
    for _ in range(3):
        await anyio.sleep(0.15)
        gone += await alive.sweep()
    assert gone == [("room", BOB.identity())]  # once; Alice still has a live connection
    assert [m["id"] for m in await alive.members("room")] == ["alice"]
    assert await alive.leave("room", ALICE, "live:c1") is True  # her last live one


async def test_redis_state_wires_a_shared_rate_limiter(prefix: str) -> None:
    state_a, state_b = splitchat.redis_state(URL, prefix=prefix), RedisState(URL, prefix=prefix)
    async with state_a, state_b:
        decisions = [
            await (state_a if i % 2 else state_b).rate_limiter.hit("user:1", "3/minute") for i in range(5)
        ]
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert isinstance(state_a.session_store, RedisSessionStore)
