"""Peer: Starlette + uvicorn + encode/broadcaster (memory backend), the FastAPI-tutorial way.

Each WebSocket subscribes to its channel with ``broadcast.subscribe`` (one unbounded asyncio.Queue
per subscriber inside broadcaster) and forwards every event; a receive task notices the disconnect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ._common import BUS_URL, CHANNEL_PATH, outgoing, run, serve_asgi

# broadcaster 0.3 loses subscribers when several subscribe to a *new* channel concurrently over a
# networked backend (Broadcast.subscribe awaits the backend between its check and its insert, so
# the later ones overwrite the set): serialise subscribing. Uncontended and free with memory://.
subscribe_lock = asyncio.Lock()
broadcast = Broadcast(BUS_URL or "memory://")  # redis:// in the two-node scenario


async def post_message(request: Request) -> JSONResponse:
    channel = request.path_params["channel"]
    try:
        payload = await request.json()
    except json.JSONDecodeError:
        return JSONResponse({"code": "invalid_json"}, status_code=400)
    await broadcast.publish(channel=channel, message=outgoing(channel, payload))
    return JSONResponse({"ok": True})


async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    channel = websocket.query_params.get("channel", "bench")
    async with AsyncExitStack() as stack:
        async with subscribe_lock:
            subscriber = await stack.enter_async_context(broadcast.subscribe(channel=channel))
        await websocket.send_text('{"t":"READY"}')
        async with anyio.create_task_group() as tg:

            async def receiver() -> None:
                async for _ in websocket.iter_text():
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(receiver)
            async for event in subscriber:  # type: ignore[union-attr]
                await websocket.send_text(event.message)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    try:
        # broadcaster 0.3's Redis backend wakes its pub/sub listener *before* SUBSCRIBE completes;
        # redis-py's listen() then sees no subscription and returns, and the listener sleeps
        # until the next *new* channel: with one channel nothing is ever delivered. Holding a
        # subscription for the app's lifetime keeps the listener alive. No-op for memory://.
        async with broadcast.subscribe(channel="_keepalive"):
            yield
    finally:
        await broadcast.disconnect()


app = Starlette(
    routes=[
        Route(CHANNEL_PATH.replace("{channel}", "{channel:str}"), post_message, methods=["POST"]),
        WebSocketRoute("/ws", websocket_endpoint),
    ],
    lifespan=lifespan,
)

if __name__ == "__main__":
    run(serve_asgi(app, ws_path="/ws", post_path=CHANNEL_PATH, dialect="plain"))
