"""InMemoryIdempotencyStore: claim / complete / release, TTL and bounds (asyncio and trio)."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from splitchat import InMemoryIdempotencyStore, StoredResponse, request_fingerprint


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


RESPONSE = StoredResponse(200, [("content-type", "application/json")], b'{"ok":true}')


async def test_claim_then_complete_then_replay() -> None:
    store = InMemoryIdempotencyStore()
    first = await store.claim("k", "fp", 300)
    assert first.state == "claimed" and first.fingerprint == "fp"
    busy = await store.claim("k", "fp", 300)
    assert busy.state == "in_progress" and busy.response is None
    await store.complete("k", "fp", RESPONSE, 300)
    done = await store.claim("k", "fp", 300)
    assert done.state == "completed" and done.response == RESPONSE
    other = await store.claim("k", "other-fp", 300)
    assert other.state == "completed" and other.fingerprint == "fp"


async def test_release_lets_a_retry_claim_but_never_drops_a_completed_entry() -> None:
    store = InMemoryIdempotencyStore()
    await store.claim("k", "fp", 300)
    await store.release("k")
    assert (await store.claim("k", "fp", 300)).state == "claimed"
    await store.complete("k", "fp", RESPONSE, 300)
    await store.release("k")
    assert (await store.claim("k", "fp", 300)).state == "completed"
    await store.release("missing")  # no error


async def test_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    store = InMemoryIdempotencyStore(clock=clock)
    await store.claim("stuck", "fp", 10)  # owner crashed: never completed nor released
    await store.claim("k", "fp", 300)
    await store.complete("k", "fp", RESPONSE, 300)
    clock.now += 11
    assert (await store.claim("stuck", "fp", 10)).state == "claimed"
    clock.now += 290
    assert (await store.claim("k", "fp", 300)).state == "claimed"


async def test_bounded_by_max_entries_oldest_evicted_first() -> None:
    store = InMemoryIdempotencyStore(max_entries=3)
    for i in range(5):
        await store.claim(f"k{i}", "fp", 300)
        await store.complete(f"k{i}", "fp", RESPONSE, 300)
    assert len(store) == 3
    assert (await store.claim("k0", "fp", 300)).state == "claimed"  # evicted
    assert (await store.claim("k4", "fp", 300)).state == "completed"
    with pytest.raises(ValueError):
        InMemoryIdempotencyStore(max_entries=0)


async def test_concurrent_claims_have_exactly_one_owner() -> None:
    store = InMemoryIdempotencyStore()
    states: list[str] = []

    async def claim() -> None:
        await anyio.lowlevel.checkpoint()
        states.append((await store.claim("k", "fp", 300)).state)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(claim)
    assert states.count("claimed") == 1
    assert states.count("in_progress") == 19


def test_fingerprint_distinguishes_method_path_and_body() -> None:
    base = request_fingerprint("POST", "/a", b"{}")
    assert base == request_fingerprint("POST", "/a", b"{}")
    assert base != request_fingerprint("PATCH", "/a", b"{}")
    assert base != request_fingerprint("POST", "/b", b"{}")
    assert base != request_fingerprint("POST", "/a", b"{ }")
    # The separator keeps ("POST", "/a\0b") and ("POST", "/a", b"b"...) apart.
    assert request_fingerprint("POST", "/ab", b"") != request_fingerprint("POST", "/a", b"b")


async def test_in_flight_claims_are_never_evicted_and_a_full_store_says_so() -> None:
    store = InMemoryIdempotencyStore(max_entries=3)
    for name in ("alice", "bob"):
        await store.claim(f"{name}\0cmd\0k", "fp", 300)
    await store.claim("carol\0cmd\0done", "fp", 300)
    await store.complete("carol\0cmd\0done", "fp", RESPONSE, 300)
    # Full: the completed entry is evicted, the in-flight claims stay.
    assert (await store.claim("mallory\0cmd\0k1", "fp", 300)).state == "claimed"
    assert (await store.claim("carol\0cmd\0done", "fp", 300)).state == "full"
    assert (await store.claim("alice\0cmd\0k", "fp", 300)).state == "in_progress"
    assert (await store.claim("bob\0cmd\0k", "fp", 300)).state == "in_progress"


async def test_entries_per_principal_are_capped() -> None:
    store = InMemoryIdempotencyStore(max_entries=100, max_entries_per_principal=2)
    await store.claim("mallory\0cmd\0a", "fp", 300)
    await store.complete("mallory\0cmd\0a", "fp", RESPONSE, 300)
    await store.claim("mallory\0cmd\0b", "fp", 300)
    assert (await store.claim("mallory\0cmd\0c", "fp", 300)).state == "claimed"  # evicts a
    assert (await store.claim("mallory\0cmd\0d", "fp", 300)).state == "full"
    assert (await store.claim("alice\0cmd\0a", "fp", 300)).state == "claimed"  # others unaffected
    assert (await store.claim("mallory\0cmd\0a", "fp", 300)).state == "full"  # a was evicted
    with pytest.raises(ValueError):
        InMemoryIdempotencyStore(max_entries_per_principal=0)


async def test_an_expired_entry_behind_a_live_one_frees_room_at_the_bound() -> None:
    # _purge skips its scan while nothing can have expired; a short TTL added after a long one
    # must still lower that bound, or the expired entry would keep the room.
    clock = FakeClock()
    store = InMemoryIdempotencyStore(max_entries=100, max_entries_per_principal=3, clock=clock)
    await store.claim("u\0cmd\0long", "fp", 300)
    await store.claim("u\0cmd\0short", "fp", 5)
    await store.claim("u\0cmd\0mid", "fp", 100)
    assert (await store.claim("u\0cmd\0next", "fp", 300)).state == "full"  # all in flight, none expired
    clock.now += 6
    assert (await store.claim("u\0cmd\0next", "fp", 300)).state == "claimed"  # "short" purged
    assert (await store.claim("u\0cmd\0short", "fp", 300)).state == "full"
    assert (await store.claim("u\0cmd\0long", "fp", 300)).state == "in_progress"
    clock.now += 95  # "mid" expires next: the bound was recomputed from the live entries
    assert (await store.claim("u\0cmd\0short", "fp", 300)).state == "claimed"
    assert len(store) == 3


async def test_a_late_owner_cannot_release_or_overwrite_a_newer_claim() -> None:
    clock = FakeClock()
    store = InMemoryIdempotencyStore(clock=clock)
    old = await store.claim("k", "fp", 10)
    assert old.owner is not None
    clock.now += 11  # the first request outlived its claim; a retry takes the key
    new = await store.claim("k", "fp", 10)
    assert new.state == "claimed" and new.owner not in (None, old.owner)
    await store.release("k", owner=old.owner)
    assert (await store.claim("k", "fp", 10)).state == "in_progress"
    await store.complete("k", "fp", RESPONSE, 10, owner=old.owner)
    assert (await store.claim("k", "fp", 10)).state == "in_progress"
    await store.complete("k", "fp", RESPONSE, 10, owner=new.owner)
    assert (await store.claim("k", "fp", 10)).state == "completed"


class StoreMachine(RuleBasedStateMachine):
    """The store against an independent model: TTLs, owners, per-principal and global bounds.

    The model keeps its own entries and its own completion order and decides by itself what a
    claim must answer (claimed / in_progress / completed / full) and which completed entry an
    eviction removes (the oldest completion of the principal at its bound, else overall).
    """

    MAX, PER_PRINCIPAL = 4, 3

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = InMemoryIdempotencyStore(
            max_entries=self.MAX, max_entries_per_principal=self.PER_PRINCIPAL, clock=self.clock
        )
        # key -> [fingerprint, expires, completed, owner]
        self.model: dict[str, list[object]] = {}
        self.completion_order: list[str] = []
        self.owners: dict[str, str | None] = {}  # last owner token handed out per key

    def _drop(self, key: str) -> None:
        del self.model[key]
        if key in self.completion_order:
            self.completion_order.remove(key)

    def _drop_expired(self) -> None:
        for key in [k for k, v in self.model.items() if float(v[1]) <= self.clock.now]:  # type: ignore[arg-type]
            self._drop(key)

    def _room(self, principal: str) -> bool:
        self._drop_expired()
        mine = [k for k in self.model if k.split("\0")[0] == principal]
        if len(mine) >= self.PER_PRINCIPAL:
            oldest = next((k for k in self.completion_order if k.split("\0")[0] == principal), None)
            if oldest is None:
                return False
            self._drop(oldest)
        if len(self.model) >= self.MAX:
            if not self.completion_order:
                return False
            self._drop(self.completion_order[0])
        return True

    keys = st.sampled_from([f"{p}\0cmd\0{k}" for p in ("p1", "p2") for k in ("a", "b", "c", "d")])

    @rule(key=keys, fp=st.sampled_from(["x", "y"]), ttl=st.integers(1, 20))
    def claim(self, key: str, fp: str, ttl: int) -> None:
        result = anyio.run(self.store.claim, key, fp, float(ttl))
        entry = self.model.get(key)
        if entry is not None and float(entry[1]) <= self.clock.now:  # type: ignore[arg-type]
            self._drop(key)
            entry = None
        if entry is not None:
            assert result.state == ("completed" if entry[2] else "in_progress")
            assert result.fingerprint == entry[0]
            assert result.owner is None
        elif self._room(key.split("\0")[0]):
            assert result.state == "claimed" and result.fingerprint == fp and result.owner is not None
            self.model[key] = [fp, self.clock.now + ttl, False, result.owner]
            self.owners[key] = result.owner
        else:
            assert result.state == "full"

    @rule(key=keys, ttl=st.integers(1, 20), stale=st.booleans())
    def complete(self, key: str, ttl: int, stale: bool) -> None:
        entry = self.model.get(key)
        live = entry is not None and float(entry[1]) > self.clock.now  # type: ignore[arg-type]
        if entry is None or entry[2] or not live:
            return
        owner = "not-the-owner" if stale else str(entry[3])
        anyio.run(lambda: self.store.complete(key, str(entry[0]), RESPONSE, float(ttl), owner=owner))
        if stale:
            return  # someone else's claim: left alone
        self._drop(key)
        assert self._room(key.split("\0")[0])  # its own slot was just freed
        self.model[key] = [entry[0], self.clock.now + ttl, True, None]
        self.completion_order.append(key)

    @rule(key=keys, stale=st.booleans())
    def release(self, key: str, stale: bool) -> None:
        entry = self.model.get(key)
        owner = "not-the-owner" if stale else self.owners.get(key)
        anyio.run(lambda: self.store.release(key, owner=owner))
        if entry is not None and not entry[2] and not stale and entry[3] == owner:
            self._drop(key)

    @rule(seconds=st.integers(0, 15))
    def advance(self, seconds: int) -> None:
        self.clock.now += seconds

    @invariant()
    def bounded(self) -> None:
        assert len(self.store) <= self.MAX


StoreMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
test_store_state_machine = StoreMachine.TestCase
