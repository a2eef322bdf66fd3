"""Crash checkpoints in the pure core: acknowledged seq -> bus positions, and a resume from them."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings, strategies as st

from splitchat import (
    Dispatch,
    GatewayConfig,
    GatewayConnection,
    InMemorySessionStore,
    Position,
    Principal,
    SessionRecord,
    SessionState,
)
from splitchat._protocol import Checkpoint

from .test_gateway_protocol import drain, event, frame

ALICE = Principal(id="alice", name="Alice")
CFG = GatewayConfig(heartbeat_interval=10.0, identify_timeout=5.0, resume_window=60.0, replay_frames=6)


def connected(channels: tuple[str, ...], seams: dict[str, Position]) -> GatewayConnection:
    conn = GatewayConnection(CFG)
    conn.start(0.0)
    conn.receive_data(frame(2, {"token": "t", "subscriptions": list(channels)}), 0.1)
    conn.identified(ALICE, "sid", 0.2)
    actions = conn.authorized(list(channels), [], 0.3)
    assert conn.session is not None
    for channel in channels:  # what the gateway does when it routes the channels
        conn.session.seed_position(channel, seams[channel])
    assert Checkpoint() in actions  # READY is checkpointed
    return conn


# One step: deliver an event on a channel (durable or ephemeral), or a control dispatch.
STEPS = st.lists(st.tuples(st.sampled_from(["a", "b", "ctl"]), st.booleans()), max_size=25)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS)
def test_positions_at_every_replayable_seq_match_a_brute_force_replay(steps: list[tuple[str, bool]]) -> None:
    seams = {"a": Position("e", 10), "b": Position("e", 0)}
    state = SessionState("sid", ALICE)
    state.channels = {"a", "b"}
    for channel, position in seams.items():
        state.seed_position(channel, position)
    history: list[tuple[int, str, Position]] = []  # (seq, channel, position) of durable events
    offsets = {"a": 10, "b": 0}
    for channel, ephemeral in steps:
        if channel == "ctl":
            state.assign(Dispatch.of("SUBSCRIBED", {"granted": []}), 1.0, CFG)
            continue
        if ephemeral:
            state.assign(Dispatch("TYPING", b"{}", channel=channel, ephemeral=True), 1.0, CFG)
            continue
        offsets[channel] += 1
        position = Position("e", offsets[channel])
        seq = state.assign(Dispatch("M", b"{}", event_id="x", channel=channel, position=position), 1.0, CFG)
        history.append((seq, channel, position))
    for seq in range(0, state.seq + 2):
        got = state.positions_at(seq)
        if seq < state.buffer_floor or seq > state.seq:
            assert got is None
            continue
        expected = dict(seams) | {channel: position for s, channel, position in history if s <= seq}
        assert got == expected, (seq, state.buffer_floor)


def test_ack_moves_the_checkpoint_only_forward_and_only_when_answerable() -> None:
    conn = connected(("room",), {"room": Position("e1", 0)})
    session = conn.session
    assert session is not None
    for n in range(1, 5):
        conn.deliver(event(n), 1.0)  # seqs 2..5
    assert conn.receive_data(frame(1, 3), 1.0) == [Checkpoint()]
    assert session.acked_seq == 3 and session.acked_positions == {"room": Position("e1", 2)}
    assert conn.receive_data(frame(1, 2), 1.0) == []  # stale ack: nothing moves
    assert conn.receive_data(frame(1, 99), 1.0) == []  # beyond the last seq: ignored
    assert conn.receive_data(frame(1, None), 1.0) == []
    assert conn.receive_data(frame(1, "5"), 1.0) == []
    assert session.acked_seq == 3
    for n in range(5, 15):
        conn.deliver(event(n), 1.0)  # the 6-frame buffer evicts seq <= 9
    assert session.buffer_floor > 5
    assert conn.receive_data(frame(1, 5), 1.0) == []  # below the floor: keep the older checkpoint
    assert session.acked_positions == {"room": Position("e1", 2)}
    record = SessionRecord.checkpoint_of(session, expires_at=99.0, owner="A")
    assert (record.seq, record.checkpoint, record.buffer, record.owner) == (3, True, [], "A")
    assert drain(conn)[-1]["op"] == 11


def resume_frames(conn: GatewayConnection) -> list[dict[str, Any]]:
    return [f for f in drain(conn) if isinstance(f, dict)]


def test_resume_from_a_crash_checkpoint_resends_after_the_ack_and_loses_nothing() -> None:
    # Node A: the client got seqs up to 9 (READY + events 1..8), but acked only 4 (events 1..3).
    a = connected(("room", "other"), {"room": Position("e1", 0), "other": Position("e1", 5)})
    for n in range(1, 9):
        a.deliver(event(n), 1.0)
    a.deliver(event(100, "other", offset=6), 1.0)  # seq 10: the client never got it
    got_by_client = [f for f in resume_frames(a) if f.get("t") == "MESSAGE_CREATE"][:8]
    a.receive_data(frame(1, 4), 1.0)
    assert a.session is not None
    wire = msgspec.msgpack.encode(SessionRecord.checkpoint_of(a.session, 99.0, "A"))
    record = msgspec.msgpack.decode(wire, type=SessionRecord)  # A dies; B reads the checkpoint
    assert record.positions == {"room": Position("e1", 3), "other": Position("e1", 5)}

    b = GatewayConnection(CFG)
    b.start(2.0)
    b.receive_data(frame(6, {"token": "t", "session_id": "sid", "seq": 9}), 2.0)
    assert b.resume_begin(record.to_state(2.0), 2.0, from_checkpoint=True) == []
    b.deliver(event(9), 2.0)  # live while B rebuilds: held, then deduplicated against history
    # Bus history after the checkpoint positions, as the gateway rebuilds it:
    missed = [event(n) for n in range(4, 10)] + [event(100, "other", offset=6)]
    actions = b.resume_complete(missed, 2.0)
    assert Checkpoint() in actions
    frames = resume_frames(b)
    dispatched = [f for f in frames if f.get("t") == "MESSAGE_CREATE"]
    resumed = next(f for f in frames if f.get("t") == "RESUMED")
    assert resumed["d"] == {"replayed": 7, "skipped_ephemeral": 0, "duplicates_possible": True}
    assert [f["s"] for f in dispatched] == list(range(10, 17))  # numbering continues after 9
    # The application view: dedupe by event id -> every event exactly once, none lost.
    seen = [f["id"] for f in got_by_client]
    app = seen + [f["id"] for f in dispatched if f["id"] not in seen]
    assert app == [str(n) for n in range(1, 10)] + ["100"]
    assert b.session is not None and b.session.acked_seq == 9


def test_a_client_behind_its_own_acknowledgement_cannot_resume_a_checkpoint() -> None:
    state = SessionState("sid", ALICE)
    state.channels = {"room"}
    state.acked_seq = 7
    record = SessionRecord.checkpoint_of(state, 99.0)
    b = GatewayConnection(CFG)
    b.start(0.0)
    b.receive_data(frame(6, {"token": "t", "session_id": "sid", "seq": 5}), 0.0)
    b.resume_begin(record.to_state(0.0), 0.0, from_checkpoint=True)
    assert drain(b)[-1] == {"op": 9, "d": False, "s": None, "t": None}


async def test_in_memory_store_refuses_writes_from_a_node_that_lost_the_session() -> None:
    store = InMemorySessionStore()
    state = SessionState("sid", ALICE)
    assert await store.save_many([SessionRecord.checkpoint_of(state, 9e9, "A")]) == [True]
    assert await store.claim("sid", "B", 9e9) == "A"
    assert await store.save_many([SessionRecord.checkpoint_of(state, 9e9, "A")]) == [False]
    taken = await store.take("sid")
    assert taken is not None and taken.owner == "A"


async def test_in_memory_store_forgets_expired_records_as_it_goes() -> None:
    now = [100.0]
    store = InMemorySessionStore(clock=lambda: now[0])
    for n in range(5):
        state = SessionState(f"s{n}", ALICE)
        await store.save(SessionRecord.checkpoint_of(state, expires_at=now[0] + 10))
    now[0] = 200.0  # every record outlived its resume window
    await store.save(SessionRecord.checkpoint_of(SessionState("fresh", ALICE), expires_at=210.0))
    assert len(store) == 1
