"""The command send path: idempotent retries (same key every attempt), hints, bounds, typed errors."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from splitchat.client import CommandError, CommandFailed, RetryPolicy, SplitchatClient
from splitchat.client._backoff import FullJitterBackoff
from splitchat.client._commands import retry_hint, send_command


class ScriptedServer:
    """Answers each request with the next scripted reply; records every Idempotency-Key it saw."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.keys: list[str | None] = []
        self.auth: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("Idempotency-Key"))
        self.auth.append(request.headers.get("Authorization"))
        reply = self.script.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def ok_response() -> httpx.Response:
    body = {
        "id": "m1",
        "event": {
            "id": "42",
            "type": "MESSAGE_CREATE",
            "channel": "room:1",
            "position": {"epoch": "e1", "offset": 7},
        },
        "nonce": "k",
    }
    return httpx.Response(200, json=body, headers={"X-Event-Id": "42", "X-Event-Position": "e1:7"})


def client_for(server: ScriptedServer, **policy: Any) -> SplitchatClient:
    policy.setdefault("min_delay", 0.01)
    policy.setdefault("max_delay", 0.02)
    return SplitchatClient(
        "http://testserver",
        token="tok",
        gateway=False,
        retry=RetryPolicy(**policy),
        http_transport=httpx.MockTransport(server),
        rng=random.Random(1),
    )


async def test_network_errors_5xx_and_429_are_retried_with_the_same_key() -> None:
    server = ScriptedServer(
        [
            httpx.ConnectError("refused"),
            httpx.ReadTimeout("lost response"),
            httpx.Response(503, json={"code": "unavailable", "message": "bus down"}),
            httpx.Response(
                429,
                json={"message": "slow down", "retry_after": 0.05, "global": False},
                headers={"X-RateLimit-Reset-After": "0.05"},
            ),
            ok_response(),
        ]
    )
    async with client_for(server) as client:
        receipt = await client.send("POST", "/channels/room:1/messages", {"content": "hi"})
    assert receipt.attempts == 5 and receipt.status == 200
    assert receipt.event is not None and receipt.event.id == "42"
    assert receipt.event.position is not None and str(receipt.event.position) == "e1:7"
    assert len(set(server.keys)) == 1 and server.keys[0] == receipt.nonce
    assert server.auth == ["Bearer tok"] * 5


async def test_nonce_from_argument_or_body_is_the_idempotency_key() -> None:
    server = ScriptedServer([ok_response(), ok_response()])
    async with client_for(server) as client:
        assert (await client.send("POST", "/x", {"a": 1}, nonce="given")).nonce == "given"
        assert (await client.send("POST", "/x", {"nonce": "in-body"})).nonce == "in-body"
    assert server.keys == ["given", "in-body"]


async def test_retry_hint_waits_exactly_the_precise_body_value() -> None:
    server = ScriptedServer(
        [
            httpx.Response(
                429, json={"retry_after": 0.3}, headers={"Retry-After": "1", "X-RateLimit-Reset-After": "0.5"}
            ),
            httpx.Response(503, headers={"Retry-After": "2", "X-RateLimit-Reset-After": "0.7"}),
            httpx.Response(503, headers={"Retry-After": "4"}),
            httpx.Response(429, json={"retry_after": 3600.0}),
            ok_response(),
        ]
    )
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async with httpx.AsyncClient(transport=httpx.MockTransport(server), base_url="http://t") as http:
        receipt = await send_command(
            http,
            "POST",
            "/x",
            {},
            policy=RetryPolicy(max_retry_after=10.0, deadline=1e6),
            backoff=FullJitterBackoff(0.01, 0.02, rng=random.Random(1)),
            sleep=fake_sleep,
        )
    assert receipt.attempts == 5
    # body retry_after, else X-RateLimit-Reset-After, else Retry-After; capped at max_retry_after.
    assert slept == [0.3, 0.7, 4.0, 10.0]


def _response(body: object, headers: dict[str, str]) -> httpx.Response:
    return httpx.Response(429, json=body, headers=headers)


def test_retry_hint_rule() -> None:
    assert (
        retry_hint(_response({"retry_after": 0.25}, {"Retry-After": "1"}), {"retry_after": 0.25}, 60) == 0.25
    )
    assert retry_hint(_response({}, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), {}, 60) is None
    assert retry_hint(_response({}, {"X-RateLimit-Reset-After": "nan", "Retry-After": "3"}), {}, 60) == 3.0
    assert retry_hint(_response({"retry_after": True}, {}), {"retry_after": True}, 60) is None
    assert retry_hint(_response({"retry_after": -1}, {"Retry-After": "2"}), {"retry_after": -1}, 60) == 2.0


async def test_non_retryable_4xx_raises_typed_error_with_body() -> None:
    body = {"code": "invalid_body", "message": "Bad", "errors": {"$.content": "required"}}
    server = ScriptedServer([httpx.Response(400, json=body)])
    async with client_for(server) as client:
        with pytest.raises(CommandError) as info:
            await client.send("POST", "/x", {})
    assert (info.value.status, info.value.code, info.value.errors) == (
        400,
        "invalid_body",
        {"$.content": "required"},
    )
    assert len(server.keys) == 1


async def test_attempts_and_deadline_bound_the_retries() -> None:
    server = ScriptedServer([httpx.Response(500)] * 3)
    async with client_for(server, max_attempts=3) as client:
        with pytest.raises(CommandFailed) as info:
            await client.send("POST", "/x", {})
    assert info.value.attempts == 3 and info.value.last_status == 500 and len(set(server.keys)) == 1

    server = ScriptedServer([httpx.Response(429, json={"retry_after": 5.0})] * 3)
    async with client_for(server, deadline=1.0) as client:
        with pytest.raises(CommandFailed) as info:
            await client.send("POST", "/x", {})
    assert info.value.attempts == 1  # waiting 5 s would cross the 1 s deadline: fail now
