"""Hypothesis over the endpoint's decoder and error paths: arbitrary bodies, headers and content
types never produce a 500, and nothing reaches the bus unless the command succeeded."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from splitchat import InMemoryBus
from tests.endpoint_support import AUTH, TOKEN, asgi_client, build_endpoint

BACKENDS = ["asyncio", "trio"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "content": st.one_of(st.text(max_size=30), st.integers(), st.none()),
        "nonce": st.one_of(
            st.text(max_size=70), st.integers(), st.floats(), st.lists(st.integers(), max_size=2)
        ),
        "tts": st.one_of(st.booleans(), st.text(max_size=3)),
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    message_like.map(lambda v: json.dumps(v).encode()),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "application/x+json"]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=80)
paths = st.sampled_from(
    [
        "/channels/c/messages",
        "/channels/c/messages/1",
        "/channels/c/typing",
        "/status",
        "/nope",
        "/channels//messages",
    ]
)
methods = st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "OPTIONS", "HEAD"])


def run_request(
    backend: str, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, Any, int]:
    """One request against a fresh endpoint; returns (status, parsed body or None, events on the bus)."""

    async def go() -> tuple[int, Any, int]:
        async with InMemoryBus() as bus:
            endpoint = build_endpoint(bus, global_rate_limit=None, invalid_request_limit=None)
            async with asgi_client(endpoint) as client:
                raw_headers = {name: value.encode("latin-1") for name, value in headers.items()}
                response = await client.request(method, path, headers=raw_headers, content=body)
            events = (await bus.current_position("c")).offset
            parsed = response.json() if response.content else None
            return response.status_code, parsed, events

    return anyio.run(go, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(body=bodies, content_type=content_types)
def test_arbitrary_bodies_never_500_and_publish_only_on_success(
    backend: str, body: bytes, content_type: str | None
) -> None:
    headers = dict(AUTH)
    if content_type is not None:
        headers["content-type"] = content_type
    status, parsed, events = run_request(backend, "POST", "/channels/c/messages", headers, body)
    assert status != 500
    assert status in (200, 400, 413, 415), status
    if status == 200:
        assert events == 1
        assert parsed["event"]["position"]["offset"] == 1
    else:
        assert events == 0
        assert set(parsed) == {"code", "message", "errors"}


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(
    method=methods,
    path=paths,
    extra=st.dictionaries(
        st.sampled_from(
            ["authorization", "content-type", "content-length", "idempotency-key", "x-request-id"]
        ),
        header_text,
        max_size=5,
    ),
    body=bodies,
)
def test_arbitrary_headers_never_500_and_never_publish_without_valid_token(
    backend: str, method: str, path: str, extra: dict[str, str], body: bytes
) -> None:
    headers = {k: v for k, v in extra.items() if k != "content-length" or v.strip().isdigit()}
    if TOKEN in headers.get("authorization", ""):
        headers.pop("authorization")
    status, parsed, events = run_request(backend, method, path, headers, body)
    assert status < 500
    assert events == 0
    if status == 200:
        assert path == "/status"  # the only public command
    elif parsed is not None and status != 429:
        assert set(parsed) == {"code", "message", "errors"}
