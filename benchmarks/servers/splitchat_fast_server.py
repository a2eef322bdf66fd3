"""Contender: splitchat with its gateway on the fast path (:class:`splitchat.GatewayServer`).

The same application as ``splitchat_server`` (same command endpoint, bus, gateway object, same
uvicorn settings for HTTP), but clients connect to the gateway through ``GatewayServer``: the
built-in asyncio-Protocol WebSocket server, on its own port in the same process and event loop.
"""

from __future__ import annotations

import socket

from splitchat import GatewayServer

from ._common import run, serve_asgi
from .splitchat_server import SERVE_INFO, UVICORN_OPTIONS, app, gateway

_servers: list[GatewayServer] = []


async def start_gateway_server(sock: socket.socket) -> None:
    server = GatewayServer(gateway, sock=sock, backlog=4096)
    await server.start()
    _servers.append(server)  # lives as long as the process


if __name__ == "__main__":
    run(serve_asgi(app, UVICORN_OPTIONS, start_gateway_server, **SERVE_INFO))
