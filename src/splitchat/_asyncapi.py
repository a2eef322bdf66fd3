"""AsyncAPI 3.0 document of the WebSocket gateway, generated from the protocol's payload Structs.

Pure, like the OpenAPI generator: the frame and payload schemas come from
:mod:`splitchat._payloads` (the types the gateway itself builds its frames from) through
msgspec's JSON Schema generator, and the app's own event types (``{"MESSAGE_CREATE":
MessageObject}``) are added as dispatch messages with their data schema. The document has one
channel (the gateway path) and two operations from the server's point of view: the frames it
*sends* (HELLO, HEARTBEAT_ACK, RECONNECT, INVALID_SESSION and every dispatch) and the frames it
*receives* (HEARTBEAT, IDENTIFY, RESUME, SUBSCRIBE, UNSUBSCRIBE). Close codes are listed under
the ``x-close-codes`` extension, since AsyncAPI has no place for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from . import _payloads as p
from ._protocol_types import RESUMABLE_CLOSES, CloseCode, GatewayConfig

if TYPE_CHECKING:
    from ._gateway import Gateway

__all__ = ("gateway_asyncapi",)

REF = "#/components/schemas/{name}"

# (message key, frame type, summary) of the fixed control frames.
_SERVER_FRAMES: tuple[tuple[str, Any, str], ...] = (
    ("HELLO", p.HelloFrame, "First frame: heartbeat interval and the connection's limits"),
    ("HEARTBEAT_ACK", p.HeartbeatAckFrame, "Answer to a HEARTBEAT"),
    ("HEARTBEAT_REQUEST", p.HeartbeatFrame, "Send a HEARTBEAT now"),
    ("RECONNECT", p.ReconnectFrame, "Reconnect and RESUME (the node is draining)"),
    ("INVALID_SESSION", p.InvalidSessionFrame, "RESUME refused; d says whether it may be retried"),
)
_CLIENT_FRAMES: tuple[tuple[str, Any, str], ...] = (
    ("HEARTBEAT", p.HeartbeatFrame, "Keep the connection alive; d is the last s received"),
    ("IDENTIFY", p.IdentifyFrame, "Authenticate and open a new session"),
    ("RESUME", p.ResumeFrame, "Reattach to a session and replay what was missed"),
    ("SUBSCRIBE", p.SubscribeFrame, "Add channels to the session"),
    ("UNSUBSCRIBE", p.UnsubscribeFrame, "Remove channels from the session"),
)
# (dispatch type t, data type, carries a bus event's id/channel, summary) made by the gateway.
_GATEWAY_DISPATCHES: tuple[tuple[str, Any, bool, str], ...] = (
    ("READY", p.ReadyPayload, False, "The session is open (s = 1)"),
    ("RESUMED", p.ResumedPayload, False, "The replay after a RESUME is complete"),
    ("SUBSCRIBED", p.SubscribedPayload, False, "Answer to SUBSCRIBE"),
    ("UNSUBSCRIBED", p.UnsubscribedPayload, False, "Answer to UNSUBSCRIBE"),
    ("RATE_LIMITED", p.RateLimitedPayload, False, "A client frame over the frame budget was dropped"),
    ("PRESENCE_UPDATE", p.PresenceUpdatePayload, True, "A user came online / went offline in a channel"),
)
_CLOSE_CODES = {
    CloseCode.UNKNOWN_ERROR: "unknown error",
    CloseCode.UNKNOWN_OPCODE: "unknown opcode",
    CloseCode.DECODE_ERROR: "decode error or frame too large",
    CloseCode.NOT_AUTHENTICATED: "a frame before IDENTIFY/RESUME, or identify timeout",
    CloseCode.AUTHENTICATION_FAILED: "authentication failed: do not reconnect with this token",
    CloseCode.ALREADY_AUTHENTICATED: "IDENTIFY/RESUME sent twice",
    CloseCode.INVALID_SEQ: "invalid seq: IDENTIFY anew, do not RESUME",
    CloseCode.RATE_LIMITED: "frame budget exceeded twice over",
    CloseCode.SESSION_TIMED_OUT: "no heartbeat within 1.5 x interval",
    CloseCode.SLOW_CONSUMER: "the client did not read fast enough",
}


def _dispatch_frame(t: str, data: dict[str, Any], bus_event: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "op": {"const": 0},
        "t": {"const": t},
        "s": {"type": "integer", "minimum": 1, "description": "Per-session sequence number"},
        "d": data,
    }
    required = ["op", "t", "s", "d"]
    if bus_event:
        properties["id"] = {"type": "string", "description": "Stable event id (same on every node)"}
        properties["channel"] = {"type": "string", "description": "The channel the event was published to"}
        properties["nonce"] = {"type": "string", "description": "The nonce of the command that published it"}
        required += ["id", "channel"]
    return {"type": "object", "required": required, "properties": properties}


def gateway_asyncapi(
    gateway: Gateway | None = None,
    *,
    events: Mapping[str, Any] | None = None,
    title: str = "splitchat gateway",
    version: str = "1.0.0",
    description: str | None = None,
    host: str = "localhost:8000",
    pathname: str = "/gateway",
    protocol: str = "ws",
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document (a JSON-ready dict) of the gateway protocol.

    Args:
        gateway: the gateway whose limits fill in HELLO's documented values (defaults otherwise).
        events: the app's dispatch types: ``{"MESSAGE_CREATE": MessageObject, ...}`` (any
            msgspec-encodable type; ``Any`` for an undocumented shape).
        title, version, description: the document's ``info``.
        host, pathname, protocol: the server the gateway listens on (``ws`` or ``wss``).
    """
    config = gateway.config if gateway is not None else GatewayConfig()
    app_events = dict(events or {})
    clash = set(app_events) & {t for t, *_ in _GATEWAY_DISPATCHES}
    if clash:
        raise ValueError(f"event types {sorted(clash)} are reserved by the gateway")
    types: list[Any] = [frame for _, frame, _ in (*_SERVER_FRAMES, *_CLIENT_FRAMES)]
    types += [data for _, data, _, _ in _GATEWAY_DISPATCHES]
    types += list(app_events.values())
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    frame_schemas = schemas[: len(_SERVER_FRAMES) + len(_CLIENT_FRAMES)]
    data_schemas = schemas[len(frame_schemas) :]

    messages: dict[str, Any] = {}
    server_messages: list[str] = []
    client_messages: list[str] = []
    for (key, _, summary), schema in zip((*_SERVER_FRAMES, *_CLIENT_FRAMES), frame_schemas, strict=True):
        if key == "HEARTBEAT_REQUEST":
            schema = {**schema, "description": "The server asks for an immediate HEARTBEAT (d is null)"}
        messages[key] = {"name": key, "title": key, "summary": summary, "payload": schema}
        (server_messages if any(key == k for k, _, _ in _SERVER_FRAMES) else client_messages).append(key)
    dispatches = [(t, bus, summary) for t, _, bus, summary in _GATEWAY_DISPATCHES]
    dispatches += [(t, True, f"Application event {t}") for t in app_events]
    for (t, bus_event, summary), data in zip(dispatches, data_schemas, strict=True):
        key = f"DISPATCH_{t}"
        messages[key] = {
            "name": t,
            "title": f"DISPATCH {t}",
            "summary": summary,
            "payload": _dispatch_frame(t, data, bus_event),
        }
        server_messages.append(key)

    hello = config.hello()
    channel_ref = {"$ref": "#/channels/gateway"}
    info: dict[str, Any] = {"title": title, "version": version}
    info["description"] = description or (
        "POST-in / WebSocket-out: actions go in over HTTP, events come out over this WebSocket. "
        "Every frame is {op, d, s, t}; s and t are set only on op 0 (DISPATCH). "
        f"This server's HELLO: heartbeat_interval={hello.heartbeat_interval} ms, "
        f"max_frame_bytes={hello.max_frame_bytes}, frame_budget={hello.frame_budget} per "
        f"{hello.frame_budget_window} ms, resume_window={hello.resume_window} ms."
    )
    return {
        "asyncapi": "3.0.0",
        "info": info,
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": host,
                "protocol": protocol,
                "pathname": pathname,
                "description": "?encoding=json (text frames, default) or ?encoding=msgpack (binary frames)",
            }
        },
        "channels": {
            "gateway": {
                "address": pathname,
                "title": "Gateway connection",
                "messages": {key: {"$ref": f"#/components/messages/{key}"} for key in messages},
                "bindings": {
                    "ws": {
                        "query": {
                            "type": "object",
                            "properties": {"encoding": {"type": "string", "enum": ["json", "msgpack"]}},
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
            }
        },
        "operations": {
            "sendServerFrames": {
                "action": "send",
                "title": "Frames the gateway sends",
                "channel": channel_ref,
                "messages": [{"$ref": f"#/channels/gateway/messages/{key}"} for key in server_messages],
            },
            "receiveClientFrames": {
                "action": "receive",
                "title": "Frames the gateway accepts",
                "channel": channel_ref,
                "messages": [{"$ref": f"#/channels/gateway/messages/{key}"} for key in client_messages],
            },
        },
        "components": {"schemas": components, "messages": messages},
        "x-close-codes": {
            str(int(code)): {"name": code.name, "meaning": meaning, "resumable": code in RESUMABLE_CLOSES}
            for code, meaning in _CLOSE_CODES.items()
        },
    }
