"""The command endpoint: user actions come in as HTTP requests and go out as bus events.

:class:`CommandEndpoint` is a plain ASGI app (mount it anywhere). An application declares
*commands* (method + path template + body type + handler); each request runs one pipeline:

    guard → route → headers → authenticate → authorize → rate limit → read & decode body →
    idempotency → handler → publish queued events → respond → audit

The body is read and decoded *after* authentication and rate limiting (the headers, content type
and declared length are checked first): an unauthenticated or throttled client never makes the
server buffer or parse a body, and a malformed body still spends rate-limit budget (as on
Discord), so bad input is cheap to refuse.
"""

from __future__ import annotations

import logging
import re
import string
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import msgspec

from ._audit import AuditRecord, AuditSink, LoggingAuditSink
from ._auth import AuthenticationError, Authenticator, ChannelAuthorizer, Principal, allow_all_channels
from ._errors import ErrorBody, HTTPError
from ._events import encode_event
from ._idempotency import IdempotencyStore, InMemoryIdempotencyStore, StoredResponse, request_fingerprint
from ._lifespan import lifespan
from ._ratelimit import RateLimitDecision, RateLimiter
from ._snowflake import SnowflakeGenerator
from ._types import Message, Receive, Scope, Send
from .bus import Bus, BusUnavailable, Position

__all__ = ("Command", "CommandContext", "CommandEndpoint", "EventReceipt")

logger = logging.getLogger("splitchat.endpoint")

Handler = Callable[..., Awaitable[Any]]
"""``async (ctx, body) -> dict | msgspec.Struct | None`` (``async (ctx)`` without a body type)."""
CommandAuthorizer = Callable[["CommandContext"], Awaitable[bool]]
"""``async (ctx) -> bool``: a per-command permission check run after authentication."""
H = TypeVar("H", bound=Handler)

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_VALIDATION_PATH = re.compile(r"^(?P<msg>.*) - at `(?P<path>\$[^`]*)`$", re.DOTALL)
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
_MAX_NONCE = 64
_MAX_IDEMPOTENCY_KEY = 255
_MAX_REQUEST_ID = 128

_encoder = msgspec.json.Encoder()
_error_encoder = msgspec.json.Encoder()


class _NonceProbe(msgspec.Struct):
    # Reads only the "nonce" member of an object body, whatever the command's body type is.
    nonce: str | int | None = None


_nonce_decoder = msgspec.json.Decoder(_NonceProbe)


class EventReceipt(msgspec.Struct, frozen=True):
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


