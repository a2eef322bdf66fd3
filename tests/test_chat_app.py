"""HTTP-level tests of the example chat app (examples/chat): every route and its errors.

A real uvicorn server on an ephemeral loopback port, a real HTTP client (httpx) and, where a
route publishes, a real WebSocket gateway client (websockets) that checks the dispatch.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from examples.chat.app import ChatConfig, build_app
from examples.chat.store import Channel, Message, MessageStore
from websockets.sync.client import ClientConnection, connect

from .browser_support import serve_in_thread

LIFTED = ChatConfig(
    message_rate="1000/second", typing_rate="1000/second", global_rate="1000/second", login_rate="1000/minute"
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(build_app(LIFTED)) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def login(http: httpx.Client, name: str) -> tuple[str, dict[str, str]]:
    response = http.post("/api/login", json={"name": name})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["token"], body["user"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "errors"}
    return str(body["code"])


class GatewayClient:
    """A minimal real gateway client: IDENTIFY, then read dispatches by type."""

    def __init__(self, ws: ClientConnection, token: str, channels: list[str]) -> None:
        self.ws = ws
        hello = json.loads(self.ws.recv(timeout=10))
        assert hello["op"] == 10
        self.ws.send(json.dumps({"op": 2, "d": {"token": token, "subscriptions": channels}}))
        self.ready = self.next("READY")

    def next(self, type_: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            frame = json.loads(self.ws.recv(timeout=timeout))
            if frame["op"] == 0 and frame["t"] == type_:
                return dict(frame)


@pytest.fixture
def gateway_client(base_url: str, http: httpx.Client) -> Iterator[tuple[GatewayClient, str]]:
    token, _ = login(http, "watcher")
    with connect(base_url.replace("http", "ws") + "/gateway", open_timeout=10) as ws:
        yield GatewayClient(ws, token, ["general", "random", "no-such-channel"]), token


# ---- pages and assets ----------------------------------------------------------------------------


def test_index_page_and_browser_client_are_served(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and 'src="/static/chat.js"' in page.text
    module = http.get("/splitchat/splitchat.js")
    assert module.status_code == 200
    assert "javascript" in module.headers["content-type"]
    assert "export class SplitchatClient" in module.text
    assert http.get("/static/chat.js").status_code == 200


def test_index_page_has_an_inline_svg_favicon(http: httpx.Client) -> None:
    # Without a <link rel="icon"> browsers request /favicon.ico on every load (a 404).
    page = http.get("/").text
    match = re.search(r'<link rel="icon" href="data:image/svg\+xml,([^"]+)">', page)
    assert match is not None
    svg = ElementTree.fromstring(urllib.parse.unquote(match.group(1)))
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(svg) > 0  # it draws something


# ---- login (demo auth) -----------------------------------------------------------------------------


def test_login_returns_token_and_user(http: httpx.Client) -> None:
    response = http.post("/api/login", json={"name": "  ada  "})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "user"} and len(body["token"]) >= 20
    assert body["user"]["name"] == "ada" and body["user"]["id"].isdigit()
    assert http.get("/api/channels", headers=auth(body["token"])).status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b'{"name": ""}', 400, "invalid_body"),
        (b'{"name": "   "}', 400, "invalid_body"),
        (b'{"name": "' + b"x" * 33 + b'"}', 400, "invalid_body"),
        (b'{"name": 5}', 400, "invalid_body"),
        (b"{}", 400, "invalid_body"),
        (b'{"name": "a", "admin": true}', 400, "invalid_body"),
        (b"{not json", 400, "invalid_json"),
        (b'{"name": "' + b"x" * 5000 + b'"}', 413, "payload_too_large"),
    ],
)
def test_login_rejects_bad_bodies(http: httpx.Client, payload: bytes, status: int, code: str) -> None:
    response = http.post("/api/login", content=payload, headers={"Content-Type": "application/json"})
    assert error_code(response, status) == code


def test_login_requires_json(http: httpx.Client) -> None:
    response = http.post("/api/login", content=b"name=a", headers={"Content-Type": "text/plain"})
    assert error_code(response, 415) == "unsupported_media_type"


# ---- channels ----------------------------------------------------------------------------------------


def test_list_channels(http: httpx.Client) -> None:
    token, _ = login(http, "c")
    response = http.get("/api/channels", headers=auth(token))
    assert response.json() == [
        {"id": "general", "name": "general"},
        {"id": "random", "name": "random"},
        {"id": "help", "name": "help"},
    ]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}])
def test_routes_require_a_valid_token(http: httpx.Client, headers: dict[str, str]) -> None:
    assert error_code(http.get("/api/channels", headers=headers), 401) == "unauthorized"
    assert error_code(http.get("/api/channels/general/messages", headers=headers), 401) == "unauthorized"
    created = http.post("/api/channels/general/messages", json={"content": "x"}, headers=headers)
    assert error_code(created, 401) == "unauthorized"


# ---- messages ------------------------------------------------------------------------------------------


def test_create_message_returns_it_and_dispatches_message_create(
    http: httpx.Client, gateway_client: tuple[GatewayClient, str]
) -> None:
    gateway, _ = gateway_client
    assert gateway.ready["d"]["denied"] == ["no-such-channel"]
    token, user = login(http, "poster")
    response = http.post(
        "/api/channels/general/messages", json={"content": "hi there", "nonce": "n-1"}, headers=auth(token)
    )
    assert response.status_code == 200
    body = response.json()
    event = body.pop("event")
    assert body["nonce"] == "n-1"
    assert body["author"] == user and body["channel_id"] == "general" and body["content"] == "hi there"
    assert body["id"].isdigit() and body["timestamp"].endswith("+00:00")
    assert event["type"] == "MESSAGE_CREATE" and event["channel"] == "general"
    assert response.headers["X-Event-Id"] == event["id"]
    dispatch = gateway.next("MESSAGE_CREATE")
    assert dispatch["d"] == body  # the gateway carries the very same object
    assert dispatch["id"] == event["id"] and dispatch["channel"] == "general"
    assert dispatch["nonce"] == "n-1"


def test_same_nonce_creates_one_message(http: httpx.Client) -> None:
    token, _ = login(http, "retrier")
    first = http.post(
        "/api/channels/help/messages", json={"content": "once", "nonce": "k1"}, headers=auth(token)
    )
    again = http.post(
        "/api/channels/help/messages", json={"content": "once", "nonce": "k1"}, headers=auth(token)
    )
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    history = http.get("/api/channels/help/messages", headers=auth(token)).json()
    assert [m["content"] for m in history].count("once") == 1


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"content": ""}, "$.content"),
        ({"content": "x" * 2001}, "$.content"),
        ({"content": "   "}, "$.content"),
        ({"content": 12}, "$.content"),
        ({}, "$.content"),
    ],
)
def test_create_message_validates_content(http: httpx.Client, payload: dict[str, Any], field: str) -> None:
    token, _ = login(http, "v")
    response = http.post("/api/channels/general/messages", json=payload, headers=auth(token))
    assert error_code(response, 400) == "invalid_body"
    assert list(response.json()["errors"]) == [field]


def test_content_of_exactly_2000_chars_is_accepted(http: httpx.Client) -> None:
    token, _ = login(http, "long")
    response = http.post("/api/channels/random/messages", json={"content": "y" * 2000}, headers=auth(token))
    assert response.status_code == 200 and len(response.json()["content"]) == 2000


def test_unknown_channel_is_404(http: httpx.Client) -> None:
    token, _ = login(http, "lost")
    h = auth(token)
    assert error_code(http.post("/api/channels/nope/messages", json={"content": "x"}, headers=h), 404) == (
        "unknown_channel"
    )
    assert error_code(http.get("/api/channels/nope/messages", headers=h), 404) == "unknown_channel"
    assert error_code(http.post("/api/channels/nope/typing", headers=h), 404) == "unknown_channel"
    assert error_code(http.get("/api/channels/nope/presence", headers=h), 404) == "unknown_channel"
    assert error_code(http.delete("/api/channels/nope/messages/1", headers=h), 404) == "unknown_channel"


def test_edit_own_message_dispatches_update_and_others_get_403(
    http: httpx.Client, gateway_client: tuple[GatewayClient, str]
) -> None:
    gateway, _ = gateway_client
    author, _ = login(http, "author")
    other, _ = login(http, "other")
    created = http.post("/api/channels/general/messages", json={"content": "v1"}, headers=auth(author)).json()
    url = f"/api/channels/general/messages/{created['id']}"
    forbidden = http.patch(url, json={"content": "hacked"}, headers=auth(other))
    assert error_code(forbidden, 403) == "not_author"
    response = http.patch(url, json={"content": "v2"}, headers=auth(author))
    assert response.status_code == 200
    updated = response.json()
    updated.pop("event")
    assert updated["content"] == "v2" and updated["edited_timestamp"] and updated["id"] == created["id"]
    assert gateway.next("MESSAGE_UPDATE")["d"] == updated
    assert error_code(http.patch(url, json={"content": ""}, headers=auth(author)), 400) == "invalid_body"
    missing = http.patch("/api/channels/general/messages/123", json={"content": "x"}, headers=auth(author))
    assert error_code(missing, 404) == "unknown_message"
    not_an_id = http.patch("/api/channels/general/messages/abc", json={"content": "x"}, headers=auth(author))
    assert error_code(not_an_id, 404) == "unknown_message"


def test_delete_own_message_dispatches_delete(
    http: httpx.Client, gateway_client: tuple[GatewayClient, str]
) -> None:
    gateway, _ = gateway_client
    author, _ = login(http, "deleter")
    other, _ = login(http, "bystander")
    created = http.post("/api/channels/random/messages", json={"content": "bye"}, headers=auth(author)).json()
    url = f"/api/channels/random/messages/{created['id']}"
    assert error_code(http.delete(url, headers=auth(other)), 403) == "not_author"
    response = http.delete(url, headers=auth(author))
    assert response.status_code == 204 and response.content == b""
    assert gateway.next("MESSAGE_DELETE")["d"] == {"id": created["id"], "channel_id": "random"}
    assert error_code(http.delete(url, headers=auth(author)), 404) == "unknown_message"
    history = http.get("/api/channels/random/messages", headers=auth(author)).json()
    assert created["id"] not in [m["id"] for m in history]


def test_typing_is_204_and_an_ephemeral_dispatch(
    http: httpx.Client, gateway_client: tuple[GatewayClient, str]
) -> None:
    gateway, _ = gateway_client
    token, user = login(http, "typist")
    response = http.post("/api/channels/general/typing", headers=auth(token))
    assert response.status_code == 204
    dispatch = gateway.next("TYPING_START")
    assert dispatch["d"]["channel_id"] == "general" and dispatch["d"]["user_id"] == user["id"]
    assert isinstance(dispatch["d"]["timestamp"], int)


def test_presence_lists_connected_users(
    http: httpx.Client, gateway_client: tuple[GatewayClient, str]
) -> None:
    gateway, token = gateway_client
    members = http.get("/api/channels/general/presence", headers=auth(token)).json()
    assert gateway.ready["d"]["user"] in members


def test_message_history_paging(base_url: str) -> None:
    # Own server: a fresh channel log makes exact counts possible.
    with serve_in_thread(build_app(LIFTED)) as url, httpx.Client(base_url=url, timeout=10) as http:
        token, _ = login(http, "pager")
        h = auth(token)
        ids = [
            http.post("/api/channels/general/messages", json={"content": f"m{n}"}, headers=h).json()["id"]
            for n in range(60)
        ]
        default = http.get("/api/channels/general/messages", headers=h).json()
        assert [m["id"] for m in default] == ids[::-1][:50]  # newest first, default limit 50
        top = http.get("/api/channels/general/messages", params={"limit": 100}, headers=h).json()
        assert len(top) == 60
        before = http.get("/api/channels/general/messages", params={"before": ids[10], "limit": 5}, headers=h)
        assert [m["id"] for m in before.json()] == ids[5:10][::-1]
        after = http.get("/api/channels/general/messages", params={"after": ids[10], "limit": 3}, headers=h)
        assert [m["id"] for m in after.json()] == ids[11:14][::-1]
        both = http.get(
            "/api/channels/general/messages", params={"after": ids[1], "before": ids[4]}, headers=h
        ).json()
        assert [m["id"] for m in both] == [ids[3], ids[2]]
        for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before": "abc"}, {"after": "-1"}):
            response = http.get("/api/channels/general/messages", params=params, headers=h)
            assert error_code(response, 400) == "invalid_query"


def test_rate_limits_answer_429_with_retry_after() -> None:
    config = ChatConfig(message_rate="2/5 seconds", login_rate="3/minute")
    with serve_in_thread(build_app(config)) as url, httpx.Client(base_url=url, timeout=10) as http:
        token, _ = login(http, "fast")
        statuses = [
            http.post(
                "/api/channels/general/messages", json={"content": f"{n}"}, headers=auth(token)
            ).status_code
            for n in range(3)
        ]
        assert statuses == [200, 200, 429]
        limited = http.post("/api/channels/general/messages", json={"content": "x"}, headers=auth(token))
        assert limited.status_code == 429
        body = limited.json()
        assert 0 < body["retry_after"] <= 5 and body["global"] is False
        assert limited.headers["X-RateLimit-Limit"] == "2" and limited.headers["Retry-After"]
        # Login is limited per client IP: 3/minute here, one already used by "fast" above.
        login_statuses = [http.post("/api/login", json={"name": f"u{n}"}).status_code for n in range(3)]
        assert login_statuses == [200, 200, 429]


def test_config_from_env() -> None:
    config = ChatConfig.from_env(
        {
            "SPLITCHAT_BUS_URL": "redis://127.0.0.1:6379/0",
            "SPLITCHAT_MESSAGE_RATE": "100/second",
            "SPLITCHAT_CHANNELS": "a, b",
            "SPLITCHAT_HISTORY_LIMIT": "10",
            "SPLITCHAT_HEARTBEAT_INTERVAL": "2.5",
        }
    )
    assert config.bus_url == "redis://127.0.0.1:6379/0"
    assert config.message_rate == "100/second" and config.typing_rate == ChatConfig().typing_rate
    assert config.channels == ("a", "b") and config.history_limit == 10
    assert config.heartbeat_interval == 2.5
    assert ChatConfig.from_env({}) == ChatConfig()


def test_store_is_bounded_per_channel() -> None:
    store = MessageStore([Channel("a", "a"), Channel("b", "b")], max_messages=3)
    for n in range(1, 6):
        store.add(
            Message(id=str(n), channel_id="a", author={"id": "u", "name": "u"}, content="", timestamp="")
        )
    store.add(Message(id="9", channel_id="b", author={"id": "u", "name": "u"}, content="", timestamp=""))
    assert [m.id for m in store.page("a", limit=100)] == ["5", "4", "3"]
    assert [m.id for m in store.page("b", limit=100)] == ["9"]


@pytest.mark.redis
def test_chat_runs_on_the_redis_bus_and_state() -> None:
    # SPLITCHAT_BUS_URL / SPLITCHAT_STATE_URL switch the example to Redis: a message posted over
    # HTTP comes back over the gateway through Redis Streams, with sessions etc. in Redis.
    prefix = f"chat-test-{uuid.uuid4().hex[:8]}:"
    config = ChatConfig.from_env(
        {
            "SPLITCHAT_BUS_URL": f"redis://127.0.0.1:6379/0?prefix={prefix}bus:",
            "SPLITCHAT_STATE_URL": "redis://127.0.0.1:6379/0",
            "SPLITCHAT_STATE_PREFIX": prefix,
        }
    )
    try:
        with serve_in_thread(build_app(config)) as url, httpx.Client(base_url=url, timeout=10) as http:
            token, user = login(http, "redis-user")
            with connect(url.replace("http", "ws") + "/gateway", open_timeout=10) as ws:
                client = GatewayClient(ws, token, ["general"])
                assert client.ready["d"]["subscriptions"] == ["general"]
                sent = http.post(
                    "/api/channels/general/messages",
                    json={"content": "via redis", "nonce": "r1"},
                    headers=auth(token),
                )
                assert sent.status_code == 200, sent.text
                event = client.next("MESSAGE_CREATE")
                assert event["d"]["id"] == sent.json()["id"] and event["d"]["content"] == "via redis"
                assert event["d"]["author"] == user and event["nonce"] == "r1"
                position = sent.json()["event"]["position"]
                assert position["offset"] == 1  # a fresh stream under this run's prefix
    finally:
        import redis

        r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
        r.close()
