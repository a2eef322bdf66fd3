"""Peer: python-socketio's ASGI server on uvicorn, with the POST route in a Starlette app beside it.

Clients join the room named by their ``channel`` query parameter in the ``connect`` handler; a
POST emits ``MESSAGE_CREATE`` to that room (socket.io encodes and queues the packet per client).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ._common import BUS_URL, CHANNEL_PATH, run, serve_asgi

# Two-node scenario: socket.io's own Redis pub/sub client manager carries emits between nodes.
manager = socketio.AsyncRedisManager(BUS_URL) if BUS_URL else None
sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"], client_manager=manager)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
    channel = parse_qs(environ.get("QUERY_STRING", "")).get("channel", ["bench"])[0]
    await sio.enter_room(sid, channel)


async def post_message(request: Request) -> JSONResponse:
    channel = request.path_params["channel"]
    try:
        payload = await request.json()
    except json.JSONDecodeError:
        return JSONResponse({"code": "invalid_json"}, status_code=400)
    await sio.emit("MESSAGE_CREATE", payload, room=channel)
    return JSONResponse({"ok": True})


http_app = Starlette(
    routes=[Route(CHANNEL_PATH.replace("{channel}", "{channel:str}"), post_message, methods=["POST"])]
)
app = socketio.ASGIApp(sio, other_asgi_app=http_app)

if __name__ == "__main__":
    run(serve_asgi(app, post_path=CHANNEL_PATH, dialect="socketio"))
