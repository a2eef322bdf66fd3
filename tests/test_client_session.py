"""Unit tests of the pure client pieces: backoff, frame codec and the session state machine."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from splitchat.client import (
    AuthenticationFailed,
    ClientSession,
    Dispatch,
    Frame,
    FrameCodec,
    FrameDecodeError,
    FullJitterBackoff,
    Opcode,
    Ready,
    Resumed,
    Resync,
)
from splitchat.client._session import CloseSocket, Deliver, Phase, ReconnectPlan, SendFrame

HELLO = Frame(
    op=10,
    d={
        "heartbeat_interval": 1000,
        "max_frame_bytes": 4096,
        "frame_budget": 120,
        "frame_budget_window": 60000,
        "resume_window": 120000,
    },
)


def ready(s: int = 1, session_id: str = "sess-1", subs: list[str] | None = None) -> Frame:
    return Frame(
        op=0,
        s=s,
        t="READY",
        d={
            "session_id": session_id,
            "resume_gateway_url": "ws://127.0.0.1:1/gw",
            "user": {"id": "u1"},
            "subscriptions": subs or ["room:1"],
            "denied": [],
        },
    )


def event(s: int, event_id: str, channel: str = "room:1") -> Frame:
    return Frame(op=0, s=s, t="MESSAGE_CREATE", d={"n": s}, id=event_id, channel=channel)


def items(actions: list[Any]) -> list[Any]:
    return [a.item for a in actions if isinstance(a, Deliver)]


def sends(actions: list[Any]) -> list[SendFrame]:
    return [a for a in actions if isinstance(a, SendFrame)]


def connected_session(**kwargs: Any) -> ClientSession:
    session = ClientSession(token="tok", subscriptions=["room:1"], rng=random.Random(7), **kwargs)
    session.connection_opened()
    session.receive(HELLO, 0.0)
    session.receive(ready(), 0.0)
    return session


# -- backoff ---------------------------------------------------------------------------------


@given(st.floats(0.01, 5), st.floats(1, 100), st.integers(0, 2**32), st.integers(1, 80))
def test_backoff_delays_stay_within_growing_capped_ceiling(lo: float, hi: float, seed: int, n: int) -> None:
    hi = max(lo, hi)
    backoff = FullJitterBackoff(lo, hi, rng=random.Random(seed))
    ceilings = []
    for attempt in range(n):
        ceiling = backoff.ceiling()
        assert ceiling == min(hi, lo * 2**attempt)
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings == sorted(ceilings)
    backoff.reset()
    assert backoff.ceiling() == lo


class _FixedRng(random.Random):
    """``uniform(a, b)`` returns the next given fraction of the window: hand-checkable delays."""

    def __init__(self, fractions: list[float]) -> None:
        super().__init__(0)
        self.fractions = list(fractions)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fractions.pop(0)


def test_backoff_schedule_matches_hand_computed_delays() -> None:
    # min 0.1, max 1.0: windows 0.1, 0.2, 0.4, 0.8, then capped at 1.0.
    backoff = FullJitterBackoff(0.1, 1.0, rng=_FixedRng([0.5, 0.25, 1.0, 0.5, 0.5, 1.0, 0.0, 0.5]))
    delays = [backoff.next_delay() for _ in range(6)]
    assert delays == pytest.approx([0.05, 0.05, 0.4, 0.4, 0.5, 1.0])
    backoff.reset()  # after a stable connection: back to the first window
    assert [backoff.next_delay() for _ in range(2)] == pytest.approx([0.0, 0.1])


def test_backoff_with_a_seeded_rng_gives_the_documented_sequence() -> None:
    # random.Random(7).random() starts 0.32383, 0.15085, 0.65093, 0.07244, 0.53588 (CPython's
    # Mersenne Twister); uniform(0, c) = c * random(). Windows for min 0.5, max 4: 0.5, 1, 2, 4, 4.
    backoff = FullJitterBackoff(0.5, 4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(5)]
    assert delays == pytest.approx([0.161916, 0.150849, 1.301869, 0.289745, 2.143528], abs=1e-6)


def test_backoff_is_jittered_and_reproducible() -> None:
    a = [FullJitterBackoff(1, 1, rng=random.Random(3)).next_delay() for _ in range(1)]
    seq1 = FullJitterBackoff(1, 64, rng=random.Random(3))
    seq2 = FullJitterBackoff(1, 64, rng=random.Random(3))
    d1 = [seq1.next_delay() for _ in range(20)]
    d2 = [seq2.next_delay() for _ in range(20)]
    assert d1 == d2
    assert len(set(d1)) == 20  # full jitter: no two equal delays
    assert a[0] <= 1
    with pytest.raises(ValueError):
        FullJitterBackoff(0, 1)


# -- codec -------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_codec_encodes_client_frames_and_decodes_dispatches(encoding: Any) -> None:
    codec = FrameCodec(encoding)
    wire = codec.encode(Opcode.HEARTBEAT, 41)
    assert isinstance(wire, str if encoding == "json" else bytes)
    server = {"op": 0, "s": 5, "t": "X", "d": {"a": [1]}, "id": "9", "channel": "c", "nonce": "n"}
    raw = msgspec.json.encode(server).decode() if encoding == "json" else msgspec.msgpack.encode(server)
    assert codec.decode(raw) == Frame(op=0, s=5, t="X", d={"a": [1]}, id="9", channel="c", nonce="n")
    assert (
        msgspec.json.decode(wire)
        if encoding == "json"
        else msgspec.msgpack.decode(wire) == {"op": 1, "d": 41}
    )


@given(st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_codec_rejects_garbage_with_one_error_type(raw: str | bytes) -> None:
    codec = FrameCodec("json")
    try:
        frame = codec.decode(raw)
    except FrameDecodeError:
        return
    assert isinstance(frame.op, int)


# -- session machine ---------------------------------------------------------------------------


def test_hello_leads_to_identify_with_subscriptions_then_ready() -> None:
    session = ClientSession(token="tok", subscriptions=["room:1", "room:2"], properties={"os": "x"})
    session.connection_opened()
    assert session.receive(Frame(op=0, s=1, t="READY", d={}), 0.0) == []  # nothing before HELLO
    actions = session.receive(HELLO, 0.0)
    assert actions == [
        SendFrame(
            Opcode.IDENTIFY,
            {"token": "tok", "subscriptions": ["room:1", "room:2"], "properties": {"os": "x"}},
        )
    ]
    out = items(session.receive(ready(subs=["room:1"]), 0.0))
    assert out == [Ready(session_id="sess-1", user={"id": "u1"}, subscriptions=("room:1",), denied=())]
    assert session.phase == Phase.CONNECTED and session.seq == 1


def test_first_heartbeat_is_jittered_then_regular_and_carries_last_seq() -> None:
    session = connected_session()
    first = session.next_deadline()
    assert first is not None and 0.0 <= first <= 1.0
    session.receive(event(2, "e2"), 0.0)
    assert sends(session.tick(first)) == [SendFrame(Opcode.HEARTBEAT, 2)]
    session.receive(Frame(op=11), first + 0.01)
    assert session.next_deadline() == pytest.approx(first + 1.0)


def test_missing_ack_is_a_zombie_unless_the_reader_is_blocked_by_the_app() -> None:
    session = connected_session()
    beat_at = session.next_deadline()
    assert beat_at is not None
    session.tick(beat_at)
    ack_deadline = beat_at + 0.5  # half the interval
    assert session.tick(ack_deadline - 0.01) == []
    # The app is slow and the reader stopped reading: the ACK may be unread, so no verdict.
    assert session.tick(ack_deadline, reader_blocked=True) == []
    session.tick(beat_at + 1.0)  # next beat re-arms the ACK timer
    actions = session.tick(beat_at + 1.5)
    assert actions == [CloseSocket(4000, "no HEARTBEAT_ACK: zombie connection")]
    assert session.connection_lost(4000).resume is True


def test_server_heartbeat_request_is_answered_at_once() -> None:
    session = connected_session()
    assert sends(session.receive(Frame(op=1), 0.2)) == [SendFrame(Opcode.HEARTBEAT, 1)]


def test_resume_after_disconnect_replays_without_duplicates() -> None:
    session = connected_session()
    delivered = [items(session.receive(event(s, f"e{s}"), 0.0)) for s in range(2, 6)]
    assert [d[0].s for d in delivered] == [2, 3, 4, 5]
    assert session.connection_lost(1006).resume
    session.connection_opened()
    assert sends(session.receive(HELLO, 1.0)) == [
        SendFrame(Opcode.RESUME, {"token": "tok", "session_id": "sess-1", "seq": 5})
    ]
    # The server replays from our seq; overlap (4, 5) is dropped, a skipped ephemeral jumps s.
    out: list[Any] = []
    for frame in [
        event(4, "e4"),
        event(5, "e5"),
        event(7, "e7"),
        Frame(op=0, s=8, t="RESUMED", d={"replayed": 1, "skipped_ephemeral": 1}),
    ]:
        out += items(session.receive(frame, 1.0))
    assert out == [
        Dispatch(t="MESSAGE_CREATE", d={"n": 7}, s=7, id="e7", channel="room:1"),
        Resumed(replayed=1, skipped_ephemeral=1),
    ]


@pytest.mark.parametrize(("trigger", "reason"), [("op9", "invalid_session"), ("4007", "invalid_seq")])
def test_lost_session_reidentifies_and_signals_resync(trigger: str, reason: str) -> None:
    session = connected_session()
    session.receive(event(2, "e2"), 0.0)
    if trigger == "op9":
        assert session.receive(Frame(op=9, d=False), 0.0) == [CloseSocket(1000, "invalid session")]
        plan = session.connection_lost(1000)
    else:
        plan = session.connection_lost(4007)
    assert plan.resume is False and session.session_id is None
    session.connection_opened()
    assert sends(session.receive(HELLO, 0.0))[0].op == Opcode.IDENTIFY
    out = items(session.receive(ready(session_id="sess-2"), 0.0))
    assert out == [
        Resync(reason=reason, session_id="sess-2", user={"id": "u1"}, subscriptions=("room:1",), denied=())
    ]
    # The same event re-sent on the fresh session (new seq) still reaches the app only once.
    assert items(session.receive(event(2, "e2"), 0.0)) == []
    assert items(session.receive(event(3, "e3"), 0.0))[0].id == "e3"


def test_invalid_session_resumable_and_reconnect_keep_the_session() -> None:
    session = connected_session()
    assert session.receive(Frame(op=7), 0.0) == [CloseSocket(4000, "server asked to reconnect")]
    assert session.connection_lost(4000).resume
    session.connection_opened()
    session.receive(HELLO, 0.0)
    session.receive(Frame(op=0, s=2, t="RESUMED", d={"replayed": 0}), 0.0)
    assert session.receive(Frame(op=9, d=True), 0.0) == [CloseSocket(4000, "invalid session (resumable)")]
    assert session.connection_lost(4000).resume


def test_4004_is_fatal() -> None:
    session = connected_session()
    with pytest.raises(AuthenticationFailed):
        session.connection_lost(4004)


def test_subscriptions_made_offline_are_sent_after_resume() -> None:
    session = connected_session()
    session.connection_lost(1006)
    assert session.subscribe(["room:2"]) == []  # not connected: remembered
    assert session.unsubscribe(["room:1"]) == []
    session.connection_opened()
    session.receive(HELLO, 0.0)
    actions = session.receive(Frame(op=0, s=2, t="RESUMED", d={"replayed": 0}), 0.0)
    assert sends(actions) == [  # UNSUBSCRIBE first: the room it frees counts for max_channels
        SendFrame(Opcode.UNSUBSCRIBE, {"channels": ["room:1"]}),
        SendFrame(Opcode.SUBSCRIBE, {"channels": ["room:2"]}),
    ]


def test_subscriptions_respect_the_channel_limits_advertised_in_hello() -> None:
    session = ClientSession(token="t", subscriptions=["a", "b", "x" * 11, "c"])
    session.connection_opened()
    hello = Frame(op=10, d={**HELLO.d, "max_channels": 2, "max_channel_length": 10})
    (identify,) = sends(session.receive(hello, 0.0))
    assert identify == SendFrame(Opcode.IDENTIFY, {"token": "t", "subscriptions": ["a", "b"]})
    assert session.limits.max_channels == 2 and session.limits.max_channel_length == 10
    ready = {"session_id": "s", "subscriptions": ["a", "b"], "denied": []}
    actions = session.receive(Frame(op=0, s=1, t="READY", d=ready), 0.0)
    assert sends(actions) == []  # full: nothing more to ask for
    assert session.subscribe(["d"]) == []  # remembered, not sent: it cannot be granted
    assert sends(session.unsubscribe(["a"])) == [SendFrame(Opcode.UNSUBSCRIBE, {"channels": ["a"]})]
    session.receive(Frame(op=0, s=2, t="UNSUBSCRIBED", d={"channels": ["a"]}), 0.0)
    assert sends(session.subscribe(["e"])) == [SendFrame(Opcode.SUBSCRIBE, {"channels": ["e"]})]


stream_ops = st.lists(
    st.one_of(
        st.tuples(st.just("event"), st.integers(0, 40), st.integers(0, 30)),
        st.tuples(st.just("drop"), st.just(0), st.just(0)),
        st.tuples(st.just("invalid"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(stream_ops)
def test_app_never_sees_a_seq_twice_or_out_of_order_nor_an_event_id_twice(
    ops: list[tuple[str, int, int]],
) -> None:
    session = connected_session()
    seen_ids: set[str] = set()
    last_s = 1
    for kind, s, ident in ops:
        if kind == "event":
            for item in items(session.receive(event(s, f"e{ident}"), 0.0)):
                assert isinstance(item, Dispatch) and item.id is not None
                assert item.s > last_s
                assert item.id not in seen_ids
                seen_ids.add(item.id)
                last_s = item.s
        else:
            if kind == "invalid":
                session.receive(Frame(op=9, d=False), 0.0)
            resume = session.connection_lost(1006 if kind == "drop" else 1000).resume
            session.connection_opened()
            session.receive(HELLO, 0.0)
            if resume:
                out = items(session.receive(Frame(op=0, s=session.seq + 1, t="RESUMED", d={}), 0.0))
                last_s = session.seq
            else:
                out = items(session.receive(ready(session_id="new"), 0.0))
                last_s = 1
            assert len(out) == 1


def test_refused_resume_reidentifies_on_the_same_connection() -> None:
    session = connected_session()
    session.connection_lost(1006)
    session.connection_opened()
    assert sends(session.receive(HELLO, 0.0))[0].op == Opcode.RESUME
    actions = session.receive(Frame(op=9, d=False), 0.0)
    assert actions == [SendFrame(Opcode.IDENTIFY, {"token": "tok", "subscriptions": ["room:1"]})]
    out = items(session.receive(ready(session_id="sess-2"), 0.0))
    assert isinstance(out[0], Resync) and out[0].reason == "invalid_session"


def test_client_frame_budget_keeps_a_margin_and_slides() -> None:
    from splitchat.client._client import _FrameBudget

    budget = _FrameBudget(budget=3, window=10.0)
    for t in (0.0, 1.0):
        assert budget.wait_time(t) == 0.0
        budget.record(t)
    # Two sent, one frame of margin kept: the third waits until the first leaves the window.
    assert budget.wait_time(2.0) == pytest.approx(8.0)
    assert budget.wait_time(10.0) == 0.0


def test_identify_and_resume_actions_never_show_the_token_in_reprs() -> None:
    secret = "s3cret-token-value"
    session = ClientSession(token=secret, subscriptions=["room:1"], rng=random.Random(7))
    session.connection_opened()
    identify = sends(session.receive(HELLO, 0.0))
    session.receive(ready(), 0.0)
    session.connection_lost(1006)
    session.connection_opened()
    resume = sends(session.receive(HELLO, 1.0))
    assert [f.op for f in identify + resume] == [Opcode.IDENTIFY, Opcode.RESUME]
    for frame in identify + resume:
        assert secret not in repr(frame) and secret not in str([frame]) and "<redacted>" in repr(frame)
        assert secret not in repr(frame.__rich_repr__())
        # ...while what goes on the wire still authenticates.
        assert frame.d["token"] == secret
        assert secret in str(FrameCodec("json").encode(frame.op, frame.d))


# -- resume URL fallback ---------------------------------------------------------------------

RESUME_URL = "ws://127.0.0.1:1/gw"  # what ready() advertises


def test_resume_url_is_given_up_after_two_failed_attempts_and_the_session_still_resumes() -> None:
    session = connected_session()
    session.connection_lost(1006)
    # Attempt 1: the connection itself fails (refused, timeout): no socket at all.
    assert session.next_resume_url() == RESUME_URL
    assert session.connection_lost(None) == ReconnectPlan(resume=True, resume_url_given_up=False)
    # Attempt 2: a socket opens but closes before HELLO (a proxy in front of a dead node).
    assert session.next_resume_url() == RESUME_URL
    session.connection_opened()
    assert session.connection_lost(1006) == ReconnectPlan(resume=True, resume_url_given_up=True)
    # Attempt 3 goes to the configured URL, and it RESUMEs the same session there.
    assert session.next_resume_url() is None
    session.connection_opened()
    (resume,) = sends(session.receive(HELLO, 0.0))
    assert resume == SendFrame(Opcode.RESUME, {"token": "tok", "session_id": "sess-1", "seq": 1})
    # Failures on the configured URL do not count against (or re-enable) the resume URL.
    assert session.connection_lost(1006) == ReconnectPlan(resume=True, resume_url_given_up=False)
    assert session.next_resume_url() is None
    assert session.connection_lost(None).resume_url_given_up is False


def test_a_resume_url_that_says_hello_keeps_its_two_chances() -> None:
    session = connected_session()
    session.connection_lost(1006)
    assert session.next_resume_url() == RESUME_URL
    session.connection_lost(None)  # one failure
    assert session.next_resume_url() == RESUME_URL
    session.connection_opened()
    session.receive(HELLO, 0.0)  # it answered: the count starts over
    session.receive(Frame(op=0, s=2, t="RESUMED", d={"replayed": 0}), 0.0)
    assert session.connection_lost(1006).resume_url_given_up is False  # lost after HELLO: not a failure
    assert session.next_resume_url() == RESUME_URL
    session.connection_lost(None)
    assert session.next_resume_url() == RESUME_URL  # consecutive failures only
    assert session.connection_lost(None).resume_url_given_up is True
    assert session.next_resume_url() is None


def test_a_new_session_gets_a_fresh_resume_url_and_no_session_means_no_resume_url() -> None:
    session = connected_session()
    session.connection_lost(1006)
    for _ in range(2):
        assert session.next_resume_url() == RESUME_URL
        session.connection_lost(None)
    assert session.next_resume_url() is None
    # The configured URL refuses the RESUME: IDENTIFY there, new READY with its resume URL.
    session.connection_opened()
    session.receive(HELLO, 0.0)
    session.receive(Frame(op=9, d=False), 0.0)
    assert session.session_id is None and session.next_resume_url() is None  # nothing to resume
    session.receive(ready(session_id="sess-2"), 0.0)
    session.connection_lost(1006)
    assert session.next_resume_url() == RESUME_URL
    # Before any READY there is neither a session nor a resume URL: always the configured URL.
    fresh = ClientSession(token="tok")
    assert fresh.next_resume_url() is None
    assert fresh.connection_lost(None) == ReconnectPlan(resume=False, resume_url_given_up=False)
