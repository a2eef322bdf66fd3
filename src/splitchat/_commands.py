"""Command declarations and the per-request context handlers receive.

A :class:`Command` is the introspectable record of one ``@endpoint.command(...)`` declaration
(OpenAPI generation reads them); a :class:`CommandContext` is what a handler sees of its request
and where it queues the events it causes.
"""

from __future__ import annotations

import re
import string
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from ._auth import Principal
from ._errors import HTTPError
from ._query import QueryDecoder
from ._snowflake import SnowflakeGenerator
from .bus import Position

__all__ = ("Command", "CommandAuthorizer", "CommandContext", "EventReceipt", "Handler")

Handler = Callable[..., Awaitable[Any]]
"""``async (ctx, body) -> dict | msgspec.Struct | None`` (``async (ctx)`` without a body type)."""
CommandAuthorizer = Callable[["CommandContext"], Awaitable[bool]]
"""``async (ctx) -> bool``: a per-command permission check run after authentication."""

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class EventReceipt(msgspec.Struct, frozen=True, gc=False):
    """Proof of publication returned in the success body's ``"event"`` member.

    ``position`` is ``None`` for an ephemeral event (those have no place in history).
    """

    id: str
    type: str
    channel: str
    position: Position | None


class Command:
    """A declared command; introspectable (OpenAPI generation reads these).

    Attributes:
        name: unique name (audit records, rate-limit bucket, idempotency scope).
        method: HTTP method.
        path: path template relative to the endpoint's mount point, e.g. ``/channels/{channel_id}``.
        params: names of the path parameters, in order.
        body_type: the msgspec-decodable type of the JSON body, or ``None`` for no body.
        query_type: a flat msgspec Struct filled from the query string (``ctx.query``), or ``None``.
        response_type: the type the handler returns (documentation only), or ``None``.
        channel: channel template (``"{channel_id}"``), or ``None`` for a command without one.
        rate_limit: per-user limit of this route (``"5/5 seconds"``), or ``None``.
        shared_rate_limit: limit shared by every user of the same route + major parameter.
        status: success status (200 by default; 201, 202, 204...).
        public: whether unauthenticated requests are accepted (``ctx.principal`` may be ``None``).
        scopes: scopes the principal must all hold.
        summary: one line for docs (defaults to the handler's docstring's first line).
    """

    __slots__ = (
        "_channel_fields",
        "_decoder",
        "_major",
        "_query",
        "_regex",
        "authorize",
        "body_type",
        "channel",
        "handler",
        "method",
        "name",
        "params",
        "path",
        "public",
        "query_type",
        "rate_limit",
        "response_type",
        "scopes",
        "shared_rate_limit",
        "status",
        "summary",
    )

    def __init__(
        self,
        *,
        method: str,
        path: str,
        handler: Handler,
        name: str,
        body_type: Any,
        response_type: Any,
        channel: str | None,
        rate_limit: str | None,
        shared_rate_limit: str | None,
        status: int,
        public: bool,
        scopes: frozenset[str],
        authorize: CommandAuthorizer | None,
        major: str | None,
        query_type: Any = None,
    ) -> None:
        method = method.upper()
        if method not in _METHODS:
            raise ValueError(f"unsupported method {method!r}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        if not 200 <= status <= 299:
            raise ValueError(f"success status must be 2xx, got {status}")
        self.method = method
        self.path = path
        self.handler = handler
        self.name = name
        self.body_type = body_type
        self.response_type = response_type
        self.query_type = query_type
        self.channel = channel
        self.rate_limit = rate_limit
        self.shared_rate_limit = shared_rate_limit
        self.status = status
        self.public = public
        self.scopes = scopes
        self.authorize = authorize
        self.summary = (handler.__doc__ or "").strip().split("\n", 1)[0]
        self.params = tuple(_PARAM.findall(path))
        if len(set(self.params)) != len(self.params):
            raise ValueError(f"duplicate path parameter in {path!r}")
        pattern = "".join(
            f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part) for i, part in enumerate(_PARAM.split(path))
        )
        self._regex = re.compile(pattern)
        self._channel_fields: tuple[str, ...] = ()
        if channel is not None:
            fields = tuple(f for _, f, _, _ in string.Formatter().parse(channel) if f is not None)
            unknown = [f for f in fields if f not in self.params]
            if unknown:
                raise ValueError(f"channel template {channel!r} uses unknown path parameters {unknown}")
            self._channel_fields = fields
        if major is not None and major not in self.params:
            raise ValueError(f"major parameter {major!r} is not a path parameter of {path!r}")
        # The "major parameter" splits a route's bucket per resource (Discord: channel_id,
        # guild_id): by default the parameters that name the channel.
        self._major: tuple[str, ...] = (major,) if major is not None else self._channel_fields
        self._decoder: msgspec.json.Decoder[Any] | None = (
            msgspec.json.Decoder(body_type) if body_type is not None else None
        )
        self._query: QueryDecoder | None = QueryDecoder(query_type) if query_type is not None else None

    def __repr__(self) -> str:
        return f"Command({self.name!r}, {self.method} {self.path})"

    def channel_for(self, params: Mapping[str, str]) -> str | None:
        """The channel of a request with these path parameters."""
        if self.channel is None:
            return None
        return self.channel.format_map(params)


class CommandContext:
    """What a handler knows about its request, and where it queues the events it causes.

    Events queued with :meth:`publish` are published only after the handler returns without
    raising, in the order queued, so a failed command publishes nothing.
    """

    __slots__ = (
        "_events",
        "_max_events",
        "channel",
        "client",
        "command",
        "nonce",
        "params",
        "principal",
        "query",
        "request_id",
        "snowflakes",
    )

    def __init__(
        self,
        *,
        command: Command,
        principal: Principal | None,
        params: dict[str, str],
        channel: str | None,
        request_id: str,
        snowflakes: SnowflakeGenerator,
        client: str | None,
        max_events: int,
    ) -> None:
        self.command = command
        self.principal = principal
        self.params = params
        self.channel = channel
        self.nonce: str | None = None
        # The command's query Struct (``None`` when it declares no ``query=``); set before the handler runs.
        self.query: Any = None
        self.request_id = request_id
        self.snowflakes = snowflakes
        self.client = client
        self._max_events = max_events
        self._events: list[tuple[str, Any, str, bool]] = []

    @property
    def user(self) -> Principal:
        """The authenticated principal (always set unless the command is ``public``)."""
        if self.principal is None:
            raise HTTPError(401, "unauthorized", "Authentication required")
        return self.principal

    def publish(self, type: str, data: Any, *, channel: str | None = None, ephemeral: bool = False) -> None:
        """Queue an event (``type`` becomes the dispatch's ``t``; ``data`` its ``d``).

        ``channel`` defaults to the command's channel. Published after the handler returns.
        """
        target = channel if channel is not None else self.channel
        if target is None:
            raise ValueError(f"command {self.command.name!r} has no channel; pass channel=")
        if len(self._events) >= self._max_events:
            raise RuntimeError(f"a command may publish at most {self._max_events} events")
        self._events.append((type, data, target, ephemeral))
