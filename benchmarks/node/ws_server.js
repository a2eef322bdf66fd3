// Optional peer: Node's `ws` library, the non-Python baseline. Same contract as the Python peers:
// POST /channels/<channel>/messages -> one JSON message to every subscriber of ?channel=<channel>
// on /ws, after a {"t":"READY"} once subscribed. Prints `READY {json}` when listening.
"use strict";
const http = require("node:http");
const { WebSocketServer } = require("ws");

const channels = new Map(); // channel -> Set<WebSocket>
const server = http.createServer((req, res) => {
  const parts = req.url.split("/"); // /channels/<channel>/messages
  if (req.method !== "POST" || parts.length !== 4 || parts[1] !== "channels" || parts[3] !== "messages") {
    res.writeHead(404, { "content-type": "application/json" }).end('{"code":"not_found"}');
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    let payload;
    try {
      payload = JSON.parse(Buffer.concat(chunks).toString());
    } catch {
      res.writeHead(400, { "content-type": "application/json" }).end('{"code":"invalid_json"}');
      return;
    }
    const message = JSON.stringify({ t: "MESSAGE_CREATE", channel: parts[2], d: payload });
    for (const client of channels.get(parts[2]) ?? []) client.send(message); // ws docs' broadcast idiom
    res.writeHead(200, { "content-type": "application/json" }).end('{"ok":true}');
  });
});

const wss = new WebSocketServer({ server, path: "/ws", perMessageDeflate: false });
wss.on("connection", (ws, req) => {
  const channel = new URL(req.url, "http://x").searchParams.get("channel") ?? "bench";
  if (!channels.has(channel)) channels.set(channel, new Set());
  channels.get(channel).add(ws);
  ws.on("close", () => channels.get(channel).delete(ws));
  ws.on("error", () => {});
  ws.send('{"t":"READY"}');
});

server.listen({ host: "127.0.0.1", port: 0, backlog: 4096 }, () => {
  const port = server.address().port;
  const info = { ws_port: port, http_port: port, ws_path: "/ws", post_path: "/channels/{channel}/messages", dialect: "plain" };
  process.stdout.write("READY " + JSON.stringify(info) + "\n");
});
process.on("SIGTERM", () => process.exit(0));