class _Reply:
    """A response under construction (status, headers as str pairs, body bytes)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []


class _ClientGone(Exception):
    """The client disconnected before the request body was read."""


class _Outcome:
    """Per-request facts gathered for the audit record."""

    __slots__ = ("channel", "command", "event_ids", "principal", "replay")

    def __init__(self) -> None:
        self.command: Command | None = None
        self.principal: Principal | None = None
        self.channel: str | None = None
        self.replay = False
        self.event_ids: tuple[str, ...] = ()


def _error(status: int, code: str, message: str, errors: Mapping[str, str] | None = None) -> HTTPError:
    return HTTPError(status, code, message, errors=errors)


def _validation_errors(exc: msgspec.ValidationError) -> dict[str, str]:
    text = str(exc)
    path = "$"
    match = _VALIDATION_PATH.match(text)
    if match:
        text, path = match.group("msg"), match.group("path")
    missing = _MISSING_FIELD.match(text)
    if missing:
        return {f"{path}.{missing.group('field')}": "This field is required"}
    return {path: text}


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _clean_token(value: str, max_len: int) -> str | None:
    if 0 < len(value) <= max_len and value.isascii() and value.isprintable():
        return value
    return None


class CommandEndpoint:
    """A pure-ASGI app serving declared commands; mount it (``Mount("/api", app=endpoint)``).

    Args:
        bus: where events are published.
        authenticator: resolves ``Authorization: Bearer <token>`` to a principal.
        channel_authorizer: may this principal act on this channel? (default: yes).
        rate_limiter: the limiter (default: in-memory, moving window).
        idempotency_store: where idempotency keys live (default: in-memory, 10k keys).
        audit_sink: where audit records go (default: the ``splitchat.audit`` logger).
        snowflakes: event / object id generator (give each process its own worker id).
        global_rate_limit: per-principal limit across all commands.
        ip_rate_limit: per-IP limit for unauthenticated requests to public commands.
        invalid_request_limit: 401/403/429 answers per IP before the IP is refused outright.
        max_body_bytes: largest accepted body (enforced while reading).
        idempotency_ttl: seconds a nonce / Idempotency-Key is remembered.
        max_events_per_command: bound on ``ctx.publish`` calls per request.
    """

    def __init__(
        self,
        *,
        bus: Bus,
        authenticator: Authenticator,
        channel_authorizer: ChannelAuthorizer = allow_all_channels,
        rate_limiter: RateLimiter | None = None,
        idempotency_store: IdempotencyStore | None = None,
        audit_sink: AuditSink | None = None,
        snowflakes: SnowflakeGenerator | None = None,
        global_rate_limit: str | None = "50/second",
        ip_rate_limit: str | None = "50/second",
        invalid_request_limit: str | None = "10000/10 minutes",
        max_body_bytes: int = 64 * 1024,
        idempotency_ttl: float = 300.0,
        max_events_per_command: int = 16,
    ) -> None:
        self.bus = bus
        self.authenticator = authenticator
        self.channel_authorizer = channel_authorizer
        self.rate_limiter = rate_limiter if rate_limiter is not None else RateLimiter()
        self.idempotency_store = (
            idempotency_store if idempotency_store is not None else InMemoryIdempotencyStore()
        )
        self.audit_sink: AuditSink = audit_sink if audit_sink is not None else LoggingAuditSink()
        self.snowflakes = snowflakes if snowflakes is not None else SnowflakeGenerator()
        self.global_rate_limit = global_rate_limit
        self.ip_rate_limit = ip_rate_limit
        self.invalid_request_limit = invalid_request_limit
        self.max_body_bytes = max_body_bytes
        self.idempotency_ttl = idempotency_ttl
        self.max_events_per_command = max_events_per_command
        self._commands: list[Command] = []

    # -- declaration -------------------------------------------------------------------------

    @property
    def commands(self) -> tuple[Command, ...]:
        """Every declared command, in declaration order."""
        return tuple(self._commands)

    def command(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        response: Any = None,
        channel: str | None = None,
        rate_limit: str | None = None,
        shared_rate_limit: str | None = None,
        status: int = 200,
        name: str | None = None,
        public: bool = False,
        scopes: frozenset[str] | set[str] = frozenset(),
        authorize: CommandAuthorizer | None = None,
        major: str | None = None,
    ) -> Callable[[H], H]:
        """Decorator declaring a command; see :class:`Command` for the arguments.

        The handler is ``async (ctx, body)`` when ``body`` is given, else ``async (ctx)``.
        """

        def register(handler: H) -> H:
            self.add_command(
                Command(
                    method=method,
                    path=path,
                    handler=handler,
                    name=name or handler.__name__,
                    body_type=body,
                    response_type=response,
                    channel=channel,
                    rate_limit=rate_limit,
                    shared_rate_limit=shared_rate_limit,
                    status=status,
                    public=public,
                    scopes=frozenset(scopes),
                    authorize=authorize,
                    major=major,
                )
            )
            return handler

        return register

    def add_command(self, command: Command) -> None:
        """Register a :class:`Command` built by hand."""
        for existing in self._commands:
            if existing.name == command.name:
                raise ValueError(f"duplicate command name {command.name!r}")
            if existing.method == command.method and existing.path == command.path:
                raise ValueError(f"duplicate route {command.method} {command.path}")
        if command.rate_limit is not None:
            self.rate_limiter.validate(command.rate_limit)
        if command.shared_rate_limit is not None:
            self.rate_limiter.validate(command.shared_rate_limit)
        self._commands.append(command)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the rate limiter and idempotency store (the bus is started by its owner)."""
        await self.rate_limiter.start()
        await self.idempotency_store.start()

    async def close(self) -> None:
        """Close the idempotency store and the rate limiter (both closes are idempotent)."""
        await self.idempotency_store.close()
        await self.rate_limiter.close()

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # Only reached when the endpoint is the top-level app (Mount does not forward lifespan).
        context = lifespan(self.bus, self)(self)
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            await context.__aenter__()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await context.__aexit__(None, None, None)
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        client_info = scope.get("client")
        client = str(client_info[0]) if client_info else None
        authorization = content_type = content_length = idempotency_key = request_id = None
        for raw_name, raw_value in scope.get("headers", ()):
            if raw_name == b"authorization":
                authorization = raw_value.decode("latin-1")
            elif raw_name == b"content-type":
                content_type = raw_value.decode("latin-1")
            elif raw_name == b"content-length":
                content_length = raw_value.decode("latin-1")
            elif raw_name == b"idempotency-key":
                idempotency_key = raw_value.decode("latin-1")
            elif raw_name == b"x-request-id":
                request_id = _clean_token(raw_value.decode("latin-1"), _MAX_REQUEST_ID)
        if request_id is None:
            request_id = self.snowflakes.next_str()
        outcome = _Outcome()
        rate_headers: list[tuple[str, str]] = []
        try:
            reply = await self._pipeline(
                scope,
                receive,
                outcome,
                rate_headers,
                client,
                authorization,
                content_type,
                content_length,
                idempotency_key,
                request_id,
            )
            code = "replayed" if outcome.replay else "ok"
        except HTTPError as exc:
            reply = _Reply(exc.status, _error_encoder.encode(exc.body()), list(exc.headers))
            code = exc.code
        except _RateLimited as exc:
            reply = exc.reply
            code = "rate_limited"
        except _ClientGone:
            await self._audit(outcome, request_id, scope, client, "client_disconnected", 0, started)
            return
        except Exception:
            command_name = outcome.command.name if outcome.command else None
            logger.exception("command %s failed (request %s)", command_name, request_id)
            body = ErrorBody(code="internal_error", message="Internal server error")
            reply = _Reply(500, _error_encoder.encode(body))
            code = "internal_error"
        reply.headers.extend(rate_headers)
        reply.headers.append(("x-request-id", request_id))
        await _send_reply(send, reply)
        if reply.status in (401, 403, 429) and self.invalid_request_limit is not None and client:
            # Counted after answering: the guard's own bookkeeping never delays the response.
            await self.rate_limiter.hit(f"invalid:{client}", self.invalid_request_limit, scope="global")
        await self._audit(outcome, request_id, scope, client, code, reply.status, started)

    async def _audit(
        self,
        outcome: _Outcome,
        request_id: str,
        scope: Scope,
        client: str | None,
        code: str,
        status: int,
        started: float,
    ) -> None:
        record = AuditRecord(
            request_id=request_id,
            principal_id=outcome.principal.id if outcome.principal else None,
            command=outcome.command.name if outcome.command else None,
            channel=outcome.channel,
            method=str(scope.get("method", "")),
            outcome=code,
            status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            idempotent_replay=outcome.replay,
            event_ids=outcome.event_ids,
            client=client,
        )
        try:
            await self.audit_sink(record)
        except Exception:
            logger.exception("audit sink failed (request %s)", request_id)

    def _route(self, scope: Scope) -> tuple[Command, dict[str, str]]:
        path = _route_path(scope)
        method = scope.get("method", "")
        allowed: list[str] = []
        for command in self._commands:
            match = command._regex.fullmatch(path)
            if match is None:
                continue
            if command.method == method:
                return command, match.groupdict()
            allowed.append(command.method)
        if allowed:
            exc = _error(405, "method_not_allowed", f"Method {method} not allowed")
            exc.headers.append(("allow", ", ".join(sorted(set(allowed)))))
            raise exc
        raise _error(404, "not_found", "Not found")

    async def _pipeline(
        self,
        scope: Scope,
        receive: Receive,
        outcome: _Outcome,
        rate_headers: list[tuple[str, str]],
        client: str | None,
        authorization: str | None,
        content_type: str | None,
        content_length: str | None,
        idempotency_key: str | None,
        request_id: str,
    ) -> _Reply:
        limiter = self.rate_limiter
        now = time.time()
        # 0. Invalid-request guard: an IP that produced too many 401/403/429 is refused at once.
        if self.invalid_request_limit is not None and client:
            guard = await limiter.peek(
                f"invalid:{client}", self.invalid_request_limit, bucket="invalid-requests", scope="global"
            )
            if not guard.allowed:
                raise _RateLimited(guard, "You are being blocked from accessing the API temporarily.")

        # 1. Route and headers.
        command, params = self._route(scope)
        outcome.command = command
        if command._decoder is not None:
            if content_type is None or not _is_json(content_type):
                raise _error(415, "unsupported_media_type", "Content-Type must be application/json")
            if content_length is not None:
                declared = content_length.strip()
                if declared.isdigit() and int(declared) > self.max_body_bytes:
                    raise _error(413, "payload_too_large", f"Body exceeds {self.max_body_bytes} bytes")

        # 2. Authenticate.
        principal: Principal | None = None
        token = _bearer(authorization)
        if token == "":
            raise _unauthorized("Malformed Authorization header")
        if token is not None:
            try:
                principal = await self.authenticator(token)
            except AuthenticationError:
                principal = None
            if principal is None:
                raise _unauthorized("Invalid token")
        elif not command.public:
            raise _unauthorized("Authentication required")
        outcome.principal = principal
        channel = command.channel_for(params)
        outcome.channel = channel
        ctx = CommandContext(
            command=command,
            principal=principal,
            params=params,
            channel=channel,
            request_id=request_id,
            snowflakes=self.snowflakes,
            client=client,
            max_events=self.max_events_per_command,
        )

        # 3. Authorize.
        if principal is not None:
            if command.scopes and not command.scopes <= principal.scopes:
                raise _error(403, "forbidden", "Missing required scope")
            if channel is not None and not await self.channel_authorizer(principal, channel):
                raise _error(403, "forbidden", "Missing access to this channel")
        if command.authorize is not None and not await command.authorize(ctx):
            raise _error(403, "forbidden", "Missing permissions")

        # 4. Rate limit: the caller's global budget, then the route bucket (user, then shared).
        who = f"user:{principal.id}" if principal is not None else f"ip:{client}"
        overall = self.global_rate_limit if principal is not None else self.ip_rate_limit
        shown: RateLimitDecision | None = None
        if overall is not None:
            shown = await limiter.hit(f"global:{who}", overall, bucket="global", scope="global", now=now)
            if not shown.allowed:
                raise _RateLimited(shown, "You are being rate limited.")
        if command.rate_limit is not None or command.shared_rate_limit is not None:
            major = ":".join(params[p] for p in command._major)
            if command.rate_limit is not None:
                shown = await limiter.hit(
                    f"route:{command.name}:{major}:{who}", command.rate_limit, bucket=command.name, now=now
                )
                if not shown.allowed:
                    raise _RateLimited(shown, "You are being rate limited.")
            if command.shared_rate_limit is not None:
                shared = await limiter.hit(
                    f"shared:{command.name}:{major}",
                    command.shared_rate_limit,
                    bucket=f"{command.name}:shared",
                    scope="shared",
                    now=now,
                )
                if not shared.allowed:
                    raise _RateLimited(shared, "You are being rate limited.")
        if shown is not None:
            rate_headers.extend(shown.headers())

        # 5. Read and decode the body.
        body: Any = None
        raw = b""
        nonce: str | None = None
        if command._decoder is not None:
            raw = await _read_body(receive, self.max_body_bytes)
            try:
                body = command._decoder.decode(raw)
            except msgspec.ValidationError as exc:
                raise _error(400, "invalid_body", "Invalid request body", _validation_errors(exc)) from None
            except msgspec.DecodeError:
                raise _error(400, "invalid_json", "Request body is not valid JSON") from None
            if b'"nonce"' in raw:
                nonce = _body_nonce(raw)
        if idempotency_key is not None:
            key = _clean_token(idempotency_key, _MAX_IDEMPOTENCY_KEY)
            if key is None:
                raise _error(
                    400,
                    "invalid_body",
                    "Invalid Idempotency-Key header",
                    {"Idempotency-Key": f"must be 1 to {_MAX_IDEMPOTENCY_KEY} printable ASCII characters"},
                )
            if nonce is not None and nonce != key:
                raise _error(
                    400,
                    "invalid_body",
                    "nonce and Idempotency-Key differ",
                    {"$.nonce": "differs from header"},
                )
            nonce = key
        ctx.nonce = nonce

        # 6. Idempotency.
        if nonce is None:
            return await self._execute(ctx, body, outcome)
        store = self.idempotency_store
        scoped_key = f"{who}\0{command.name}\0{nonce}"
        fingerprint = request_fingerprint(command.method, _route_path(scope), raw)
        claim = await store.claim(scoped_key, fingerprint, self.idempotency_ttl)
        if claim.fingerprint != fingerprint:
            raise _error(
                422, "idempotency_conflict", "This idempotency key was used with a different request"
            )
        if claim.state == "in_progress":
            busy = _error(
                409, "idempotency_in_progress", "A request with this idempotency key is in progress"
            )
            busy.headers.append(("retry-after", "1"))
            raise busy
        if claim.state == "completed":
            assert claim.response is not None
            outcome.replay = True
            stored = claim.response
            return _Reply(stored.status, stored.body, [*stored.headers, ("idempotent-replayed", "true")])
        done = False
        try:
            try:
                reply = await self._execute(ctx, body, outcome)
            except HTTPError as exc:
                if exc.status < 500:
                    # A deterministic refusal by the app is part of the key's answer too.
                    response = StoredResponse(
                        exc.status, list(exc.headers), _error_encoder.encode(exc.body())
                    )
                    await store.complete(scoped_key, fingerprint, response, self.idempotency_ttl)
                    done = True
                raise
            stored_headers = [h for h in reply.headers if h[0] in ("x-event-id", "x-event-position")]
            response = StoredResponse(
                reply.status, [("content-type", "application/json"), *stored_headers], reply.body
            )
            await store.complete(scoped_key, fingerprint, response, self.idempotency_ttl)
            done = True
            return reply
        finally:
            if not done:
                # 5xx, bus unavailable, crash or cancellation: let a retry run for real.
                with anyio.CancelScope(shield=True):
                    await store.release(scoped_key)

    async def _execute(self, ctx: CommandContext, body: Any, outcome: _Outcome) -> _Reply:
        command = ctx.command
        if command._decoder is not None:
            result = await command.handler(ctx, body)
        else:
            result = await command.handler(ctx)
        receipts: list[EventReceipt] = []
        nonce = ctx.nonce
        bus = self.bus
        for event_type, data, channel, ephemeral in ctx._events:
            event_id = self.snowflakes.next_str()
            payload = encode_event(
                id=event_id, type=event_type, channel=channel, data=data, nonce=nonce, ephemeral=ephemeral
            )
            try:
                if ephemeral:
                    await bus.publish_ephemeral(channel, payload)
                    position = None
                else:
                    position = await bus.publish(channel, payload)
            except BusUnavailable:
                outcome.event_ids = tuple(r.id for r in receipts)
                raise _error(503, "bus_unavailable", "The event bus is unavailable; retry later") from None
            receipts.append(EventReceipt(event_id, event_type, channel, position))
        outcome.event_ids = tuple(r.id for r in receipts)
        headers = [("content-type", "application/json")]
        if receipts:
            first = receipts[0]
            headers.append(("x-event-id", first.id))
            if first.position is not None:
                headers.append(("x-event-position", str(first.position)))
        if command.status == 204:
            return _Reply(204, b"", headers)
        if not receipts and nonce is None:
            return _Reply(command.status, _encoder.encode(result if result is not None else {}), headers)
        if result is None:
            document: dict[str, Any] = {}
        elif isinstance(result, dict):
            document = dict(result)
        else:
            built = msgspec.to_builtins(result)
            if not isinstance(built, dict):
                raise TypeError(f"command {command.name!r} must return an object to carry an event receipt")
            document = built
        if receipts:
            document["event"] = receipts[0]
            if len(receipts) > 1:
                document["events"] = receipts
        if nonce is not None:
            document["nonce"] = nonce
        return _Reply(command.status, _encoder.encode(document), headers)


