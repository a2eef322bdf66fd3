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
