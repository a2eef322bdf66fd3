"""splitchat: POST-in / WebSocket-out real time for any ASGI app.

User actions go in as HTTP POST to a :class:`CommandEndpoint`; events come out over the
WebSocket :class:`Gateway`; a :class:`Bus` fans them out between processes.
"""

from __future__ import annotations

# -- command endpoint (POST-in half) --
from ._audit import AuditRecord, AuditSink, LoggingAuditSink
from ._auth import (
    AuthenticationError,
    Authenticator,
    ChannelAuthorizer,
    Principal,
    StaticTokenAuthenticator,
    allow_all_channels,
    bearer_token,
)
from ._commands import Command, CommandContext, EventReceipt
from ._endpoint import CommandEndpoint
from ._errors import ErrorBody, HTTPError
from ._events import Event, decode_event, encode_event

# -- end command endpoint --
# --- gateway (WebSocket-out half) ---
from ._frames import ClientFrame, Dispatch, FrameError, decode_client_frame
from ._gateway import Gateway
from ._gateway_server import GatewayServer, serve_gateway  # gateway fast path (perf)
from ._idempotency import (
    ClaimResult,
    IdempotencyStore,
    IdempotencyStoreUnavailable,
    InMemoryIdempotencyStore,
    StoredResponse,
    request_fingerprint,
)
from ._lifespan import Lifecycle, lifespan
from ._presence import InMemoryPresence, Presence
from ._protocol import CloseCode, ConnectionState, GatewayConfig, GatewayConnection, Op, SessionState
from ._ratelimit import RateLimitDecision, RateLimiter, RateLimitScope, RateLimitStrategy, parse_limit
from ._sessions import BufferedDispatch, InMemorySessionStore, SessionRecord, SessionStore

# --- end gateway ---
from ._snowflake import SPLITCHAT_EPOCH_MS, SnowflakeGenerator, snowflake_time

# --- scale-out ---
from ._state import redis_state

# --- end scale-out ---
# --- browser client (webapp) ---
from ._static import BROWSER_CLIENT_FILENAME, browser_client_mount, browser_client_path, static_files

# --- end browser client ---
# --- API documents (OpenAPI, AsyncAPI, gateway payloads) ---
# isort: split
from ._asyncapi import gateway_asyncapi
from ._openapi import openapi_document
from ._payloads import (
    ChannelsPayload,
    HelloPayload,
    IdentifyPayload,
    PresenceUpdatePayload,
    RateLimitedPayload,
    ReadyPayload,
    ResumedPayload,
    ResumePayload,
    SubscribedPayload,
    UnsubscribedPayload,
)

# --- end API documents ---
# isort: split
from .bus import (
    Bus,
    BusError,
    BusUnavailable,
    Delivery,
    Gap,
    HistoryGone,
    HistoryUnsupported,
    InMemoryBus,
    Position,
    Subscription,
    bus_from_url,
)

__version__ = "0.1.0"

__all__ = (
    # -- command endpoint (POST-in half) --
    "AuditRecord",
    "AuditSink",
    "ClaimResult",
    "Command",
    "CommandContext",
    "CommandEndpoint",
    "ErrorBody",
    "EventReceipt",
    "HTTPError",
    "IdempotencyStore",
    "IdempotencyStoreUnavailable",
    "InMemoryIdempotencyStore",
    "Lifecycle",
    "LoggingAuditSink",
    "RateLimitDecision",
    "RateLimitScope",
    "RateLimitStrategy",
    "RateLimiter",
    "StoredResponse",
    "lifespan",
    "parse_limit",
    "request_fingerprint",
    # -- end command endpoint --
    # gateway
    "BufferedDispatch",
    "ClientFrame",
    "CloseCode",
    "ConnectionState",
    "Dispatch",
    "FrameError",
    "Gateway",
    "GatewayConfig",
    "GatewayConnection",
    "InMemoryPresence",
    "InMemorySessionStore",
    "Op",
    "Presence",
    "SessionRecord",
    "SessionState",
    "SessionStore",
    "decode_client_frame",
    # end gateway
    "SPLITCHAT_EPOCH_MS",
    # --- scale-out ---
    "redis_state",
    # --- end scale-out ---
    # --- browser client (webapp) ---
    "BROWSER_CLIENT_FILENAME",
    "browser_client_mount",
    "browser_client_path",
    "static_files",
    # --- end browser client ---
    # --- API documents ---
    "ChannelsPayload",
    "HelloPayload",
    "IdentifyPayload",
    "PresenceUpdatePayload",
    "RateLimitedPayload",
    "ReadyPayload",
    "ResumePayload",
    "ResumedPayload",
    "SubscribedPayload",
    "UnsubscribedPayload",
    "gateway_asyncapi",
    "openapi_document",
    # --- end API documents ---
    # --- gateway fast path (perf) ---
    "GatewayServer",
    "serve_gateway",
    # --- end gateway fast path ---
    "AuthenticationError",
    "Authenticator",
    "Bus",
    "BusError",
    "BusUnavailable",
    "ChannelAuthorizer",
    "Delivery",
    "Event",
    "Gap",
    "HistoryGone",
    "HistoryUnsupported",
    "InMemoryBus",
    "Position",
    "Principal",
    "SnowflakeGenerator",
    "StaticTokenAuthenticator",
    "Subscription",
    "__version__",
    "allow_all_channels",
    "bearer_token",
    "bus_from_url",
    "decode_event",
    "encode_event",
    "snowflake_time",
)
