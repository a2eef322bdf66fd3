"""The browser client (splitchat.js) in real Chromium against a scripted gateway.

The gateway here is a small hand-written WebSocket endpoint that follows a per-test script, so
each reconnect rule of the client (zombie detection, RESUME, re-IDENTIFY + resync, no reconnect
after 4004, retry with one nonce, 429 handling) is provoked on purpose and observed from the
server side (frames and close codes received) and from the page (state changes, events).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from splitchat import browser_client_mount

from .browser_support import browser_skip_reason, chromium, serve_in_thread, wait_until

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason())),
]

PAGE = """<!doctype html><html><body><script type="module">
import * as splitchat from "/splitchat/splitchat.js";
window.splitchat = splitchat;
window.states = []; window.events = []; window.resyncs = 0; window.rateLimits = [];
window.makeClient = (options) => {
  const client = new splitchat.SplitchatClient({
    ...options, backoff: { base: 50, cap: 200 },
    onResync: () => { window.resyncs += 1; },
  });
  client.onState((state, info) => window.states.push([state, info.code ?? null]));
  client.on("*", (d, frame) => window.events.push([frame.t, frame.s, d]));
  client.onRateLimited((info) => window.rateLimits.push(info));
  window.client = client;
  return client;
};
window.loaded = true;
</script></body></html>"""


@dataclass
class Connection:
    """What the scripted gateway saw on one WebSocket connection."""

    received: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None


@dataclass
class Script:
    """How the scripted gateway behaves; one per test."""

    heartbeat_interval: int = 60_000
    hello_extra: dict[str, Any] = field(default_factory=dict)  # more HELLO limits
    ack_heartbeats: list[bool] = field(default_factory=list)  # per connection index; default True
    on_identify: list[str] = field(default_factory=list)  # per connection: "ready" | "4004"
    on_resume: list[str] = field(default_factory=list)  # per connection: "resumed" | "invalid"
    dispatch_after_ready: int = 0
    resend_on_resume: bool = False  # resume like a node rebuilding a crash checkpoint
    resume_gateway_url: str | None = None  # what READY advertises
    connections: list[Connection] = field(default_factory=list)
    http_attempts: list[dict[str, Any]] = field(default_factory=list)
    http_plan: list[int] = field(default_factory=list)  # statuses to answer before 200
    lock: threading.Lock = field(default_factory=threading.Lock)


def build_app(script: Script) -> Starlette:
    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def command(request: Request) -> Response:
        body = await request.json()
        with script.lock:
            attempt = len(script.http_attempts)
            script.http_attempts.append(
                {
                    "key": request.headers.get("idempotency-key"),
                    "auth": request.headers.get("authorization"),
                    "at": time.monotonic(),
                }
            )
        if attempt < len(script.http_plan):
            status = script.http_plan[attempt]
            if status == 429:
                return JSONResponse(
                    {"message": "slow down", "retry_after": 0.3, "global": False},
                    status_code=429,
                    headers={"Retry-After": "1", "X-RateLimit-Scope": "user"},
                )
            return JSONResponse({"code": "unavailable", "message": "try again", "errors": {}}, status)
        return JSONResponse({"echo": body, "attempts": attempt + 1})

    async def gateway(ws: WebSocket) -> None:
        await ws.accept()
        conn = Connection()
        with script.lock:
            index = len(script.connections)
            script.connections.append(conn)
        ack = script.ack_heartbeats[index] if index < len(script.ack_heartbeats) else True
        seq = 0

        async def dispatch(t: str, d: Any, event_id: str | None = None) -> None:
            nonlocal seq
            seq += 1
            frame = {"op": 0, "s": seq, "t": t, "d": d}
            if event_id is not None:
                frame["id"], frame["channel"] = event_id, "x"
            await ws.send_text(json.dumps(frame))

        hello = {"heartbeat_interval": script.heartbeat_interval, **script.hello_extra}
        await ws.send_text(json.dumps({"op": 10, "d": hello}))
        try:
            while True:
                frame = json.loads(await ws.receive_text())
                conn.received.append(frame)
                if frame["op"] == 1 and ack:
                    await ws.send_text(json.dumps({"op": 11, "d": None}))
                elif frame["op"] == 2:
                    plan = script.on_identify[index] if index < len(script.on_identify) else "ready"
                    if plan == "4004":
                        await ws.close(4004, "authentication failed")
                        conn.close_code = 4004
                        return
                    await dispatch(
                        "READY",
                        {"session_id": "sess-1", "resume_gateway_url": script.resume_gateway_url, "user": {}},
                    )
                    for n in range(script.dispatch_after_ready):
                        await dispatch("MESSAGE_CREATE", {"n": n}, f"e{n}")
                elif frame["op"] == 6:
                    plan = script.on_resume[index] if index < len(script.on_resume) else "resumed"
                    if plan == "invalid":
                        await ws.send_text(json.dumps({"op": 9, "d": False}))
                        continue
                    seq = frame["d"]["seq"]
                    resumed: dict[str, Any] = {"replayed": 1}
                    if script.resend_on_resume:  # the events after the checkpoint, with new seqs
                        for n in range(script.dispatch_after_ready):
                            await dispatch("MESSAGE_CREATE", {"n": n}, f"e{n}")
                        resumed = {"replayed": 1 + script.dispatch_after_ready, "duplicates_possible": True}
                    await dispatch("MESSAGE_CREATE", {"n": "after-resume"}, "e-after")
                    await ws.send_text(json.dumps({"op": 0, "s": None, "t": "RESUMED", "d": resumed}))
        except WebSocketDisconnect as exc:
            conn.close_code = exc.code

    return Starlette(
        routes=[
            Route("/", page),
            Route("/command", command, methods=["POST"]),
            WebSocketRoute("/gateway", gateway),
            browser_client_mount("/splitchat"),
        ]
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


@pytest.fixture
def harness(browser: Any) -> Iterator[tuple[Script, Any]]:
    script = Script()
    with serve_in_thread(build_app(script)) as base_url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(base_url + "/")
        page.wait_for_function("window.loaded === true")
        try:
            yield script, page
        finally:
            page.evaluate("window.client && window.client.close()")
            context.close()


def states(page: Any) -> list[str]:
    return [state for state, _code in page.evaluate("window.states")]


def test_identify_ready_and_events_by_type(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.dispatch_after_ready = 3
    page.evaluate(
        """() => { window.created = [];
        const c = window.makeClient({ token: "tok", subscriptions: ["a", "b"] });
        c.on("MESSAGE_CREATE", (d) => window.created.push(d.n)); c.connect(); }"""
    )
    page.wait_for_function("window.created.length === 3")
    assert page.evaluate("window.created") == [0, 1, 2]
    identify = script.connections[0].received[0]
    assert identify["op"] == 2
    assert identify["d"]["token"] == "tok"
    assert identify["d"]["subscriptions"] == ["a", "b"]
    assert states(page) == ["connecting", "ready"]
    assert page.evaluate("window.client.seq") == 4


def test_subscriptions_respect_the_channel_limits_in_hello(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.hello_extra = {"max_channels": 2, "max_channel_length": 5}
    page.evaluate(
        """() => { const c = window.makeClient({ token: "tok", subscriptions: ["a", "toolong", "b", "c"] });
        c.connect(); }"""
    )
    page.wait_for_function("window.client.state === 'ready'")
    identify = script.connections[0].received[0]
    assert identify["d"]["subscriptions"] == ["a", "b"]  # within max_channels and max_channel_length
    page.evaluate("window.client.granted = new Set(['a', 'b']); window.client.subscribe(['d'])")
    page.evaluate("window.client.granted = new Set(['a']); window.client.subscribe(['e', 'f'])")
    wait_until(lambda: len(script.connections[0].received) >= 2)
    subscribes = [f for f in script.connections[0].received if f["op"] == 12]
    assert subscribes == [{"op": 12, "d": {"channels": ["e"]}}]  # nothing while full, then one


def test_missing_ack_is_a_zombie_closed_with_4000_then_resumed(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.heartbeat_interval = 300
    script.ack_heartbeats = [False, True]
    script.dispatch_after_ready = 2
    page.evaluate("() => window.makeClient({ token: 'tok' }).connect()")
    page.wait_for_function("window.states.some(([s]) => s === 'resumed')", timeout=10_000)
    first, second = script.connections[0], script.connections[1]
    wait_until(lambda: first.close_code is not None)
    assert first.close_code == 4000  # resumable close, never 1000 (which would end the session)
    heartbeats = [f for f in first.received if f["op"] == 1]
    assert heartbeats, "the client never sent a heartbeat"
    assert heartbeats[0]["d"] == 3  # last seq seen: READY + 2 dispatches
    resume = second.received[0]
    assert resume == {"op": 6, "d": {"token": "tok", "session_id": "sess-1", "seq": 3}}
    assert states(page) == ["connecting", "ready", "reconnecting", "resumed"]
    # The dispatch replayed on resume continues the sequence and reaches listeners once.
    after = [e for e in page.evaluate("window.events") if e[2] == {"n": "after-resume"}]
    assert [e[1] for e in after] == [4]


def test_events_resent_after_a_crash_resume_reach_the_app_once(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.heartbeat_interval = 300
    script.ack_heartbeats = [False, True]  # a zombie: the client resumes on a "new node"
    script.dispatch_after_ready = 3
    script.resend_on_resume = True
    page.evaluate(
        """() => { window.created = [];
        const c = window.makeClient({ token: "tok" });
        c.on("MESSAGE_CREATE", (d) => window.created.push(d.n)); c.connect(); }"""
    )
    page.wait_for_function("window.states.some(([s]) => s === 'resumed')", timeout=10_000)
    page.wait_for_function("window.created.length >= 4")
    assert page.evaluate("window.created") == [0, 1, 2, "after-resume"]  # e0..e2 re-sent, deduped
    assert page.evaluate("window.client.seq") == 8  # sequence numbers still advanced past them


def test_invalid_session_false_reidentifies_and_asks_the_app_to_resync(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.heartbeat_interval = 300
    script.ack_heartbeats = [False, True, True]
    script.on_resume = ["resumed", "invalid"]
    page.evaluate("() => window.makeClient({ token: 'tok', subscriptions: ['x'] }).connect()")
    page.wait_for_function("window.resyncs === 1", timeout=10_000)
    assert [c.received[0]["op"] for c in script.connections] == [2, 6, 2]
    assert script.connections[2].received[0]["d"]["subscriptions"] == ["x"]
    assert states(page)[-1] == "ready"


def test_no_reconnect_after_authentication_failed(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.on_identify = ["4004"]
    page.evaluate("() => window.makeClient({ token: 'bad' }).connect()")
    page.wait_for_function("window.states.some(([s]) => s === 'closed')")
    # No reconnect is pending (none scheduled, client stopped), so none can ever happen: checked
    # on the client's state instead of sleeping past the backoff and hoping.
    assert page.evaluate("[window.client._stopped, window.client._reconnectTimer]") == [True, None]
    assert len(script.connections) == 1
    assert page.evaluate("window.states") == [["connecting", None], ["closed", 4004]]


def test_send_retries_with_one_nonce_and_honours_429(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.http_plan = [503, 429]
    page.evaluate("() => window.makeClient({ token: 'tok' })")
    result = page.evaluate("() => window.client.send('/command', { content: 'hi' })")
    assert result == {"echo": {"content": "hi"}, "attempts": 3}
    keys = [a["key"] for a in script.http_attempts]
    assert len(keys) == 3 and keys[0] and len(set(keys)) == 1
    assert {a["auth"] for a in script.http_attempts} == {"Bearer tok"}
    limits = page.evaluate("window.rateLimits")
    assert limits == [{"retryAfter": 0.3, "scope": "user", "global": False, "source": "http"}]
    # The hint chosen is the body's 0.3 s over the 1 s Retry-After header (retryAfter above is
    # the value the client waits), and the client did wait it before the next attempt.
    assert script.http_attempts[2]["at"] - script.http_attempts[1]["at"] >= 0.3 - 0.01


def test_retry_hint_rule_prefers_the_body_then_reset_after_then_retry_after(
    harness: tuple[Script, Any],
) -> None:
    _script, page = harness
    hints = page.evaluate(
        """() => {
        const hint = (body, headers, max) =>
          window.splitchat.retryAfterSeconds(new Response(null, { headers }), body, max);
        return [
          hint({ retry_after: 0.3 }, { "Retry-After": "1", "X-RateLimit-Reset-After": "0.5" }),
          hint({}, { "Retry-After": "2", "X-RateLimit-Reset-After": "0.7" }),
          hint(null, { "Retry-After": "4" }),
          hint({ retry_after: 3600 }, {}, 10),
          hint({}, { "Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT" }),
          hint({ retry_after: -1 }, { "Retry-After": "2" }),
          hint({ retry_after: 3600 }, {}),
        ];
      }"""
    )
    assert hints == [0.3, 0.7, 4, 10, None, 2, 60]


def test_send_gives_up_with_a_typed_error(harness: tuple[Script, Any]) -> None:
    script, page = harness
    script.http_plan = [503, 503, 503]
    page.evaluate("() => window.makeClient({ token: 'tok', maxRetries: 2 })")
    error = page.evaluate(
        """() => window.client.send('/command', {}).then(() => null,
             (e) => ({ name: e.name, status: e.status, code: e.code }))"""
    )
    assert error == {"name": "SplitchatHTTPError", "status": 503, "code": "unavailable"}
    assert len(script.http_attempts) == 3


@pytest.mark.parametrize("dead", ["refused", "silent"])
def test_dead_resume_url_is_tried_twice_then_the_configured_url_resumes(
    harness: tuple[Script, Any], dead: str
) -> None:
    script, page = harness
    script.heartbeat_interval = 300
    script.ack_heartbeats = [False, True]  # a zombie: the client reconnects after READY
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Bound, not listening: every connection is refused. Listening, never accepting: the
        # TCP handshake succeeds and the WebSocket upgrade is never answered (connectTimeout).
        sock.bind(("127.0.0.1", 0))
        if dead == "silent":
            sock.listen(8)
        script.resume_gateway_url = f"ws://127.0.0.1:{sock.getsockname()[1]}/gateway"
        page.evaluate(
            """() => { window.reconnects = [];
            const c = window.makeClient({ token: "tok", connectTimeout: 500 });
            c.onState((state, info) => { if (state === "reconnecting") window.reconnects.push(info); });
            c.connect(); }"""
        )
        page.wait_for_function("window.states.some(([s]) => s === 'resumed')", timeout=15_000)
    # The scripted gateway (the configured URL) saw the first connection and then the RESUME of
    # the same session: the two attempts in between went to the dead resume URL.
    assert len(script.connections) == 2
    assert script.connections[1].received[0] == {
        "op": 6,
        "d": {"token": "tok", "session_id": "sess-1", "seq": 1},
    }
    reconnects = page.evaluate("window.reconnects")
    assert len(reconnects) == 3
    assert [bool(r.get("resumeUrlGivenUp")) for r in reconnects] == [False, False, True]
    assert states(page) == ["connecting", "ready", "reconnecting", "reconnecting", "reconnecting", "resumed"]
    assert page.evaluate("window.client._resumeUrlFailures") == 2