class _RateLimited(Exception):
    """Internal: answer 429 with Discord's body (not the error format) and the limit's headers."""

    def __init__(self, decision: RateLimitDecision, message: str) -> None:
        body = _RateLimitBody(message, decision.retry_after, decision.scope == "global")
        self.reply = _Reply(429, _encoder.encode(body), [("content-type", "application/json")])
        self.reply.headers.extend(decision.headers())


class _RateLimitBody(msgspec.Struct):
    message: str
    retry_after: float
    # "global" is a Python keyword: the attribute is renamed, the JSON member is not.
    is_global: bool = msgspec.field(name="global")


def _unauthorized(message: str) -> HTTPError:
    exc = _error(401, "unauthorized", message)
    exc.headers.append(("www-authenticate", "Bearer"))
    return exc


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        # A malformed Authorization header is a failed authentication, not an absent one.
        return "" if authorization.strip() else None
    return token


def _body_nonce(raw: bytes) -> str | None:
    try:
        probe = _nonce_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _error(400, "invalid_body", "Invalid nonce", _validation_errors(exc)) from None
    except msgspec.DecodeError:  # pragma: no cover - the body already decoded as JSON
        return None
    if probe.nonce is None:
        return None
    nonce = str(probe.nonce)
    if _clean_token(nonce, _MAX_NONCE) is None:
        raise _error(
            400,
            "invalid_body",
            "Invalid nonce",
            {"$.nonce": f"must be 1 to {_MAX_NONCE} printable ASCII characters"},
        )
    return nonce


def _route_path(scope: Scope) -> str:
    # Same rule as Starlette's Mount: strip root_path when the server kept it in path.
    path: str = scope.get("path", "/")
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        if path == root_path:
            return "/"
        if path[len(root_path)] == "/":
            return path[len(root_path) :]
    return path


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _error(413, "payload_too_large", f"Body exceeds {limit} bytes")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_reply(send: Send, reply: _Reply) -> None:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers]
    if reply.status != 204:
        headers.append((b"content-length", str(len(reply.body)).encode()))
        if not any(name == b"content-type" for name, _ in headers):
            headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body if reply.status != 204 else b""})
