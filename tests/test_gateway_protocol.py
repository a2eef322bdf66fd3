"""The pure gateway core: no event loop, no sockets; time is a float we pass in."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from splitchat import (
    ClientFrame,
    CloseCode,
    ConnectionState,
    Dispatch,
    FrameError,
    GatewayConfig,
    GatewayConnection,
    InMemoryPresence,
    InMemorySessionStore,
    Position,
    Principal,
    SessionRecord,
    decode_client_frame,
)
from splitchat._payloads import IdentifyPayload, ResumePayload
from splitchat._protocol import (
    Authenticate,
    AuthorizeChannels,
    Checkpoint,
    Close,
    ResumeLookup,
    Subscribe,
    Unsubscribe,
)

ALICE = Principal(id="alice", name="Alice")
CFG = GatewayConfig(heartbeat_interval=10.0, identify_timeout=5.0, resume_window=60.0)


def drain(conn: GatewayConnection) -> list[Any]:
    """Everything the writer would send: decoded frames, and Close objects."""
    out: list[Any] = []
    while (item := conn.next_outgoing()) is not None:
        if isinstance(item, Close):
            out.append(item)
        elif isinstance(item, str):
            out.append(json.loads(item))
        else:
            out.append(msgspec.msgpack.decode(item))
    return out


def frame(op: int, d: Any = None) -> str:
    return json.dumps({"op": op, "d": d})


def event(n: int, channel: str = "room", *, ephemeral: bool = False, offset: int | None = None) -> Dispatch:
    position = None if ephemeral else Position("e1", offset if offset is not None else n)
    return Dispatch(
        "MESSAGE_CREATE",
        json.dumps({"n": n}).encode(),
        event_id=str(n),
        channel=channel,
        position=position,
        ephemeral=ephemeral,
    )


def connected(channels: tuple[str, ...] = ("room",), config: GatewayConfig = CFG) -> GatewayConnection:
    conn = GatewayConnection(config)
    conn.start(0.0)
    actions = conn.receive_data(frame(2, {"token": "t", "subscriptions": list(channels)}), 0.1)
    assert actions == [Authenticate("t")]
    actions = conn.identified(ALICE, "sid", 0.2)
    if channels:
        assert actions == [AuthorizeChannels(channels)]
        actions = conn.authorized(list(channels), [], 0.3)
        assert actions == [Subscribe(channels), Checkpoint()]
    assert conn.state is ConnectionState.CONNECTED
    return conn


def test_handshake_hello_identify_ready() -> None:
    conn = GatewayConnection(GatewayConfig(resume_gateway_url="wss://r"))
    assert conn.start(0.0) == []
    (hello,) = drain(conn)
    assert hello == {
        "op": 10,
        "d": {
            "heartbeat_interval": 41250,
            "max_frame_bytes": 4096,
            "frame_budget": 120,
            "frame_budget_window": 60000,
            "resume_window": 120000,
            "identify_timeout": 10000,
            "max_channels": 100,
            "max_channel_length": 200,
        },
        "s": None,
        "t": None,
    }
    conn.receive_data(frame(2, {"token": "t", "subscriptions": ["a", "b", "a"]}), 1.0)
    assert conn.identified(ALICE, "sid", 1.0) == [AuthorizeChannels(("a", "b"))]
    assert conn.authorized(["a"], ["b"], 1.0) == [Subscribe(("a",)), Checkpoint()]
    (ready,) = drain(conn)
    assert ready["s"] == 1 and ready["t"] == "READY"
    assert ready["d"] == {
        "session_id": "sid",
        "resume_gateway_url": "wss://r",
        "user": {"id": "alice", "name": "Alice"},
        "subscriptions": ["a"],
        "denied": ["b"],
    }


def test_dispatches_get_consecutive_seqs_and_protocol_keys() -> None:
    conn = connected()
    drain(conn)
    for n in range(1, 4):
        conn.deliver(event(n), 1.0)
    frames = drain(conn)
    assert [f["s"] for f in frames] == [2, 3, 4]
    assert frames[0] == {"op": 0, "t": "MESSAGE_CREATE", "d": {"n": 1}, "id": "1", "channel": "room", "s": 2}
    # A duplicate (same bus position) is never dispatched twice.
    assert conn.deliver(event(3), 1.0) == [] and drain(conn) == []
    # Other channels are not routed to this session.
    conn.deliver(event(9, channel="other"), 1.0)
    assert drain(conn) == []


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(99), CloseCode.UNKNOWN_OPCODE),
        (frame(0), CloseCode.UNKNOWN_OPCODE),  # a server-only opcode from the client
        (frame(12, {"channels": ["x"]}), CloseCode.NOT_AUTHENTICATED),
        (frame(13, {"channels": ["x"]}), CloseCode.NOT_AUTHENTICATED),
        ("{nope", CloseCode.DECODE_ERROR),
        (json.dumps({"op": 1, "d": "x" * 5000}), CloseCode.DECODE_ERROR),
        (frame(2, {"token": 5}), CloseCode.DECODE_ERROR),
        (frame(6, {"token": "t", "session_id": "s", "seq": "1"}), CloseCode.DECODE_ERROR),
    ],
)
def test_bad_input_before_identify_closes_with_the_documented_code(data: str, code: int) -> None:
    conn = GatewayConnection(CFG)
    conn.start(0.0)
    drain(conn)
    (close,) = conn.receive_data(data, 1.0)
    assert isinstance(close, Close) and close.code == code and not close.resumable
    assert drain(conn) == [close]
    assert conn.receive_data(frame(1), 1.0) == []  # closed: nothing more happens


def test_identify_timeout_4003_and_bad_token_4004_and_second_identify_4005() -> None:
    conn = GatewayConnection(CFG)
    conn.start(0.0)
    assert conn.tick(4.9) == []
    assert conn.receive_data(frame(1), 4.9) == []  # heartbeats are fine before IDENTIFY
    assert [f["op"] for f in drain(conn)] == [10, 11]  # HELLO, HEARTBEAT_ACK
    (close,) = conn.tick(5.0)
    assert isinstance(close, Close) and close.code == 4003

    conn = GatewayConnection(CFG)
    conn.start(0.0)
    conn.receive_data(frame(2, {"token": "bad"}), 1.0)
    (close,) = conn.identified(None, "sid", 1.0)
    assert isinstance(close, Close) and close.code == 4004 and not close.resumable

    conn = connected()
    (close,) = conn.receive_data(frame(2, {"token": "t"}), 1.0)
    assert isinstance(close, Close) and close.code == 4005


def test_heartbeat_deadline_4009_is_resumable() -> None:
    conn = connected()
    assert conn.next_deadline() == 15.0  # 1.5 x 10 s after HELLO
    conn.receive_data(frame(1, 1), 10.0)
    assert drain(conn)[-1]["op"] == 11
    assert conn.next_deadline() == 25.0
    assert conn.tick(24.9) == []
    (close,) = conn.tick(25.0)
    assert isinstance(close, Close) and close.code == 4009 and close.resumable


def test_frame_budget_rate_limited_then_4008_a_few_heartbeats_exempt() -> None:
    cfg = GatewayConfig(frame_budget=3, frame_budget_window=10.0, heartbeat_interval=100)
    conn = connected((), cfg)  # IDENTIFY used 1 of 3
    drain(conn)
    for _ in range(3):  # the free heartbeats of one interval
        conn.receive_data(frame(1), 1.0)
    assert [f["op"] for f in drain(conn)] == [11, 11, 11]
    conn.receive_data(frame(13, {"channels": []}), 1.0)
    conn.receive_data(frame(13, {"channels": []}), 1.0)
    assert [f["t"] for f in drain(conn)] == ["UNSUBSCRIBED", "UNSUBSCRIBED"]
    conn.receive_data(frame(13, {"channels": []}), 4.0)  # 4th: over budget
    (limited,) = drain(conn)
    assert limited["t"] == "RATE_LIMITED" and limited["d"] == {"retry_after": 6.0, "op": 13}
    conn.receive_data(frame(13, {"channels": []}), 4.0)
    conn.receive_data(frame(13, {"channels": []}), 4.0)
    (close,) = conn.receive_data(frame(13, {"channels": []}), 4.0)  # 7th > 2 x budget
    assert isinstance(close, Close) and close.code == 4008
    # a new window starts fresh
    conn = connected((), cfg)
    for t in (1.0, 2.0, 11.0, 12.0, 13.0):
        conn.receive_data(frame(13, {"channels": []}), t)
    assert "RATE_LIMITED" not in [f.get("t") for f in drain(conn)]


def test_a_heartbeat_flood_is_charged_to_the_frame_budget_and_closed_4008() -> None:
    cfg = GatewayConfig(frame_budget=5, frame_budget_window=60.0, heartbeat_interval=10.0)
    conn = connected((), cfg)  # IDENTIFY used 1 of 5
    drain(conn)
    closes = []
    for _ in range(1000):
        closes += conn.receive_data(frame(1), 1.0)
    (close,) = closes
    assert isinstance(close, Close) and close.code == 4008
    out = drain(conn)
    # 3 free + 4 left in the budget are answered, then RATE_LIMITED up to twice the budget, then
    # 4008: a flood of 1,000 heartbeats costs a bounded number of frames
    assert [f["op"] for f in out[:-1] if f["op"] == 11] == [11] * 7
    assert [f["t"] for f in out[:-1] if f["op"] == 0] == ["RATE_LIMITED"] * 5
    assert out[-1] is close
    # one heartbeat per interval (plus a couple) never touches the budget
    conn = connected((), cfg)
    for n in range(100):
        for _ in range(3):
            conn.receive_data(frame(1, 1), 1.0 + 10.0 * n)
    assert conn.state is ConnectionState.CONNECTED
    assert {f["op"] for f in drain(conn)[2:]} == {11}  # (after HELLO, READY)


def test_outbox_overflow_drops_ephemeral_first_then_closes_4010() -> None:
    cfg = GatewayConfig(send_queue_frames=5)
    conn = connected(("room",), cfg)
    drain(conn)
    conn.deliver(event(1), 1.0)
    conn.deliver(event(2, ephemeral=True), 1.0)
    conn.deliver(event(3), 1.0)
    conn.deliver(event(4, ephemeral=True), 1.0)
    conn.deliver(event(5), 1.0)
    assert conn.outbox_frames == 5
    assert conn.deliver(event(6), 1.0) == []  # fits after dropping the two ephemeral frames
    assert conn.outbox_frames == 4
    conn.deliver(event(7, ephemeral=True), 1.0)
    assert conn.deliver(event(8, ephemeral=True), 1.0) == []  # the older ephemeral one made room
    assert conn.outbox_frames == 5
    assert conn.deliver(event(9), 1.0) == []  # ... and so did this one for a durable event
    assert [json.loads(o.item.render("json", o.seq))["d"]["n"] for o in conn._outbox] == [1, 3, 5, 6, 9]
    (close,) = conn.deliver(event(10), 1.0)
    assert isinstance(close, Close) and close.code == 4010 and close.resumable
    assert drain(conn) == [close]  # the queue is discarded: a stalled client gets only the close
    assert conn.outbox_peak_frames == 5

    cfg = GatewayConfig(send_queue_frames=100, send_queue_bytes=1000)
    conn = connected(("room",), cfg)
    drain(conn)
    big = Dispatch("X", b'"' + b"x" * 600 + b'"', event_id="1", channel="room", position=Position("e", 1))
    assert conn.deliver(big, 1.0) == [] and conn.outbox_frames == 1
    (close,) = conn.deliver(
        Dispatch("X", b'"' + b"x" * 600 + b'"', event_id="2", channel="room", position=Position("e", 2)), 1.0
    )
    assert isinstance(close, Close) and close.code == 4010


def start_resume(session_of: GatewayConnection, seq: int) -> GatewayConnection:
    new = GatewayConnection(session_of.config)
    new.start(10.0)
    drain(new)
    actions = new.receive_data(frame(6, {"token": "t", "session_id": "sid", "seq": seq}), 10.0)
    assert actions == [ResumeLookup("t", "sid", seq)]
    assert session_of.session is not None
    new.resume_begin(session_of.session, 10.0)
    return new


def test_resume_replays_missed_in_order_then_resumed_then_live_without_gap() -> None:
    old = connected()
    for n in range(1, 6):
        old.deliver(event(n), 1.0)
    frames = [f for f in drain(old) if f["op"] == 0]
    assert [f["s"] for f in frames] == [1, 2, 3, 4, 5, 6]
    old.connection_lost(1006)
    assert old.resumable
    # The detached session keeps collecting (same node): one ephemeral, two durable.
    old.deliver(event(6), 2.0)
    old.deliver(event(7, ephemeral=True), 2.0)
    old.deliver(event(8), 2.0)
    new = start_resume(old, seq=4)  # the client processed up to s=4
    new.deliver(event(9), 10.0)  # live, during the replay: held
    new.deliver(event(8), 10.0)  # duplicate of a replayed one: dropped at the seam
    new.resume_complete([], 10.0)
    got = drain(new)
    assert [(f.get("t"), f.get("s")) for f in got] == [
        ("MESSAGE_CREATE", 5),
        ("MESSAGE_CREATE", 6),
        ("MESSAGE_CREATE", 7),
        ("MESSAGE_CREATE", 9),
        ("RESUMED", 10),
        ("MESSAGE_CREATE", 11),
    ]
    assert [f["d"].get("n") for f in got if f["t"] == "MESSAGE_CREATE"] == [4, 5, 6, 8, 9]
    assert got[4]["d"] == {"replayed": 4, "skipped_ephemeral": 1}
    new.deliver(event(10), 11.0)
    assert drain(new)[0]["s"] == 12


def test_resume_with_missed_events_from_history_dedupes_the_seam() -> None:
    old = connected()
    old.deliver(event(1), 1.0)
    drain(old)
    new = start_resume(old, seq=2)
    # Live events arrive while history is being read; history overlaps them.
    new.deliver(event(3), 10.0)
    new.deliver(event(4), 10.0)
    new.resume_complete([event(2), event(3)], 10.0)
    got = drain(new)
    assert [(f["t"], f["d"].get("n"), f["s"]) for f in got] == [
        ("MESSAGE_CREATE", 2, 3),
        ("MESSAGE_CREATE", 3, 4),
        ("RESUMED", None, 5),
        ("MESSAGE_CREATE", 4, 6),
    ]
    assert got[2]["d"] == {"replayed": 2, "skipped_ephemeral": 0}


def test_resume_with_a_full_replay_buffer_admits_replay_resumed_and_held_events() -> None:
    # replay buffer == outbox bound (as the Gateway configures it): a full replay, the events
    # rebuilt from history, RESUMED and a held live event must all reach the client.
    cfg = GatewayConfig(send_queue_frames=5, replay_frames=5, heartbeat_interval=100)
    old = connected(("room",), cfg)
    drain(old)  # READY, s=1
    old.connection_lost(1006)
    for n in range(1, 6):
        old.deliver(event(n), 1.0)  # s=2..6: the buffer is full
    assert old.session is not None and len(old.session.buffer) == 5
    new = start_resume(old, seq=1)
    new.deliver(event(8), 10.0)  # live, held during the (cross-node) catch-up
    actions = new.resume_complete([event(6), event(7)], 10.0)
    assert not any(isinstance(a, Close) for a in actions)
    assert new.outbox_frames == 9 and new.outbox_limit_frames == 5 + 9
    got = drain(new)
    assert [(f["t"], f["s"]) for f in got] == [("MESSAGE_CREATE", s) for s in range(2, 9)] + [
        ("RESUMED", 9),
        ("MESSAGE_CREATE", 10),
    ]
    assert got[7]["d"] == {"replayed": 7, "skipped_ephemeral": 0}
    assert new.outbox_limit_frames == 5  # the admitted frames were taken: back to the bound
    for n in range(9, 14):
        new.deliver(event(n), 11.0)
    assert new.state is ConnectionState.CONNECTED and new.outbox_frames == 5


def test_resumed_is_never_dropped_and_nothing_is_queued_after_a_close() -> None:
    cfg = GatewayConfig(send_queue_frames=3, replay_frames=3, heartbeat_interval=100)
    old = connected(("room",), cfg)
    drain(old)
    old.connection_lost(1006)
    for n in range(1, 4):
        old.deliver(event(n), 1.0)
    new = start_resume(old, seq=1)
    new.resume_complete([], 10.0)
    # live events fill the normal bound on top of the queued replay; ephemeral ones are dropped
    # under pressure, but never the replay or RESUMED
    for n in range(4, 10):
        new.deliver(event(n, ephemeral=True), 10.0)
    got = drain(new)
    assert [f["t"] for f in got][:4] == ["MESSAGE_CREATE"] * 3 + ["RESUMED"]
    # an overflow closes 4010 and queues nothing after the Close
    for n in range(10, 13):
        new.deliver(event(n), 11.0)
    (close,) = new.deliver(event(13), 11.0)
    assert isinstance(close, Close) and close.code == 4010
    assert new.deliver(event(14), 11.0) == [] and new.reconnect(11.0) == []
    assert drain(new) == [close]


def test_resume_rejections() -> None:
    old = connected()
    old.deliver(event(1), 1.0)
    # seq ahead of the session -> 4007
    new = start_resume(old, seq=3)
    assert new.state is ConnectionState.CLOSED and new.close_code == 4007
    # seq older than the replay buffer's floor -> INVALID_SESSION false, may IDENTIFY again
    assert old.session is not None
    old.session.buffer_floor = 1
    new = start_resume(old, seq=0)
    assert drain(new) == [{"op": 9, "d": False, "s": None, "t": None}]
    assert new.state is ConnectionState.AWAITING_IDENTIFY and new.session is None
    assert new.receive_data(frame(2, {"token": "t"}), 11.0) == [Authenticate("t")]
    # bad token -> 4004; unknown session -> INVALID_SESSION
    new = GatewayConnection(CFG)
    new.start(0.0)
    new.receive_data(frame(6, {"token": "t", "session_id": "x", "seq": 1}), 0.0)
    (close,) = new.resume_rejected(False, 0.0)
    assert isinstance(close, Close) and close.code == 4004
    new = GatewayConnection(CFG)
    new.start(0.0)
    drain(new)
    new.receive_data(frame(6, {"token": "t", "session_id": "x", "seq": 1}), 0.0)
    assert new.resume_rejected(True, 0.0) == [] and drain(new)[0]["op"] == 9


def test_invalid_session_restarts_the_identify_deadline() -> None:
    conn = GatewayConnection(CFG)  # identify_timeout 5 s
    conn.start(0.0)
    drain(conn)
    conn.receive_data(frame(6, {"token": "t", "session_id": "x", "seq": 1}), 4.95)
    assert conn.resume_rejected(True, 4.95) == []
    assert drain(conn) == [{"op": 9, "d": False, "s": None, "t": None}]
    assert conn.next_deadline() == pytest.approx(9.95)
    assert conn.tick(5.0) == []  # the old deadline no longer applies
    assert conn.receive_data(frame(2, {"token": "t"}), 9.0) == [Authenticate("t")]
    conn = GatewayConnection(CFG)
    conn.start(0.0)
    conn.receive_data(frame(6, {"token": "t", "session_id": "x", "seq": 1}), 4.0)
    conn.resume_rejected(True, 4.0)
    (close,) = conn.tick(9.0)  # ... but a new one does: 5 s after INVALID_SESSION
    assert isinstance(close, Close) and close.code == 4003


def test_replay_buffer_is_bounded_by_count_bytes_and_window() -> None:
    cfg = GatewayConfig(replay_frames=3, resume_window=10.0)
    conn = connected(("room",), cfg)
    for n in range(1, 6):
        conn.deliver(event(n), 1.0)
    session = conn.session
    assert session is not None
    assert [s for s, _, _, _ in session.buffer] == [4, 5, 6] and session.buffer_floor == 3
    conn.tick(11.5)  # everything is older than the resume window now
    assert not session.buffer and session.buffer_floor == 6


def test_subscribe_unsubscribe_and_gap_invalidation() -> None:
    conn = connected(("a",))
    drain(conn)
    assert conn.receive_data(frame(12, {"channels": ["a", "b"]}), 1.0) == [AuthorizeChannels(("b",))]
    assert conn.authorized(["b"], [], 1.0) == [Subscribe(("b",)), Checkpoint()]
    assert drain(conn)[0]["d"] == {"granted": ["b"], "denied": []}
    unsubscribe = frame(13, {"channels": ["a", "zzz"]})
    assert conn.receive_data(unsubscribe, 1.0) == [Unsubscribe(("a",)), Checkpoint()]
    assert drain(conn)[0]["d"] == {"channels": ["a"]}
    (close,) = conn.invalidate(2.0)
    assert isinstance(close, Close) and close.code == 4007 and not close.resumable
    assert drain(conn) == [{"op": 9, "d": False, "s": None, "t": None}, close]


def test_channels_over_the_limits_are_denied_not_closed() -> None:
    cfg = GatewayConfig(max_channels=3, max_channel_length=5)
    conn = GatewayConnection(cfg)
    conn.start(0.0)
    hello = drain(conn)[0]["d"]
    assert (hello["max_channels"], hello["max_channel_length"]) == (3, 5)
    asked = ["a", "", "toolong", "b", "a", "c", "d", "e"]
    assert conn.receive_data(frame(2, {"token": "t", "subscriptions": asked}), 0.1) == [Authenticate("t")]
    assert conn.identified(ALICE, "sid", 0.2) == [AuthorizeChannels(("a", "b", "c"))]
    conn.authorized(["a", "c"], ["b"], 0.3)
    (ready,) = drain(conn)
    assert ready["d"]["subscriptions"] == ["a", "c"]
    assert ready["d"]["denied"] == ["", "toolong", "d", "e", "b"]
    # SUBSCRIBE: one slot left; the rest and the long name are denied, the connection stays up
    assert conn.receive_data(frame(12, {"channels": ["x", "y", "waytoolong"]}), 1.0) == [
        AuthorizeChannels(("x", "y"))
    ]
    conn.authorized(["x", "y"], [], 1.0)
    (subscribed,) = drain(conn)
    assert subscribed["d"] == {"granted": ["x"], "denied": ["waytoolong", "y"]}
    conn.receive_data(frame(12, {"channels": ["waytoolong"]}), 1.0)
    assert drain(conn)[0]["d"] == {"granted": [], "denied": ["waytoolong"]}
    assert conn.state is ConnectionState.CONNECTED
    # a malformed list (not strings) is still a decode error
    (close,) = conn.receive_data(frame(12, {"channels": [1]}), 1.0)
    assert isinstance(close, Close) and close.code == 4002


def test_reconnect_and_client_close_codes() -> None:
    conn = connected()
    drain(conn)
    (close,) = conn.reconnect(1.0)
    assert isinstance(close, Close) and close.resumable
    assert drain(conn) == [{"op": 7, "d": None, "s": None, "t": None}, close]
    conn = connected()
    conn.connection_lost(1000)
    assert not conn.resumable  # a clean client close ends the session
    conn = connected()
    conn.connection_lost(1006)
    assert conn.resumable


def test_reprs_of_actions_and_payloads_never_show_the_token() -> None:
    secret = "s3cret-token-value"
    conn = GatewayConnection(CFG)
    conn.start(0.0)
    (authenticate,) = conn.receive_data(frame(2, {"token": secret}), 0.1)
    conn = GatewayConnection(CFG)
    conn.start(0.0)
    (lookup,) = conn.receive_data(frame(6, {"token": secret, "session_id": "sid", "seq": 3}), 0.1)
    objects = [
        authenticate,
        lookup,
        IdentifyPayload(token=secret, subscriptions=["a"]),
        ResumePayload(token=secret, session_id="sid", seq=3),
    ]
    for obj in objects:
        assert secret not in repr(obj) and secret not in str(obj) and "<redacted>" in repr(obj)
    assert "sid" in repr(lookup) and "3" in repr(lookup)
    assert lookup.token == secret and authenticate == Authenticate(secret)  # still usable
    assert msgspec.json.decode(msgspec.json.encode(objects[3]), type=ResumePayload).token == secret


def test_dispatch_renders_json_and_msgpack_once_per_encoding() -> None:
    d = Dispatch("T", b'{"x":[1,"\\u00e9"]}', event_id="9", channel="c", nonce="n")
    assert json.loads(d.render("json", 7)) == {
        "op": 0,
        "t": "T",
        "d": {"x": [1, "é"]},
        "id": "9",
        "channel": "c",
        "nonce": "n",
        "s": 7,
    }
    assert msgspec.msgpack.decode(d.render("msgpack", 70000))["s"] == 70000
    assert d.json_prefix() is d.json_prefix()  # cached: built once per delivery
    assert d.msgpack_prefix() is d.msgpack_prefix()


class _NoEncode(str):
    """A text frame that fails the test if it is ever encoded."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        raise AssertionError("an oversized text frame was encoded")


