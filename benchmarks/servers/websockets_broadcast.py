"""Reference peer: the ``websockets`` library server with ``websockets.broadcast()``.

The WebSocket side is textbook websockets (a set of connections per channel, ``broadcast`` writes
the frame to every transport synchronously, no backpressure). websockets cannot take a POST with a
body (its handshake parser accepts GET only), so the POST side is a minimal HTTP/1.1 keep-alive
server on asyncio streams in the same process and event loop: it is cheaper than Starlette, which
favours this reference, never the contenders measured against it.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve

from ._common import CHANNEL_PATH, HOST, announce, outgoing, run

CHANNELS: defaultdict[str, set[ServerConnection]] = defaultdict(set)


async def websocket_handler(websocket: ServerConnection) -> None:
    query = parse_qs(urlsplit(websocket.request.path if websocket.request else "").query)
    channel = query.get("channel", ["bench"])[0]
    subscribers = CHANNELS[channel]
    subscribers.add(websocket)
    try:
        await websocket.send('{"t":"READY"}')
        async for _ in websocket:  # clients send nothing; keep reading so close frames are seen
            pass
    finally:
        subscribers.discard(websocket)


async def http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            parts = path.split("/")  # /channels/<channel>/messages
            if method == "POST" and len(parts) == 4 and parts[1] == "channels" and parts[3] == "messages":
                try:
                    payload = json.loads(body)
                except ValueError:
                    status, response = "400 Bad Request", b'{"code":"invalid_json"}'
                else:
                    broadcast(CHANNELS.get(parts[2], ()), outgoing(parts[2], payload))
                    status, response = "200 OK", b'{"ok":true}'
            else:
                status, response = "404 Not Found", b'{"code":"not_found"}'
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(response)}\r\n\r\n".encode()
                + response
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    http = await asyncio.start_server(http_handler, HOST, 0, backlog=4096)
    async with serve(websocket_handler, HOST, 0, backlog=4096, compression=None, max_queue=16) as ws:
        ws_port = next(iter(ws.sockets)).getsockname()[1]
        http_port = http.sockets[0].getsockname()[1]
        announce(ws_port=ws_port, http_port=http_port, ws_path="/ws", post_path=CHANNEL_PATH, dialect="plain")
        await ws.serve_forever()


if __name__ == "__main__":
    run(main())
