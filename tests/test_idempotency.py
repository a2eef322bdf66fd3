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


class StoreMachine(RuleBasedStateMachine):
    """The store against a model dict, under a fake clock and a small bound."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = InMemoryIdempotencyStore(max_entries=4, clock=self.clock)
        # key -> (fingerprint, expires, completed)
        self.model: dict[str, tuple[str, float, bool]] = {}

    def _live(self, key: str) -> tuple[str, float, bool] | None:
        entry = self.model.get(key)
        if entry is not None and entry[1] <= self.clock.now:
            del self.model[key]
            return None
        return entry

    keys = st.sampled_from(["a", "b", "c", "d", "e", "f"])

    @rule(key=keys, fp=st.sampled_from(["x", "y"]), ttl=st.integers(1, 20))
    def claim(self, key: str, fp: str, ttl: int) -> None:
        held = self.store._entries.get(key)
        present = held is not None and held.expires > self.clock.now
        result = anyio.run(self.store.claim, key, fp, float(ttl))
        entry = self._live(key)
        if not present:
            # Nothing live (never claimed, expired, released or evicted under the bound).
            assert result.state == "claimed"
            self.model[key] = (fp, self.clock.now + ttl, False)
        else:
            assert entry is not None, "store reported an entry the model says is gone"
            assert result.state != "claimed"
            assert result.fingerprint == entry[0]
            assert (result.state == "completed") == entry[2]

    @rule(key=keys, ttl=st.integers(1, 20))
    def complete(self, key: str, ttl: int) -> None:
        entry = self._live(key)
        if entry is None or entry[2]:
            return
        anyio.run(self.store.complete, key, entry[0], RESPONSE, float(ttl))
        self.model[key] = (entry[0], self.clock.now + ttl, True)

    @rule(key=keys)
    def release(self, key: str) -> None:
        anyio.run(self.store.release, key)
        entry = self._live(key)
        if entry is not None and not entry[2]:
            del self.model[key]

    @rule(seconds=st.integers(0, 15))
    def advance(self, seconds: int) -> None:
        self.clock.now += seconds

    @invariant()
    def bounded(self) -> None:
        assert len(self.store) <= 4
        # Every entry the store still has agrees with the model (eviction may only remove).
        for key, entry in self.store._entries.items():
            if entry.expires > self.clock.now:
                modelled = self._live(key)
                assert modelled is not None
                assert modelled[0] == entry.fingerprint
                assert modelled[2] == (entry.response is not None)


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_store_state_machine = StoreMachine.TestCase