def test_an_oversized_text_frame_is_rejected_by_its_length_before_encoding() -> None:
    with pytest.raises(FrameError, match="exceeds 256"):
        decode_client_frame(_NoEncode('{"op":1,"d":"' + "x" * 300 + '"}'), "json", 256)
    # within the character limit but over it in UTF-8 bytes: still rejected
    with pytest.raises(FrameError, match="bytes exceeds 256"):
        decode_client_frame('{"op":1,"d":"' + "é" * 200 + '"}', "json", 256)
    assert decode_client_frame('{"op":1,"d":"' + "é" * 100 + '"}', "json", 256).d == "é" * 100


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_codec_rejects_garbage_only_with_frame_error(data: bytes | str) -> None:
    for encoding in ("json", "msgpack"):
        try:
            result = decode_client_frame(data, encoding, 256)  # type: ignore[arg-type]
        except FrameError:
            continue
        assert isinstance(result, ClientFrame)


def test_session_record_round_trips_through_msgpack() -> None:
    conn = connected()
    conn.deliver(event(1), 1.0)
    conn.deliver(event(2, ephemeral=True), 1.0)
    conn.deliver(event(3), 1.0)
    assert conn.session is not None
    record = SessionRecord.from_state(conn.session, expires_at=123.0)
    wire = msgspec.msgpack.encode(record)  # what a Redis store would keep
    back = msgspec.msgpack.decode(wire, type=SessionRecord).to_state(5.0)
    assert back.seq == 4 and back.channels == {"room"} and back.positions == {"room": Position("e1", 3)}
    assert [(s, d.render("json", s), p) for s, _, d, p in back.buffer] == [
        (s, d.render("json", s), p) for s, _, d, p in conn.session.buffer
    ]
    # each entry's crash-checkpoint seam survives too: event 3's is event 1's position
    assert [p for _, _, _, p in back.buffer][-1] == Position("e1", 1)


