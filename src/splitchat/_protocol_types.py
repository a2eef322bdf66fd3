"""The gateway protocol's vocabulary: opcodes, close codes, connection states, limits, and the
actions the sans-I/O machine (:mod:`splitchat._protocol`) asks its I/O layer to perform.

Plain values only (no behaviour beyond :meth:`GatewayConfig.hello`), so the machine, the session
state, the I/O adapters and the API documents share one definition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._payloads import HelloPayload

__all__ = (
    "RESUMABLE_CLOSES",
    "Action",
    "Authenticate",
    "AuthorizeChannels",
    "Checkpoint",
    "Close",
    "CloseCode",
    "ConnectionState",
    "GatewayConfig",
    "Op",
    "ResumeLookup",
    "Subscribe",
    "Unsubscribe",
)


class Op(enum.IntEnum):
    """Gateway opcodes (see docs/protocol.md)."""

    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    RESUME = 6
    RECONNECT = 7
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11
    SUBSCRIBE = 12
    UNSUBSCRIBE = 13


class CloseCode(enum.IntEnum):
    """Gateway close codes (see docs/protocol.md for reconnect advice)."""

    UNKNOWN_ERROR = 4000
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    INVALID_SEQ = 4007
    RATE_LIMITED = 4008
    SESSION_TIMED_OUT = 4009
    SLOW_CONSUMER = 4010


# Closes after which the session stays resumable (everything else ends it).
RESUMABLE_CLOSES = frozenset({CloseCode.UNKNOWN_ERROR, CloseCode.SESSION_TIMED_OUT, CloseCode.SLOW_CONSUMER})


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Limits and timings of a gateway connection (durations in seconds).

    ``replay_frames``/``replay_bytes`` bound the per-session replay buffer; ``max_channels`` bounds
    a session's channel count and ``max_channel_length`` a channel name, so no client input can
    grow server state without limit.
    """

    heartbeat_interval: float = 41.25
    identify_timeout: float = 10.0
    resume_window: float = 120.0
    max_frame_bytes: int = 4096
    frame_budget: int = 120
    frame_budget_window: float = 60.0
    send_queue_frames: int = 1000
    send_queue_bytes: int = 1 << 20
    replay_frames: int = 1000
    replay_bytes: int = 1 << 20
    max_channels: int = 100
    max_channel_length: int = 200
    resume_gateway_url: str | None = None

    def hello(self) -> HelloPayload:
        """The HELLO payload (milliseconds)."""
        return HelloPayload(
            heartbeat_interval=round(self.heartbeat_interval * 1000),
            max_frame_bytes=self.max_frame_bytes,
            frame_budget=self.frame_budget,
            frame_budget_window=round(self.frame_budget_window * 1000),
            resume_window=round(self.resume_window * 1000),
            identify_timeout=round(self.identify_timeout * 1000),
            max_channels=self.max_channels,
            max_channel_length=self.max_channel_length,
        )


# ---- actions the I/O layer performs (and answers back into the machine) -------------------------


@dataclass(frozen=True)
class Close:
    """Close the WebSocket with ``code`` once the frames queued before it are sent.

    ``resumable`` says whether the session survives (kept for the resume window).
    """

    code: int
    reason: str
    resumable: bool


@dataclass(frozen=True, repr=False)
class Authenticate:
    """IDENTIFY arrived: resolve ``token``, then call :meth:`GatewayConnection.identified`.

    Its repr redacts the token (actions end up in logs and tracebacks)."""

    token: str

    def __repr__(self) -> str:
        return "Authenticate(token=<redacted>)"


@dataclass(frozen=True, repr=False)
class ResumeLookup:
    """RESUME arrived: authenticate ``token``, find ``session_id``, then call
    :meth:`GatewayConnection.resume_begin` / ``resume_complete`` or ``resume_rejected``.

    Its repr redacts the token."""

    token: str
    session_id: str
    seq: int

    def __repr__(self) -> str:
        return f"ResumeLookup(token=<redacted>, session_id={self.session_id!r}, seq={self.seq!r})"


@dataclass(frozen=True)
class AuthorizeChannels:
    """Check these channels, then call :meth:`GatewayConnection.authorized`."""

    channels: tuple[str, ...]


@dataclass(frozen=True)
class Subscribe:
    """Route deliveries of these channels to this session."""

    channels: tuple[str, ...]


@dataclass(frozen=True)
class Unsubscribe:
    """Stop routing deliveries of these channels to this session."""

    channels: tuple[str, ...]


@dataclass(frozen=True)
class Checkpoint:
    """The session's crash checkpoint changed (READY, subscriptions, a client acknowledgement):
    the I/O layer marks it dirty and writes it to the shared session store in its next batch."""


Action = Close | Authenticate | ResumeLookup | AuthorizeChannels | Subscribe | Unsubscribe | Checkpoint


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    AWAITING_IDENTIFY = "awaiting_identify"  # HELLO sent
    AUTHENTICATING = "authenticating"  # IDENTIFY received, waiting for the authenticator
    RESUMING = "resuming"  # RESUME received, waiting for / catching up the session
    CONNECTED = "connected"  # READY or RESUMED sent
    CLOSED = "closed"
