"""The samples of docs/quickstart.md, executed verbatim.

The first block (the command endpoint) is driven over ASGI; the second (step 5: "replace the
last line of qs.py with this") is appended to the first without its ``app = ...`` line, exactly
as the page tells a reader to do, and served by a real uvicorn server started with the options
of the page's command line; the block's own ``main()`` then receives its event over the gateway.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import uvicorn

from splitchat import Position, decode_event
from tests.endpoint_support import asgi_client

DOC = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 2
    return blocks


def load_snippet() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "quickstart"}
    exec(compile(python_blocks()[0], str(DOC), "exec"), namespace)
    return namespace


def load_gateway_snippet() -> dict[str, Any]:
    first, second = python_blocks()
    lines = first.rstrip("\n").split("\n")
    assert lines[-1].startswith("app = "), "step 5 replaces the first block's last line"
    source = "\n".join(lines[:-1]) + "\n" + second
    namespace: dict[str, Any] = {"__name__": "qs"}  # not __main__: anyio.run(main) is not run on import
    exec(compile(source, str(DOC), "exec"), namespace)
    return namespace


async def test_quickstart_snippet_runs_as_documented() -> None:
    ns = load_snippet()
    app, bus = ns["app"], ns["bus"]
    headers = {"Authorization": "Bearer s3cret"}
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        payload = {"content": "hi", "nonce": "n1"}
        first = await client.post("/api/channels/general/messages", json=payload, headers=headers)
        again = await client.post("/api/channels/general/messages", json=payload, headers=headers)
        assert first.status_code == 200
        body = first.json()
        assert set(body) == {"id", "content", "author", "event", "nonce"}
        assert body["author"] == {"id": "1", "name": "ada"}
        assert body["nonce"] == "n1"
        assert again.content == first.content
        history = await bus.history("general", Position(bus.epoch, 0))
        assert len(history) == 1
        assert decode_event(history[0].payload).id == body["event"]["id"]
        assert (await client.post("/api/channels/general/messages", json=payload)).status_code == 401
        # What the page says of a request without Content-Type: application/json.
        raw = await client.post(
            "/api/channels/general/messages", content=b'{"content": "hi"}', headers=headers
        )
        assert raw.status_code == 415
        assert raw.json()["code"] == "unsupported_media_type"


@contextmanager
def serve_as_documented(app: Any) -> Iterator[str]:
    """``uvicorn qs:app --ws websockets-sansio --ws-per-message-deflate false`` on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, ws="websockets-sansio", ws_per_message_deflate=False, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    try:
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_quickstart_gateway_snippet_receives_its_event() -> None:
    ns = load_gateway_snippet()
    with serve_as_documented(ns["app"]) as url:

        async def run() -> dict[str, Any]:
            with anyio.fail_after(20):
                result: dict[str, Any] = await ns["main"](url)
                return result

        message = anyio.run(run, backend="asyncio")
    assert message["content"] == "hello"
    # main() returns only the MESSAGE_CREATE dispatch carrying its own send's nonce: the event
    # went endpoint -> bus -> gateway -> client.
    assert message["author"] == {"id": "1", "name": "ada"}
