"""What every contender server shares: the loopback socket, the READY announcement, the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from benchmarks._proc import raise_fd_limit

HOST = "127.0.0.1"
BUS_URL = os.environ.get("SPLITCHAT_BENCH_BUS", "")
"""Cross-node bus for the ``redis`` scenario (``redis://...``); empty: each contender's in-process default."""
CHANNEL_PATH = "/channels/{channel}/messages"
"""Every contender takes the same POST: ``/channels/<channel>/messages`` with the same JSON body."""


def outgoing(channel: str, body: Any) -> str:
    """The message the plain peers fan out for one POST (encoded once, sent to every subscriber)."""
    return json.dumps({"t": "MESSAGE_CREATE", "channel": channel, "d": body})


def listening_socket() -> socket.socket:
    """A TCP socket bound to an ephemeral loopback port (the OS picks; no port races)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def announce(**info: Any) -> None:
    """Tell the harness where to connect (one line on stdout)."""
    sys.stdout.write("READY " + json.dumps(info) + "\n")
    sys.stdout.flush()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a server coroutine on uvloop when installed (every contender alike), else asyncio."""
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve_asgi(
    app: Any,
    uvicorn_options: dict[str, Any] | None = None,
    gateway_server: Callable[[socket.socket], Awaitable[Any]] | None = None,
    **info: Any,
) -> None:
    """Serve an ASGI app with uvicorn (defaults: httptools, websockets) on one loopback socket.

    ``uvicorn_options`` override uvicorn's defaults (splitchat passes its documented settings);
    ``gateway_server``, when given, is started (after the app's lifespan) on a second socket that
    is announced as the WebSocket port (splitchat's fast path).
    """
    import uvicorn

    sock = listening_socket()
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="auto", **(uvicorn_options or {})
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            return
        await asyncio.sleep(0.01)
    port = sock.getsockname()[1]
    ws_port = port
    if gateway_server is not None:
        ws_sock = listening_socket()
        await gateway_server(ws_sock)
        ws_port = ws_sock.getsockname()[1]
    announce(ws_port=ws_port, http_port=port, **info)
    await task