async def test_in_memory_session_store_take_once_and_expiry() -> None:
    now = [100.0]
    store = InMemorySessionStore(max_sessions=2, clock=lambda: now[0])
    conn = connected()
    assert conn.session is not None
    await store.save(SessionRecord.from_state(conn.session, expires_at=110.0))
    assert (await store.take("sid")) is not None
    assert (await store.take("sid")) is None  # resumed at most once
    await store.save(SessionRecord.from_state(conn.session, expires_at=110.0))
    now[0] = 110.0
    assert (await store.take("sid")) is None  # expired


async def test_in_memory_presence_counts_a_principal_once() -> None:
    presence = InMemoryPresence()
    bob = Principal(id="bob")
    assert await presence.join("c", ALICE, "1")
    assert not await presence.join("c", ALICE, "2")
    assert await presence.join("c", bob, "3")
    assert sorted(m["id"] for m in await presence.members("c")) == ["alice", "bob"]
    assert not await presence.leave("c", ALICE, "1")
    assert not await presence.leave("c", ALICE, "1")  # unknown connection: no-op
    assert await presence.leave("c", ALICE, "2")
    assert [m["id"] for m in await presence.members("c")] == ["bob"]


# ---- a random walk through the machine ---------------------------------------------------------

CLIENT_FRAMES = st.one_of(
    st.builds(lambda d: frame(1, d), st.none() | st.integers(0, 50)),
    st.builds(
        lambda t, ch: frame(2, {"token": t, "subscriptions": ch}),
        st.sampled_from(["t", "x"]),
        st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
    ),
    st.builds(lambda seq: frame(6, {"token": "t", "session_id": "sid", "seq": seq}), st.integers(-1, 30)),
    st.builds(lambda ch: frame(12, {"channels": ch}), st.lists(st.sampled_from(["a", "b", "c"]), max_size=3)),
    st.builds(lambda ch: frame(13, {"channels": ch}), st.lists(st.sampled_from(["a", "b", "c"]), max_size=3)),
    st.builds(lambda op: frame(op), st.integers(-5, 20)),
    st.binary(max_size=40),
    st.just(json.dumps({"op": 1, "d": "x" * 300})),
)

