"""The example chat app in real Chromium: two users, two browser contexts, one real server.

Covers what a person would check by hand: a message typed by A appears for B; B loses its
network, A keeps talking, B comes back and sees every missed message exactly once and in order
(the browser client RESUMEs and the gateway replays); typing indicator and presence show up for
the other user. A screenshot is saved under test-artifacts/ for humans to look at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .browser_support import browser_skip_reason, chromium, serve_in_thread

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason())),
]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def chat_url() -> Iterator[str]:
    from examples.chat.app import ChatConfig, build_app

    # A short heartbeat so a silently dead connection (the offline browser) is noticed in ~1-2 s;
    # rate limits lifted so the test measures delivery, not throttling.
    config = ChatConfig(heartbeat_interval=1.0, message_rate="100/second", typing_rate="100/second")
    with serve_in_thread(build_app(config)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


def join(browser: Any, url: str, name: str) -> tuple[Any, Any]:
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    page = context.new_page()
    page.goto(url + "/")
    page.fill("#name", name)
    page.click("#login-btn")
    page.wait_for_selector('#connection[data-state="ready"]')
    return context, page


def message_texts(page: Any) -> list[str]:
    return list(
        page.eval_on_selector_all("#messages .message .content", "els => els.map(e => e.textContent)")
    )


def send(page: Any, text: str) -> None:
    page.fill("#content", text)
    page.press("#content", "Enter")


def test_two_users_chat_with_typing_presence_and_offline_resume(browser: Any, chat_url: str) -> None:
    context_a, alice = join(browser, chat_url, "alice")
    context_b, bob = join(browser, chat_url, "bob")
    try:
        # Presence: each sees the other online in #general.
        alice.wait_for_selector("#presence li:has-text('bob')")
        bob.wait_for_selector("#presence li:has-text('alice')")

        # Typing: alice types, bob sees the indicator (ephemeral TYPING_START).
        alice.fill("#content", "hel")
        alice.dispatch_event("#content", "input")
        bob.wait_for_function("document.querySelector('#typing').textContent.includes('alice is typing')")

        # A sends, B sees it; A's optimistic copy is reconciled by nonce into exactly one message.
        send(alice, "hello bob")
        bob.wait_for_function("document.querySelectorAll('#messages .message').length === 1")
        assert message_texts(bob) == ["hello bob"]
        alice.wait_for_function("document.querySelectorAll('#messages .message:not(.pending)').length === 1")
        assert message_texts(alice) == ["hello bob"]
        assert bob.text_content("#typing") == ""  # a message from alice ends her typing indicator

        # B goes offline. A keeps sending: some while B's socket still looks open (frames are
        # lost in flight), more after B's client noticed the missing heartbeat ACKs.
        context_b.set_offline(True)
        for n in range(5):
            send(alice, f"missed {n}")
        bob.wait_for_function("window.chat.stateLog.includes('reconnecting')", timeout=15_000)
        for n in range(5, 10):
            send(alice, f"missed {n}")
        expected = ["hello bob"] + [f"missed {n}" for n in range(10)]
        alice.wait_for_function(
            "document.querySelectorAll('#messages .message:not(.pending)').length === 11", timeout=15_000
        )
        assert message_texts(alice) == expected
        assert message_texts(bob) == ["hello bob"]  # nothing arrived while offline

        # B comes back: RESUME replays every missed message once, in order.
        context_b.set_offline(False)
        bob.wait_for_selector('#connection[data-state="resumed"]', timeout=20_000)
        bob.wait_for_function("document.querySelectorAll('#messages .message').length >= 11")
        assert message_texts(bob) == expected
        states = bob.evaluate("window.chat.stateLog")
        assert states[:2] == ["connecting", "ready"]
        assert states[-1] == "resumed" and "reconnecting" in states
        # Every message id is distinct (no duplicate render), and B still sees alice online.
        ids = bob.eval_on_selector_all("#messages .message", "els => els.map(e => e.dataset.id)")
        assert len(set(ids)) == 11
        bob.wait_for_selector("#presence li:has-text('alice')")

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "chat-bob-after-resume.png"
        bob.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 1000
    finally:
        context_a.close()
        context_b.close()


# ---- sending under the rate limit, failed sends, narrow screens ---------------------------------


@pytest.fixture(scope="module")
def limited_chat_url() -> Iterator[str]:
    from examples.chat.app import ChatConfig, build_app

    # The message limit lowered from 5 per 5 s to 3 per second: 8 quick messages hit it twice
    # and the test still takes only a few seconds.
    config = ChatConfig(heartbeat_interval=5.0, message_rate="3/second", typing_rate="100/second")
    with serve_in_thread(build_app(config)) as url:
        yield url


def server_history(url: str, page: Any) -> list[str]:
    token = page.evaluate("window.chat.client.token")
    response = httpx.get(
        f"{url}/api/channels/general/messages?limit=100",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200
    return [message["content"] for message in reversed(response.json())]  # oldest first


def confirmed_count(page: Any, count: int) -> str:
    return f"document.querySelectorAll('#messages .message:not(.pending):not(.failed)').length === {count}"


def test_quick_sends_under_the_rate_limit_keep_their_order(browser: Any, limited_chat_url: str) -> None:
    context_a, alice = join(browser, limited_chat_url, "alice")
    context_b, bob = join(browser, limited_chat_url, "bob")
    statuses: list[int] = []
    alice.on(
        "response",
        lambda response: statuses.append(response.status) if response.request.method == "POST" else None,
    )
    try:
        expected = [f"m{n:02d}" for n in range(8)]
        for text in expected:
            send(alice, text)
        alice.wait_for_function(confirmed_count(alice, 8), timeout=20_000)
        bob.wait_for_function(confirmed_count(bob, 8), timeout=20_000)
        assert message_texts(alice) == expected
        assert message_texts(bob) == expected
        assert server_history(limited_chat_url, alice) == expected
        # The limit really was hit (else this test would prove nothing about retries), and no
        # message was given up.
        assert 429 in statuses
        assert alice.eval_on_selector_all(".message.failed", "els => els.length") == 0
    finally:
        context_a.close()
        context_b.close()


def test_failed_send_can_be_retried_or_dismissed(browser: Any, limited_chat_url: str) -> None:
    context_a, alice = join(browser, limited_chat_url, "carol")
    context_b, bob = join(browser, limited_chat_url, "dave")
    before = server_history(limited_chat_url, alice)

    def refuse_doomed(route: Any) -> None:
        # A final (non-retryable) refusal for messages whose text starts with "doomed".
        body = route.request.post_data or ""
        if route.request.method == "POST" and '"content":"doomed' in body:
            route.fulfill(
                status=400,
                content_type="application/json",
                body='{"code": "invalid_body", "message": "Simulated refusal", "errors": {}}',
            )
        else:
            route.continue_()

    alice.route("**/api/channels/general/messages", refuse_doomed)
    try:
        send(alice, "doomed 1")
        send(alice, "doomed 2")
        send(alice, "after")
        alice.wait_for_selector(".message.failed:has-text('doomed 2')")
        # A failure does not hold the queue: "after" went through; the two failures wait.
        alice.wait_for_function(confirmed_count(alice, len(before) + 1))
        failed = alice.eval_on_selector_all(".message.failed .content", "els => els.map(e => e.textContent)")
        assert failed == ["doomed 1", "doomed 2"]
        assert "Simulated refusal" in alice.text_content(".message.failed .error")

        alice.unroute("**/api/channels/general/messages")
        alice.click(".message.failed:has-text('doomed 1') button.retry")
        alice.click(".message.failed:has-text('doomed 2') button.dismiss")
        alice.wait_for_function(confirmed_count(alice, len(before) + 2))
        assert alice.eval_on_selector_all(".message.failed, .message.pending", "els => els.length") == 0
        bob.wait_for_function(confirmed_count(bob, len(before) + 2))
        assert message_texts(bob)[-2:] == ["after", "doomed 1"]
        assert message_texts(alice)[-2:] == ["after", "doomed 1"]
        assert server_history(limited_chat_url, alice) == [*before, "after", "doomed 1"]
    finally:
        context_a.close()
        context_b.close()


def test_narrow_screen_keeps_messages_composer_and_status_visible(
    browser: Any, limited_chat_url: str
) -> None:
    width, height = 400, 740
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    failures: list[str] = []
    page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    try:
        page.goto(limited_chat_url + "/")
        page.fill("#name", "a-rather-long-name-for-a-phone")
        page.click("#login-btn")
        page.wait_for_selector('#connection[data-state="ready"]')
        page.wait_for_selector("#presence li")
        send(page, "a long message " + "word " * 40 + "and-an-unbroken-" + "x" * 80)
        page.wait_for_selector(".message:not(.pending)")

        def box(selector: str) -> dict[str, float]:
            found = page.locator(selector).first.bounding_box()
            assert found is not None, selector
            return dict(found)

        for selector in ["#send-btn", "#content", "#connection", "#presence li", "#channels li", "#messages"]:
            rect = box(selector)
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= width, (selector, rect)
            assert rect["y"] >= 0 and rect["y"] + rect["height"] <= height, (selector, rect)
        # Nothing is wider than the screen (no horizontal scrolling), the message wraps.
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        message = box(".message:not(.pending)")
        assert message["x"] + message["width"] <= width
        assert failures == []  # no /favicon.ico (or any other) 404

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "chat-400px.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 1000
    finally:
        context.close()
