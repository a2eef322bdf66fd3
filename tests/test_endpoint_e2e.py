"""End to end: a Starlette app with the endpoint mounted, served by a real uvicorn on an ephemeral
127.0.0.1 port, driven by a real HTTP client."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from splitchat import InMemoryBus, Position, lifespan
from tests.endpoint_support import AUTH, build_endpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client side; the server runs in its own thread and loop


def build_app() -> Starlette:
    bus = InMemoryBus()
    endpoint = build_endpoint(bus, max_body_bytes=8192)

    async def history(request: Request) -> JSONResponse:
        # Read the bus inside the server's own event loop.
        channel = request.path_params["channel"]
        deliveries = await bus.history(channel, Position(bus.epoch, 0))
        return JSONResponse(
            [{"position": str(d.position), "event": json.loads(d.payload)} for d in deliveries]
        )

    return Starlette(
        routes=[Route("/debug/history/{channel}", history), Mount("/api", app=endpoint)],
        lifespan=lifespan(bus, endpoint),
    )


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(), lifespan="on", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
async def http(server_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server_url, timeout=10) as client:
        yield client


async def test_post_over_real_http_publishes_at_returned_position(http: httpx.AsyncClient) -> None:
    response = await http.post("/api/channels/e2e-1/messages", json={"content": "hi"}, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["content"] == "hi"
    position = f"{body['event']['position']['epoch']}:{body['event']['position']['offset']}"
    assert response.headers["x-event-position"] == position
    history = (await http.get("/debug/history/e2e-1")).json()
    assert [h["position"] for h in history] == [position]
    assert history[0]["event"]["id"] == body["event"]["id"] == response.headers["x-event-id"]
    assert history[0]["event"]["data"]["content"] == "hi"


async def test_retry_with_nonce_and_idempotency_key_over_real_http(http: httpx.AsyncClient) -> None:
    payload = {"content": "once", "nonce": "e2e-nonce"}
    first = await http.post("/api/channels/e2e-2/messages", json=payload, headers=AUTH)
    again = await http.post("/api/channels/e2e-2/messages", json=payload, headers=AUTH)
    assert first.content == again.content
    keyed = {**AUTH, "Idempotency-Key": "e2e-key"}
    third = await http.post("/api/channels/e2e-2/messages", json={"content": "k"}, headers=keyed)
    fourth = await http.post("/api/channels/e2e-2/messages", json={"content": "k"}, headers=keyed)
    assert third.content == fourth.content
    history = (await http.get("/debug/history/e2e-2")).json()
    assert len(history) == 2
    assert [h["event"]["nonce"] for h in history] == ["e2e-nonce", "e2e-key"]


async def test_sixth_post_is_429_over_real_http(http: httpx.AsyncClient) -> None:
    statuses = []
    for i in range(6):
        response = await http.post("/api/channels/e2e-3/messages", json={"content": str(i)}, headers=AUTH)
        statuses.append(response.status_code)
    assert statuses == [200] * 5 + [429]
    for name in (
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-reset-after",
        "x-ratelimit-bucket",
        "retry-after",
        "x-ratelimit-scope",
    ):
        assert name in response.headers
    assert 0 < response.json()["retry_after"] <= 5


async def test_chunked_body_over_limit_is_413_and_nothing_published(http: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"content": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    headers = {**AUTH, "content-type": "application/json"}
    response = await http.post("/api/channels/e2e-4/messages", content=chunks(), headers=headers)
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    declared = await http.post(
        "/api/channels/e2e-4/messages", content=b"{" + b" " * 9000 + b"}", headers=headers
    )
    assert declared.status_code == 413
    assert (await http.get("/debug/history/e2e-4")).json() == []


async def test_error_statuses_over_real_http(http: httpx.AsyncClient) -> None:
    assert (await http.post("/api/channels/e2e-5/messages", json={"content": "x"})).status_code == 401
    bad = await http.post(
        "/api/channels/e2e-5/messages", content=b"{", headers={**AUTH, "content-type": "application/json"}
    )
    assert bad.json()["code"] == "invalid_json"
    typed = await http.post("/api/channels/e2e-5/messages", json={"content": 1}, headers=AUTH)
    assert typed.json()["errors"] == {"$.content": "Expected `str`, got `int`"}
    assert (await http.put("/api/channels/e2e-5/messages", headers=AUTH)).headers["allow"] == "POST"
    assert (await http.get("/debug/history/e2e-5")).json() == []