DOCUMENTED_CLOSES = {4001, 4002, 4003, 4004, 4005, 4007, 4008, 4009, 4010, 1012}


class GatewayMachine(RuleBasedStateMachine):
    """Random client frames, deliveries, answers, clock advances and resumes of the detached
    session on a new connection (with events while detached, held live events and events rebuilt
    from history). Checks: never raises, every output is a valid frame or a documented close,
    nothing follows a close, the outbox stays within its (admission-raised) bound, and the
    sequence numbers the client sees in each session are 1, 2, 3, ... except exactly at
    ephemeral dispatches (which are never replayed)."""

    @initialize()
    def setup(self) -> None:
        self.config = GatewayConfig(
            heartbeat_interval=5.0,
            identify_timeout=3.0,
            frame_budget=6,
            frame_budget_window=10.0,
            send_queue_frames=6,
            replay_frames=6,  # == send_queue_frames, as Gateway configures it: full replays
            max_frame_bytes=200,
        )
        self.now = 0.0
        self.conn = GatewayConnection(self.config)
        self.offset = 0
        self.sessions: list[Any] = []  # every session in the order the machine made them
        self.ephemeral: dict[Any, set[int]] = {}  # per session: seqs not replayable
        self.observed_seq: dict[Any, int] = {}  # per session: its seq after the last step
        self.client_session = -1  # index into sessions of the one whose READY the client read
        self.last_seen = 0
        self.pending: list[Any] = []
        self.closed = False
        self.resumes = 0
        self._handle(self._tracked(self.conn, lambda: self.conn.start(self.now)))

    def _tracked(self, conn: GatewayConnection, step: Any) -> Any:
        """Run ``step``; record the seqs it assigned that did not go into the replay buffer."""
        result = step()
        after = conn.session
        if after is not None:
            if after not in self.ephemeral:
                self.sessions.append(after)
                self.ephemeral[after] = set()
            before = self.observed_seq.get(after, 0)  # every assignment happens in a tracked step
            self.observed_seq[after] = after.seq
            buffered = {s for s, _, _, _ in after.buffer}
            for seq in range(before + 1, after.seq + 1):
                if seq not in buffered:
                    assert seq > after.buffer_floor  # fresh entries are never evicted in one step
                    self.ephemeral[after].add(seq)
        return result

    def _handle(self, actions: list[Any]) -> None:
        for action in actions:
            assert isinstance(
                action,
                Close
                | Authenticate
                | AuthorizeChannels
                | Subscribe
                | Unsubscribe
                | ResumeLookup
                | Checkpoint,
            )
            if isinstance(action, Close):
                assert action.code in DOCUMENTED_CLOSES
            elif not isinstance(action, Checkpoint):  # needs no answer
                self.pending.append(action)

    @precondition(lambda self: self.conn.state is ConnectionState.AWAITING_IDENTIFY)
    @rule(channels=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3))
    def identify_and_authorize(self, channels: list[str]) -> None:
        """The common path, so that random walks reach the connected state often."""
        data = frame(2, {"token": "t", "subscriptions": channels})
        self._handle(self._tracked(self.conn, lambda: self.conn.receive_data(data, self.now)))
        while self.pending and self.conn.state is not ConnectionState.CLOSED:
            self.answer(True)

    @rule(data=CLIENT_FRAMES)
    def client_sends(self, data: str | bytes) -> None:
        self._handle(self._tracked(self.conn, lambda: self.conn.receive_data(data, self.now)))

    @precondition(lambda self: bool(self.pending))
    @rule(ok=st.booleans())
    def answer(self, ok: bool) -> None:
        action = self.pending.pop(0)
        conn = self.conn
        if isinstance(action, Authenticate):
            self._handle(self._tracked(conn, lambda: conn.identified(ALICE if ok else None, "sid", self.now)))
        elif isinstance(action, AuthorizeChannels):
            chans = list(action.channels)
            granted, denied = (chans, []) if ok else ([], chans)
            self._handle(self._tracked(conn, lambda: conn.authorized(granted, denied, self.now)))
        elif isinstance(action, ResumeLookup):
            self._handle(self._tracked(conn, lambda: conn.resume_rejected(ok, self.now)))

    def _event(self, channel: str, ephemeral: bool = False) -> Dispatch:
        self.offset += 1
        return event(self.offset, channel, ephemeral=ephemeral)

    @rule(channel=st.sampled_from(["a", "b", "c"]), ephemeral=st.booleans())
    def bus_delivers(self, channel: str, ephemeral: bool) -> None:
        dispatch = self._event(channel, ephemeral)
        self._handle(self._tracked(self.conn, lambda: self.conn.deliver(dispatch, self.now)))

    @precondition(
        lambda self: (
            self.conn.session is not None
            and self.client_session >= 0
            and self.sessions[self.client_session] is self.conn.session
        )
    )
    @rule(
        detached=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.booleans()), max_size=10),
        held=st.integers(0, 8),
        missed=st.integers(0, 3),
        duplicate=st.booleans(),
    )
    def resume_on_a_new_connection(
        self, detached: list[tuple[str, bool]], held: int, missed: int, duplicate: bool
    ) -> None:
        """The socket drops; the session keeps collecting; the client RESUMEs from the last seq
        it read on a new connection (the real resume_begin / resume_complete path)."""
        old = self.conn
        old.connection_lost(1006)
        session = old.session
        if not old.resumable or session is None:
            return
        for channel, ephemeral in detached:
            dispatch = self._event(channel, ephemeral)
            self._handle(self._tracked(old, lambda d=dispatch: old.deliver(d, self.now)))  # type: ignore[misc]
        self.conn = new = GatewayConnection(self.config)
        self.closed = False
        self.pending = []
        self._handle(new.start(self.now))
        resume = frame(6, {"token": "t", "session_id": "sid", "seq": self.last_seen})
        assert new.receive_data(resume, self.now) == [ResumeLookup("t", "sid", self.last_seen)]
        old.session = None  # the gateway swaps hosts
        self._handle(self._tracked(new, lambda: new.resume_begin(session, self.now)))
        if new.state is not ConnectionState.RESUMING:
            return  # INVALID_SESSION (seq below the buffer floor): the client identifies anew
        self.resumes += 1
        channels = sorted(session.channels)
        for n in range(held if channels else 0):
            dispatch = self._event(channels[n % len(channels)])
            self._handle(self._tracked(new, lambda d=dispatch: new.deliver(d, self.now)))  # type: ignore[misc]
        if held > self.config.send_queue_frames and channels:
            # too many live events during the catch-up: 4010, resumable (the session is given up
            # untouched, for the I/O layer to put back)
            assert new.state is ConnectionState.CLOSED and new.close_code == 4010 and new.resumable
            assert new.session is None
            return
        rebuilt = [self._event(channels[n % len(channels)]) for n in range(missed if channels else 0)]
        if duplicate and channels and session.positions.get(channels[0]) is not None:
            rebuilt.append(event(0, channels[0], offset=session.positions[channels[0]].offset))
        self._handle(self._tracked(new, lambda: new.resume_complete(rebuilt, self.now)))
        assert new.state is ConnectionState.CONNECTED  # a full replay never overflows

    @rule(dt=st.floats(0.0, 4.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self._handle(self._tracked(self.conn, lambda: self.conn.tick(self.now)))

    @rule(n=st.integers(0, 8))
    def writer_sends(self, n: int) -> None:
        for _ in range(n):
            item = self.conn.next_outgoing()
            if item is None:
                return
            self._check(item)

    def _check(self, item: Any) -> None:
        assert not self.closed, "nothing is sent after the close"
        if isinstance(item, Close):
            assert item.code in DOCUMENTED_CLOSES
            self.closed = True
            return
        assert isinstance(item, str)
        f = json.loads(item)
        assert set(f) >= {"op", "d", "s", "t"}
        if f["op"] == 0:
            if f["t"] == "READY":  # a new session: its numbering starts again
                self.client_session += 1
                self.last_seen = 0
            s = f["s"]
            # no repeat, no skip except over ephemeral dispatches that were not sent
            skipped = set(range(self.last_seen + 1, s))
            ephemeral = self.ephemeral[self.sessions[self.client_session]]
            assert s > self.last_seen and skipped <= ephemeral, (self.last_seen, s)
            self.last_seen = s
        else:
            assert f["op"] in (7, 9, 10, 11) and f["s"] is None

    @invariant()
    def bounded(self) -> None:
        conn = self.conn
        assert conn.outbox_limit_frames <= self.config.send_queue_frames + 2 * self.config.replay_frames + 20
        assert conn.outbox_frames <= conn.outbox_limit_frames + 1  # + the final Close
        if conn.session is not None:
            assert len(conn.session.buffer) <= self.config.replay_frames
            assert conn.session.channels <= {"a", "b", "c"}


GatewayMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_gateway_state_machine = GatewayMachine.TestCase
