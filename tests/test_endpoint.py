"""CommandEndpoint through an in-process ASGI client, on asyncio and trio."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from splitchat import (
    AuditRecord,
    CommandContext,
    CommandEndpoint,
    InMemoryBus,
    InMemoryIdempotencyStore,
    Position,
    RateLimiter,
    StaticTokenAuthenticator,
    decode_event,
    lifespan,
)
from tests.endpoint_support import (
    ALICE,
    AUTH,
    BOB_AUTH,
    TOKEN,
    CreateMessage,
    asgi_client,
    build_endpoint,
)

RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-reset-after")


@pytest.fixture
async def bus() -> AsyncIterator[InMemoryBus]:
    async with InMemoryBus() as bus:
        yield bus


@pytest.fixture
async def client(bus: InMemoryBus) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_endpoint(bus)) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["errors"], dict)
    assert set(body) == {"code", "message", "errors"}
    return body


async def event_count(bus: InMemoryBus, channel: str) -> int:
    return (await bus.current_position(channel)).offset


# -- success path ------------------------------------------------------------------------------


async def test_post_creates_object_and_publishes_event_at_returned_position(
    bus: InMemoryBus, client: httpx.AsyncClient
) -> None:
    response = await client.post("/channels/general/messages", json={"content": "hello"}, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["content"] == "hello"
    assert body["channel_id"] == "general"
    assert body["author"] == {"id": "1", "name": "alice"}
    receipt = body["event"]
    assert receipt["type"] == "MESSAGE_CREATE"
    assert receipt["channel"] == "general"
    position = Position(receipt["position"]["epoch"], receipt["position"]["offset"])
    assert response.headers["x-event-id"] == receipt["id"]
    assert response.headers["x-event-position"] == str(position)
    for name in (*RATE_HEADERS, "x-ratelimit-bucket"):
        assert name in response.headers
    assert response.headers["x-ratelimit-bucket"] == "create_message"
    assert response.headers["x-ratelimit-remaining"] == "4"
    assert "nonce" not in body

    history = await bus.history("general", Position(position.epoch, position.offset - 1))
    assert len(history) == 1
    assert history[0].position == position
    event = decode_event(history[0].payload)
    assert event.id == receipt["id"]
    assert event.type == "MESSAGE_CREATE"
    assert event.channel == "general"
    assert json.loads(bytes(event.data)) == {k: v for k, v in body.items() if k != "event"}


async def test_query_publishes_nothing_and_patch_delete_work(
    bus: InMemoryBus, client: httpx.AsyncClient
) -> None:
    created = (await client.post("/channels/c/messages", json={"content": "a"}, headers=AUTH)).json()
    got = await client.get(f"/channels/c/messages/{created['id']}", headers=AUTH)
    assert got.status_code == 200
    assert got.json()["content"] == "a"
    assert "event" not in got.json()
    assert "x-event-id" not in got.headers
    assert await event_count(bus, "c") == 1

    edited = await client.patch(f"/channels/c/messages/{created['id']}", json={"content": "b"}, headers=AUTH)
    assert edited.status_code == 200
    assert edited.json()["content"] == "b"
    assert edited.json()["event"]["type"] == "MESSAGE_UPDATE"

    deleted = await client.delete(f"/channels/c/messages/{created['id']}", headers=AUTH)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert await event_count(bus, "c") == 3
    assert deleted.headers["x-event-position"].endswith(":3")


async def test_ephemeral_event_has_no_position_and_no_history(
    bus: InMemoryBus, client: httpx.AsyncClient
) -> None:
    async with bus.subscribe(["room"]) as sub:
        response = await client.post("/channels/room/typing", headers=AUTH)
        assert response.status_code == 204
        assert "x-event-id" in response.headers
        assert "x-event-position" not in response.headers
        with anyio.fail_after(2):
            delivery = await sub.receive()
    assert delivery.position is None  # type: ignore[union-attr]
    assert decode_event(delivery.payload).ephemeral  # type: ignore[union-attr]
    assert await event_count(bus, "room") == 0


async def test_public_command_needs_no_token(client: httpx.AsyncClient) -> None:
    anonymous = await client.get("/status")
    assert anonymous.status_code == 200
    assert anonymous.json() == {"ok": True, "user": None}
    assert anonymous.headers["x-ratelimit-bucket"] == "global"
    authed = await client.get("/status", headers=AUTH)
    assert authed.json() == {"ok": True, "user": "1"}


# -- idempotency -------------------------------------------------------------------------------


async def test_same_nonce_returns_identical_body_and_no_second_event(
    bus: InMemoryBus, client: httpx.AsyncClient
) -> None:
    payload = {"content": "once", "nonce": "n-123"}
    first = await client.post("/channels/c/messages", json=payload, headers=AUTH)
    second = await client.post("/channels/c/messages", json=payload, headers=AUTH)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.json()["nonce"] == "n-123"
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["x-event-id"] == first.headers["x-event-id"]
    assert second.headers["x-event-position"] == first.headers["x-event-position"]
    assert await event_count(bus, "c") == 1
    history = await bus.history("c", Position(bus.epoch, 0))
    assert decode_event(history[0].payload).nonce == "n-123"


async def test_same_idempotency_key_returns_identical_body_and_no_second_event(
    bus: InMemoryBus, client: httpx.AsyncClient
) -> None:
    headers = {**AUTH, "Idempotency-Key": "key-1"}
    first = await client.post("/channels/c/messages", json={"content": "x"}, headers=headers)
    second = await client.post("/channels/c/messages", json={"content": "x"}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.json()["nonce"] == "key-1"
    assert await event_count(bus, "c") == 1


async def test_idempotency_key_is_scoped_per_principal(bus: InMemoryBus, client: httpx.AsyncClient) -> None:
    await client.post("/channels/c/messages", json={"content": "x", "nonce": 7}, headers=AUTH)
    other = await client.post("/channels/c/messages", json={"content": "x", "nonce": 7}, headers=BOB_AUTH)
    assert other.status_code == 200
    assert "idempotent-replayed" not in other.headers
    assert await event_count(bus, "c") == 2


async def test_same_key_different_body_is_422_conflict(bus: InMemoryBus, client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "key-2"}
    await client.post("/channels/c/messages", json={"content": "x"}, headers=headers)
    response = await client.post("/channels/c/messages", json={"content": "y"}, headers=headers)
    assert_error(response, 422, "idempotency_conflict")
    assert await event_count(bus, "c") == 1


async def test_nonce_and_header_must_agree(client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "a"}
    response = await client.post("/channels/c/messages", json={"content": "x", "nonce": "b"}, headers=headers)
    body = assert_error(response, 400, "invalid_body")
    assert "$.nonce" in body["errors"]


@pytest.mark.parametrize("nonce", [[1], 1.5, {"a": 1}, "x" * 65])
async def test_invalid_nonce_is_400(client: httpx.AsyncClient, nonce: Any) -> None:
    response = await client.post("/channels/c/messages", json={"content": "x", "nonce": nonce}, headers=AUTH)
    body = assert_error(response, 400, "invalid_body")
    assert list(body["errors"]) == ["$.nonce"]


async def test_concurrent_duplicate_gets_409_in_progress_and_runs_once() -> None:
    release = anyio.Event()
    entered = anyio.Event()
    runs = 0
    async with InMemoryBus() as bus:
        endpoint = CommandEndpoint(bus=bus, authenticator=StaticTokenAuthenticator({TOKEN: ALICE}))

        @endpoint.command("POST", "/slow/{channel_id}", body=CreateMessage, channel="{channel_id}")
        async def slow(ctx: CommandContext, body: CreateMessage) -> dict[str, Any]:
            nonlocal runs
            runs += 1
            entered.set()
            await release.wait()
            ctx.publish("SLOW", {"content": body.content})
            return {"content": body.content}

        payload = {"content": "x", "nonce": "dup"}
        results: list[httpx.Response] = []
        async with asgi_client(endpoint) as client:

            async def post() -> None:
                results.append(await client.post("/slow/c", json=payload, headers=AUTH))

            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                with anyio.fail_after(5):
                    await entered.wait()
                duplicate = await client.post("/slow/c", json=payload, headers=AUTH)
                release.set()
            assert_error(duplicate, 409, "idempotency_in_progress")
            assert duplicate.headers["retry-after"] == "1"
            assert results[0].status_code == 200
            replay = await client.post("/slow/c", json=payload, headers=AUTH)
            assert replay.content == results[0].content
        assert runs == 1
        assert await event_count(bus, "c") == 1


async def test_bus_unavailable_is_503_and_releases_the_claim() -> None:
    bus = InMemoryBus()  # not started: publish raises BusUnavailable
    async with asgi_client(build_endpoint(bus)) as client:
        payload = {"content": "x", "nonce": "retry-me"}
        failed = await client.post("/channels/c/messages", json=payload, headers=AUTH)
        assert_error(failed, 503, "bus_unavailable")
        assert await event_count(bus, "c") == 0
        await bus.start()
        retried = await client.post("/channels/c/messages", json=payload, headers=AUTH)
        assert retried.status_code == 200
        assert "idempotent-replayed" not in retried.headers
        assert await event_count(bus, "c") == 1
        await bus.close()


async def test_handler_http_error_is_replayed_for_the_same_key(client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "k404"}
    first = await client.patch("/channels/c/messages/999", json={"content": "x"}, headers=headers)
    second = await client.patch("/channels/c/messages/999", json={"content": "x"}, headers=headers)
    assert_error(first, 404, "unknown_message")
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"


# -- rate limits -------------------------------------------------------------------------------


async def test_sixth_post_in_window_is_429_with_headers_and_retry_after(
    bus: InMemoryBus, client: httpx.AsyncClient
) -> None:
    started = time.time()
    for i in range(5):
        ok = await client.post("/channels/c/messages", json={"content": str(i)}, headers=AUTH)
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-remaining"] == str(4 - i)
    limited = await client.post("/channels/c/messages", json={"content": "6"}, headers=AUTH)
    elapsed = time.time() - started
    assert limited.status_code == 429
    body = limited.json()
    assert set(body) == {"message", "retry_after", "global"}
    assert body["global"] is False
    assert 5 - elapsed - 0.01 <= body["retry_after"] <= 5.0
    headers = limited.headers
    assert headers["x-ratelimit-limit"] == "5"
    assert headers["x-ratelimit-remaining"] == "0"
    assert headers["x-ratelimit-bucket"] == "create_message"
    assert headers["x-ratelimit-scope"] == "user"
    assert abs(float(headers["x-ratelimit-reset-after"]) - body["retry_after"]) < 0.01
    assert abs(float(headers["x-ratelimit-reset"]) - (time.time() + body["retry_after"])) < 0.5
    assert int(headers["retry-after"]) >= body["retry_after"]
    assert int(headers["retry-after"]) <= 5
    assert await event_count(bus, "c") == 5
    # Another channel is another bucket (major parameter); another user has their own budget.
    assert (await client.post("/channels/d/messages", json={"content": "x"}, headers=AUTH)).status_code == 200
    assert (
        await client.post("/channels/c/messages", json={"content": "x"}, headers=BOB_AUTH)
    ).status_code == 200


async def test_global_per_principal_limit_is_429_global(bus: InMemoryBus) -> None:
    async with asgi_client(build_endpoint(bus, global_rate_limit="3/minute")) as client:
        for _ in range(3):
            assert (await client.get("/status", headers=AUTH)).status_code == 200
        limited = await client.get("/status", headers=AUTH)
        assert limited.status_code == 429
        assert limited.json()["global"] is True
        assert limited.headers["x-ratelimit-scope"] == "global"
        assert limited.headers["x-ratelimit-bucket"] == "global"
        assert limited.headers["x-ratelimit-global"] == "true"
        # Unauthenticated callers are limited per IP, separately.
        assert (await client.get("/status")).status_code == 200


async def test_shared_rate_limit_spans_users() -> None:
    async with InMemoryBus() as bus:
        endpoint = build_endpoint(bus)

        @endpoint.command("POST", "/rooms/{room}/ping", channel="{room}", shared_rate_limit="2/minute")
        async def ping(ctx: CommandContext) -> dict[str, Any]:
            return {}

        async with asgi_client(endpoint) as client:
            assert (await client.post("/rooms/r/ping", headers=AUTH)).status_code == 200
            assert (await client.post("/rooms/r/ping", headers=BOB_AUTH)).status_code == 200
            limited = await client.post("/rooms/r/ping", headers=AUTH)
            assert limited.status_code == 429
            assert limited.headers["x-ratelimit-scope"] == "shared"
            assert (await client.post("/rooms/other/ping", headers=AUTH)).status_code == 200


async def test_invalid_request_guard_blocks_abusive_ip(bus: InMemoryBus) -> None:
    endpoint = build_endpoint(bus, invalid_request_limit="3/minute")
    async with asgi_client(endpoint, client=("10.0.0.9", 1)) as abuser, asgi_client(endpoint) as other:
        for _ in range(3):
            assert (
                await abuser.get("/channels/c/messages/1", headers={"Authorization": "Bearer x"})
            ).status_code == 401
        blocked = await abuser.get("/status", headers=AUTH)
        assert blocked.status_code == 429
        assert blocked.json()["global"] is True
        assert blocked.headers["x-ratelimit-bucket"] == "invalid-requests"
        assert 0 < blocked.json()["retry_after"] <= 60
        assert (await other.get("/status", headers=AUTH)).status_code == 200


# -- errors ------------------------------------------------------------------------------------


async def test_400_invalid_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/channels/c/messages", content=b"{not json", headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({"content": 5}, "$.content"),
        ({}, "$.content"),
        ([1, 2], "$"),
        ({"content": "x", "tts": "yes"}, "$.tts"),
    ],
)
async def test_400_invalid_body_reports_field_path(
    client: httpx.AsyncClient, payload: Any, path: str
) -> None:
    response = await client.post("/channels/c/messages", json=payload, headers=AUTH)
    body = assert_error(response, 400, "invalid_body")
    assert list(body["errors"]) == [path]
    assert "x-ratelimit-limit" in response.headers


async def test_400_from_handler(client: httpx.AsyncClient) -> None:
    response = await client.post("/channels/c/messages", json={"content": ""}, headers=AUTH)
    body = assert_error(response, 400, "invalid_body")
    assert body["errors"] == {"$.content": "must not be empty"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Token {TOKEN}"},
    ],
)
async def test_401_unauthorized(bus: InMemoryBus, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.post("/channels/c/messages", json={"content": "x"}, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert await event_count(bus, "c") == 0


async def test_403_forbidden_channel_scope_and_handler(client: httpx.AsyncClient) -> None:
    denied = await client.post("/channels/private-1/messages", json={"content": "x"}, headers=BOB_AUTH)
    assert_error(denied, 403, "forbidden")
    no_scope = await client.post("/admin/broadcast", json={"content": "x"}, headers=AUTH)
    assert_error(no_scope, 403, "forbidden")
    created = (await client.post("/channels/c/messages", json={"content": "a"}, headers=AUTH)).json()
    not_yours = await client.patch(
        f"/channels/c/messages/{created['id']}", json={"content": "b"}, headers=BOB_AUTH
    )
    assert_error(not_yours, 403, "forbidden")


async def test_per_command_authorize_hook() -> None:
    async with InMemoryBus() as bus:
        endpoint = build_endpoint(bus)

        async def only_even(ctx: CommandContext) -> bool:
            return int(ctx.params["n"]) % 2 == 0

        @endpoint.command("POST", "/numbers/{n}", authorize=only_even)
        async def number(ctx: CommandContext) -> dict[str, Any]:
            return {"n": ctx.params["n"]}

        async with asgi_client(endpoint) as client:
            assert (await client.post("/numbers/2", headers=AUTH)).json() == {"n": "2"}
            assert_error(await client.post("/numbers/3", headers=AUTH), 403, "forbidden")


async def test_404_not_found(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/nope", headers=AUTH), 404, "not_found")
    assert_error(await client.get("/channels/c/messages/1", headers=AUTH), 404, "unknown_message")


async def test_405_method_not_allowed_with_allow_header(client: httpx.AsyncClient) -> None:
    response = await client.put("/channels/c/messages/1", json={}, headers=AUTH)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET, PATCH"


async def test_413_on_declared_content_length(bus: InMemoryBus, client: httpx.AsyncClient) -> None:
    big = json.dumps({"content": "x" * 70_000}).encode()
    response = await client.post(
        "/channels/c/messages", content=big, headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")
    assert await event_count(bus, "c") == 0


async def test_413_while_streaming_without_content_length(bus: InMemoryBus) -> None:
    """The body is refused after max_body_bytes without reading (or buffering) the rest."""
    endpoint = build_endpoint(bus, max_body_bytes=1024)
    chunks_read = 0

    async def receive() -> dict[str, Any]:
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b"x" * 300, "more_body": True}  # endless stream

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/channels/c/messages",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
    }
    with anyio.fail_after(5):
        await endpoint(scope, receive, send)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["code"] == "payload_too_large"
    assert chunks_read == 4  # 4 x 300 > 1024: stopped at the first chunk over the limit
    assert await event_count(bus, "c") == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"])
async def test_415_unsupported_media_type(client: httpx.AsyncClient, content_type: str | None) -> None:
    headers = dict(AUTH)
    if content_type:
        headers["content-type"] = content_type
    response = await client.post("/channels/c/messages", content=b'{"content": "x"}', headers=headers)
    assert_error(response, 415, "unsupported_media_type")


async def test_json_content_type_with_charset_is_accepted(client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "content-type": "application/json; charset=utf-8"}
    response = await client.post("/channels/c/messages", content=b'{"content": "x"}', headers=headers)
    assert response.status_code == 200


async def test_500_internal_error_on_handler_bug_is_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="splitchat.endpoint"):
        response = await client.post("/buggy", headers=AUTH)
    body = assert_error(response, 500, "internal_error")
    assert "secret detail" not in response.text
    assert body["errors"] == {}
    assert any("buggy" in record.getMessage() and record.exc_info for record in caplog.records)


async def test_client_disconnect_before_body_is_quiet(bus: InMemoryBus) -> None:
    endpoint = build_endpoint(bus)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/channels/c/messages",
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-type", b"application/json")],
    }
    await endpoint(scope, receive, send)
    assert sent == []
    assert await event_count(bus, "c") == 0


# -- request id and audit ----------------------------------------------------------------------


async def test_request_id_echoed_or_generated(client: httpx.AsyncClient) -> None:
    echoed = await client.get("/status", headers={"X-Request-Id": "req-42"})
    assert echoed.headers["x-request-id"] == "req-42"
    generated = await client.get("/status", headers={"X-Request-Id": "bad\x7fid"})
    assert generated.headers["x-request-id"].isdigit()
    assert (await client.get("/status")).headers["x-request-id"].isdigit()


async def test_audit_records_every_command_and_never_logs_tokens(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        await client.post(
            "/channels/c/messages",
            json={"content": "x", "nonce": "n1"},
            headers={**AUTH, "X-Request-Id": "r1"},
        )
        await client.post("/channels/c/messages", json={"content": "x", "nonce": "n1"}, headers=AUTH)
        await client.post(
            "/channels/c/messages", json={"content": "x"}, headers={"Authorization": "Bearer leaked-1"}
        )
        await client.post("/buggy", headers=AUTH)
    audit = [r.audit for r in caplog.records if r.name == "splitchat.audit"]  # type: ignore[attr-defined]
    assert [a.outcome for a in audit] == ["ok", "replayed", "unauthorized", "internal_error"]
    first = audit[0]
    assert isinstance(first, AuditRecord)
    assert first.request_id == "r1"
    assert first.principal_id == "1"
    assert first.command == "create_message"
    assert first.channel == "c"
    assert first.status == 200
    assert first.latency_ms >= 0
    assert len(first.event_ids) == 1
    assert audit[1].idempotent_replay is True
    assert audit[2].status == 401 and audit[2].principal_id is None
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert TOKEN not in logged
    assert "leaked-1" not in logged
    assert json.loads(caplog.records[0].getMessage())["request_id"] == "r1"


async def test_custom_audit_sink_failure_does_not_break_the_response(bus: InMemoryBus) -> None:
    async def broken_sink(record: AuditRecord) -> None:
        raise OSError("sink down")

    async with asgi_client(build_endpoint(bus, audit_sink=broken_sink)) as client:
        assert (await client.get("/status")).status_code == 200


# -- declaration, introspection, mounting -------------------------------------------------------


async def test_commands_are_introspectable(bus: InMemoryBus) -> None:
    endpoint = build_endpoint(bus)
    create = next(c for c in endpoint.commands if c.name == "create_message")
    assert (create.method, create.path, create.body_type, create.response_type) == (
        "POST",
        "/channels/{channel_id}/messages",
        CreateMessage,
        create.response_type,
    )
    assert create.response_type.__name__ == "Message"
    assert create.params == ("channel_id",)
    assert create.rate_limit == "5/5 seconds"
    assert create.summary == "Post a message to a channel."
    schemas = msgspec.json.schema_components([c.body_type for c in endpoint.commands if c.body_type])
    assert "CreateMessage" in schemas[1]


def test_declaration_errors() -> None:
    endpoint = CommandEndpoint(bus=InMemoryBus(), authenticator=StaticTokenAuthenticator({}))

    async def handler(ctx: CommandContext) -> None:
        return None

    endpoint.command("POST", "/a")(handler)
    with pytest.raises(ValueError, match="duplicate command name"):
        endpoint.command("POST", "/b")(handler)
    with pytest.raises(ValueError, match="duplicate route"):
        endpoint.command("POST", "/a", name="other")(handler)
    with pytest.raises(ValueError, match="invalid rate limit"):
        endpoint.command("POST", "/c", name="c", rate_limit="often")(handler)
    with pytest.raises(ValueError, match="unknown path parameters"):
        endpoint.command("POST", "/d/{x}", name="d", channel="{y}")(handler)
    with pytest.raises(ValueError, match="unsupported method"):
        endpoint.command("TRACE", "/e", name="e")(handler)


async def test_mounted_in_starlette_with_lifespan() -> None:
    bus = InMemoryBus()
    endpoint = build_endpoint(bus)
    app = Starlette(routes=[Mount("/api", app=endpoint)], lifespan=lifespan(bus, endpoint))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.post("/api/channels/c/messages", json={"content": "x"}, headers=AUTH)
        assert response.status_code == 200
        assert await event_count(bus, "c") == 1
        assert_error(await client.get("/api/nope", headers=AUTH), 404, "not_found")
    # The lifespan closed the bus.
    with pytest.raises(Exception, match="not running"):
        await bus.publish("c", b"x")


async def test_lifespan_closes_started_components_when_a_later_one_fails() -> None:
    closed: list[str] = []

    class Component:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        async def start(self) -> None:
            if self.fail:
                raise RuntimeError("boom")

        async def close(self) -> None:
            closed.append(self.name)

    run = lifespan(Component("a"), Component("b"), Component("c", fail=True))
    with pytest.raises(RuntimeError, match="boom"):
        async with run(None):
            pass
    assert closed == ["b", "a"]
    with pytest.raises(TypeError):
        lifespan(object())  # type: ignore[arg-type]


async def test_endpoint_runs_its_own_lifespan_as_top_level_app() -> None:
    bus = InMemoryBus()
    endpoint = build_endpoint(bus)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            assert (await bus.publish("c", b"x")).offset == 1

    await endpoint({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_rate_limiter_is_reusable_for_gateway_frames() -> None:
    limiter = RateLimiter()
    decisions = [
        await limiter.hit("session:abc", "3/minute", bucket="gateway", scope="user") for _ in range(4)
    ]
    assert [d.allowed for d in decisions] == [True, True, True, False]


async def test_list_body_mentioning_nonce_is_not_a_nonce() -> None:
    async with InMemoryBus() as bus:
        endpoint = build_endpoint(bus)

        @endpoint.command("POST", "/tags", body=list[str], name="tags")
        async def tags(ctx: CommandContext, body: list[str]) -> dict[str, Any]:
            return {"tags": body, "nonce_seen": ctx.nonce}

        async with asgi_client(endpoint) as client:
            response = await client.post("/tags", json=["nonce", "x"], headers=AUTH)
        assert response.status_code == 200
        assert response.json() == {"tags": ["nonce", "x"], "nonce_seen": None}


async def test_idempotency_store_full_of_in_flight_claims_answers_503_and_runs_nothing() -> None:
    release = anyio.Event()
    entered = anyio.Event()
    runs = 0
    async with InMemoryBus() as bus:
        endpoint = CommandEndpoint(
            bus=bus,
            authenticator=StaticTokenAuthenticator({TOKEN: ALICE}),
            idempotency_store=InMemoryIdempotencyStore(max_entries_per_principal=1),
        )

        @endpoint.command("POST", "/slow/{channel_id}", body=CreateMessage, channel="{channel_id}")
        async def slow(ctx: CommandContext, body: CreateMessage) -> dict[str, Any]:
            nonlocal runs
            runs += 1
            entered.set()
            await release.wait()
            return {"content": body.content}

        async with asgi_client(endpoint) as client:
            results: list[httpx.Response] = []

            async def post() -> None:
                results.append(
                    await client.post("/slow/c", json={"content": "x", "nonce": "a"}, headers=AUTH)
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                with anyio.fail_after(5):
                    await entered.wait()
                second = await client.post("/slow/c", json={"content": "y", "nonce": "b"}, headers=AUTH)
                release.set()
            assert_error(second, 503, "idempotency_store_full")
            assert second.headers["retry-after"] == "1"
            assert [r.status_code for r in results] == [200]
            assert runs == 1
            # The first one completed, so its slot is evictable: the same key now runs.
            again = await client.post("/slow/c", json={"content": "y", "nonce": "b"}, headers=AUTH)
            assert again.status_code == 200 and runs == 2
