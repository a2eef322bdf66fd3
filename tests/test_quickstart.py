"""The quickstart snippet in docs/quickstart.md, executed verbatim and driven over ASGI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from splitchat import Position, decode_event
from tests.endpoint_support import asgi_client

DOC = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"


def load_snippet() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1
    namespace: dict[str, Any] = {"__name__": "quickstart"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
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
