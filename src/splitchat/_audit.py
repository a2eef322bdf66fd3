"""One structured audit record per command request, to a pluggable sink.

The record holds identifiers and outcomes only: never headers, bodies or tokens, so nothing a
client sends as a credential can reach a log through it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec

__all__ = ("AuditRecord", "AuditSink", "LoggingAuditSink")


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one request to the command endpoint.

    Attributes:
        request_id: the ``X-Request-Id`` echoed to the client (theirs if valid, else generated).
        principal_id: who acted, ``None`` when not authenticated.
        command: the declared command's name, ``None`` when no command matched.
        channel: the command's channel, if any.
        method: HTTP method.
        outcome: ``"ok"``, ``"replayed"`` or the error code of the response (``"rate_limited"``...).
        status: HTTP status sent (0 when the client disconnected before an answer).
        latency_ms: time from the request's arrival to the answer, in milliseconds.
        idempotent_replay: the answer was a stored response to an earlier request with the same key.
        event_ids: ids of the events the command published.
        client: the client's IP address, when the server reports it.
    """

    request_id: str
    principal_id: str | None
    command: str | None
    channel: str | None
    method: str
    outcome: str
    status: int
    latency_ms: float
    idempotent_replay: bool = False
    event_ids: tuple[str, ...] = ()
    client: str | None = None


AuditSink = Callable[[AuditRecord], Awaitable[None]]
"""``async (record) -> None``. Called after the response is sent; must not block for long
(a remote sink should hand records to a bounded buffer and ship them in the background)."""

_encoder = msgspec.json.Encoder()


class LoggingAuditSink:
    """The default sink: one ``INFO`` line of JSON per record on the ``splitchat.audit`` logger.

    The record is also attached as ``extra={"audit": record}`` for structured log handlers.
    """

    def __init__(self, logger: logging.Logger | str = "splitchat.audit", level: int = logging.INFO) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    async def __call__(self, record: AuditRecord) -> None:
        # isEnabledFor first: when auditing is switched off the cost is one dict lookup.
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, "%s", _encoder.encode(record).decode(), extra={"audit": record})
