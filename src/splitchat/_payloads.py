"""Typed payloads (``d``) and frames of the gateway protocol, as msgspec Structs.

The gateway builds its own outgoing payloads from these Structs (HELLO, READY, RESUMED,
SUBSCRIBED, UNSUBSCRIBED, RATE_LIMITED, PRESENCE_UPDATE), so the AsyncAPI document generated
from them (:mod:`splitchat._asyncapi`) describes exactly what goes on the wire. Field order and
names equal the dicts they replaced: msgspec encodes a Struct as the same JSON object / msgpack
map, so the wire format is unchanged.

Client payloads (IDENTIFY, RESUME, SUBSCRIBE, UNSUBSCRIBE) are still checked by the sans-I/O
machine field by field (it must close with precise codes and never raise on a hostile frame);
the Structs here describe what it accepts, and a test checks both agree.

The ``*Frame`` Structs are the complete frames ``{"op", "d", "s", "t"}`` per opcode: documentation
types only (frames are rendered by :mod:`splitchat._frames`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = (
    "HelloPayload",
    "IdentifyPayload",
    "PresenceUpdatePayload",
    "RateLimitedPayload",
    "ReadyPayload",
    "ResumePayload",
    "ResumedPayload",
    "ChannelsPayload",
    "SubscribedPayload",
    "UnsubscribedPayload",
)

# Any string: a name over the limits advertised in HELLO (``max_channel_length``) is refused in
# ``denied``, not rejected, and so is every channel beyond ``max_channels``.
Channel = str
Milliseconds = Annotated[int, msgspec.Meta(ge=0)]


# ---- server -> client payloads ------------------------------------------------------------------


class HelloPayload(msgspec.Struct, gc=False):
    """HELLO (op 10) ``d``: the connection's limits; every duration in milliseconds."""

    heartbeat_interval: Milliseconds
    max_frame_bytes: int
    frame_budget: int
    frame_budget_window: Milliseconds
    resume_window: Milliseconds
    identify_timeout: Milliseconds  # IDENTIFY/RESUME within this of HELLO or INVALID_SESSION
    max_channels: int  # channels per session; more are answered in ``denied``
    max_channel_length: int  # longest channel name; longer ones are answered in ``denied``


class ReadyPayload(msgspec.Struct):
    """READY ``d`` (``s`` = 1): the new session and the subscriptions granted / denied."""

    session_id: str
    resume_gateway_url: str | None
    user: dict[str, Any]
    subscriptions: list[str]
    denied: list[str]


class ResumedPayload(msgspec.Struct, gc=False, omit_defaults=True):
    """RESUMED ``d``: how many missed dispatches were replayed, how many ephemeral ones skipped.

    ``duplicates_possible`` is present (true) only after a resume from a crash checkpoint: events
    between the checkpoint and the client's seq are sent again, and clients drop them by event id.
    """

    replayed: int
    skipped_ephemeral: int
    duplicates_possible: bool = False


class SubscribedPayload(msgspec.Struct):
    """SUBSCRIBED ``d``: the answer to SUBSCRIBE (op 12)."""

    granted: list[str]
    denied: list[str]


class UnsubscribedPayload(msgspec.Struct):
    """UNSUBSCRIBED ``d``: the channels actually left."""

    channels: list[str]


class RateLimitedPayload(msgspec.Struct, gc=False):
    """RATE_LIMITED ``d``: a client frame over budget was dropped; retry after ``retry_after`` s."""

    retry_after: float
    op: int


class PresenceUpdatePayload(msgspec.Struct):
    """PRESENCE_UPDATE ``d``: a user's first connection joined or last one left the channel."""

    channel: str
    user: dict[str, Any]
    status: Literal["online", "offline"]


# ---- client -> server payloads ------------------------------------------------------------------


class IdentifyPayload(msgspec.Struct):
    """IDENTIFY (op 2) ``d``: authenticate and open a new session."""

    token: str
    subscriptions: list[Channel] = []
    properties: dict[str, Any] = {}

    def __repr__(self) -> str:  # never the token (logs, tracebacks)
        return f"IdentifyPayload(token=<redacted>, subscriptions={self.subscriptions!r})"


class ResumePayload(msgspec.Struct):
    """RESUME (op 6) ``d``: reattach to ``session_id`` and replay every dispatch after ``seq``."""

    token: str
    session_id: str
    seq: Annotated[int, msgspec.Meta(ge=0)]

    def __repr__(self) -> str:  # never the token (logs, tracebacks)
        return f"ResumePayload(token=<redacted>, session_id={self.session_id!r}, seq={self.seq!r})"


class ChannelsPayload(msgspec.Struct):
    """SUBSCRIBE (op 12) / UNSUBSCRIBE (op 13) ``d``."""

    channels: list[Channel]


# ---- whole frames (documentation) -----------------------------------------------------------------


class HelloFrame(msgspec.Struct):
    """Op 10 HELLO: the first frame the server sends."""

    op: Literal[10]
    d: HelloPayload
    s: None = None
    t: None = None


class HeartbeatFrame(msgspec.Struct):
    """Op 1 HEARTBEAT. From the client: ``d`` is the last ``s`` received (or null). From the
    server: "send a heartbeat now" (``d`` null)."""

    op: Literal[1]
    d: int | None = None


class HeartbeatAckFrame(msgspec.Struct):
    """Op 11 HEARTBEAT_ACK."""

    op: Literal[11]
    d: None = None
    s: None = None
    t: None = None


class IdentifyFrame(msgspec.Struct):
    """Op 2 IDENTIFY."""

    op: Literal[2]
    d: IdentifyPayload


class ResumeFrame(msgspec.Struct):
    """Op 6 RESUME."""

    op: Literal[6]
    d: ResumePayload


class SubscribeFrame(msgspec.Struct):
    """Op 12 SUBSCRIBE."""

    op: Literal[12]
    d: ChannelsPayload


class UnsubscribeFrame(msgspec.Struct):
    """Op 13 UNSUBSCRIBE."""

    op: Literal[13]
    d: ChannelsPayload


class ReconnectFrame(msgspec.Struct):
    """Op 7 RECONNECT: reconnect and RESUME (the server is draining)."""

    op: Literal[7]
    d: None = None
    s: None = None
    t: None = None


class InvalidSessionFrame(msgspec.Struct):
    """Op 9 INVALID_SESSION: ``d`` says whether RESUME may be retried; otherwise IDENTIFY anew."""

    op: Literal[9]
    d: bool
    s: None = None
    t: None = None
