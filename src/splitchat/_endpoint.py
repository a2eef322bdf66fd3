"""The command endpoint: user actions come in as HTTP requests and go out as bus events.

:class:`CommandEndpoint` is a plain ASGI app (mount it anywhere). An application declares
*commands* (method + path template + body type + handler); each request runs one pipeline:

    guard → route → headers → authenticate → authorize → rate limit → convert query →
    read & decode body → idempotency → handler → publish queued events → respond → audit

``GET <mount>/openapi.json`` (``openapi_path``) answers the OpenAPI document of the declared
commands before the pipeline: public, cached, not rate limited and not audited.

The body is read and decoded *after* authentication and rate limiting (the headers, content type
and declared length are checked first): an unauthenticated or throttled client never makes the
server buffer or parse a body, and a malformed body still spends rate-limit budget (as on
Discord), so bad input is cheap to refuse.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import msgspec
from limits.errors import StorageError

from ._audit import AuditRecord, AuditSink, LoggingAuditSink
from ._auth import AuthenticationError, Authenticator, ChannelAuthorizer, Principal, allow_all_channels
from ._commands import Command, CommandAuthorizer, CommandContext, EventReceipt, Handler
from ._errors import ErrorBody, HTTPError
from ._events import encode_event
from ._http import (
    MAX_IDEMPOTENCY_KEY,
    MAX_REQUEST_ID,
    ClientGone,
    RateLimited,
    Reply,
    bearer_credentials,
    body_nonce,
    clean_token,
    error,
    is_json,
    json_encoder,
    read_body,
    route_path,
    send_reply,
    unauthorized,
    validation_errors,
)
from ._idempotency import (
    IdempotencyStore,
    IdempotencyStoreUnavailable,
    InMemoryIdempotencyStore,
    StoredResponse,
    request_fingerprint,
)
from ._lifespan import lifespan
from ._openapi import openapi_document
from ._ratelimit import RateLimitDecision, RateLimiter
from ._snowflake import SnowflakeGenerator
from ._types import Receive, Scope, Send
from .bus import Bus, BusUnavailable

__all__ = ("CommandEndpoint",)

logger = logging.getLogger("splitchat.endpoint")

H = TypeVar("H", bound=Handler)

_MAX_BLOCKED_IPS = 100_000


class _Outcome:
    """Per-request facts gathered for the audit record."""

    __slots__ = ("channel", "command", "event_ids", "principal", "replay")

    def __init__(self) -> None:
        self.command: Command | None = None
        self.principal: Principal | None = None
        self.channel: str | None = None
        self.replay = False
        self.event_ids: tuple[str, ...] = ()


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
        openapi_path: where ``GET`` serves the OpenAPI 3.1 document of the declared commands,
            relative to the mount point (``None`` disables it). Public and not rate limited: it
            is built once and cached.
        title, version, description: the OpenAPI document's ``info``.
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
        openapi_path: str | None = "/openapi.json",
        title: str = "splitchat API",
        version: str = "1.0.0",
        description: str | None = None,
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
        if openapi_path is not None and not openapi_path.startswith("/"):
            raise ValueError(f"openapi_path must start with '/': {openapi_path!r}")
        self.openapi_path = openapi_path
        self.title = title
        self.version = version
        self.description = description
        self._commands: list[Command] = []
        # root_path (the mount point) -> encoded document; cleared when a command is added.
        self._openapi_cache: dict[str, bytes] = {}
        # IP -> (blocked until, guard limit): IPs refused by the invalid-request guard; bounded.
        self._blocked: dict[str, tuple[float, int]] = {}

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
        query: Any = None,
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
        ``query`` is a flat msgspec Struct converted from the query string into ``ctx.query``
        (invalid values answer 400 ``invalid_query``).
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
                    query_type=query,
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
        if command.method == "GET" and command.path == self.openapi_path:
            raise ValueError(f"GET {command.path} is the OpenAPI document's path (see openapi_path)")
        if command.rate_limit is not None:
            self.rate_limiter.validate(command.rate_limit)
        if command.shared_rate_limit is not None:
            self.rate_limiter.validate(command.shared_rate_limit)
        self._commands.append(command)
        self._openapi_cache.clear()

    def openapi(self, server_url: str | None = None) -> dict[str, Any]:
        """The OpenAPI 3.1 document of the declared commands (paths relative to the mount point).

        ``server_url`` (usually the mount path, e.g. ``"/api"``) becomes the document's server.
        """
        return openapi_document(
            self._commands,
            title=self.title,
            version=self.version,
            description=self.description,
            server_url=server_url,
        )

    def _openapi_bytes(self, root_path: str) -> bytes:
        cached = self._openapi_cache.get(root_path)
        if cached is None:
            if len(self._openapi_cache) >= 16:  # root paths come from the deployment, but stay bounded
                self._openapi_cache.clear()
            cached = json_encoder.encode(self.openapi(server_url=root_path or "/"))
            self._openapi_cache[root_path] = cached
        return cached

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
        path = route_path(scope)  # once: routing and the idempotency fingerprint both need it
        if self.openapi_path is not None and path == self.openapi_path and scope.get("method") == "GET":
            document = self._openapi_bytes(str(scope.get("root_path", "")))
            await send_reply(send, Reply(200, document))
            return
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
                request_id = clean_token(raw_value.decode("latin-1"), MAX_REQUEST_ID)
        if request_id is None:
            request_id = self.snowflakes.next_str()
        outcome = _Outcome()
        rate_headers: list[tuple[str, str]] = []
        try:
            reply = await self._pipeline(
                scope,
                path,
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
            reply = Reply(exc.status, json_encoder.encode(exc.body()), list(exc.headers))
            code = exc.code
        except RateLimited as exc:
            reply = exc.reply
            code = "rate_limited"
        except StorageError:
            logger.warning("rate limit storage failed (request %s)", request_id, exc_info=True)
            body = ErrorBody(
                code="rate_limiter_unavailable", message="Rate limiting is unavailable; retry later"
            )
            reply = Reply(503, json_encoder.encode(body))
            code = "rate_limiter_unavailable"
        except IdempotencyStoreUnavailable:
            logger.warning("idempotency store failed (request %s)", request_id, exc_info=True)
            body = ErrorBody(
                code="idempotency_unavailable", message="Idempotency store is unavailable; retry later"
            )
            reply = Reply(503, json_encoder.encode(body))
            code = "idempotency_unavailable"
        except ClientGone:
            await self._audit(outcome, request_id, scope, client, "client_disconnected", 0, started)
            return
        except Exception:
            command_name = outcome.command.name if outcome.command else None
            logger.exception("command %s failed (request %s)", command_name, request_id)
            body = ErrorBody(code="internal_error", message="Internal server error")
            reply = Reply(500, json_encoder.encode(body))
            code = "internal_error"
        reply.headers.extend(rate_headers)
        reply.headers.append(("x-request-id", request_id))
        await send_reply(send, reply)
        if reply.status in (401, 403, 429) and self.invalid_request_limit is not None and client:
            # Counted after answering: the guard's own bookkeeping never delays the response.
            try:
                await self._count_invalid(client)
            except StorageError:
                logger.warning("rate limit storage failed counting an invalid request", exc_info=True)
        await self._audit(outcome, request_id, scope, client, code, reply.status, started)

    async def _count_invalid(self, client: str) -> None:
        assert self.invalid_request_limit is not None
        decision = await self.rate_limiter.hit(
            f"invalid:{client}", self.invalid_request_limit, bucket="invalid-requests", scope="global"
        )
        if decision.remaining == 0:
            blocked = self._blocked
            blocked.pop(client, None)
            while len(blocked) >= _MAX_BLOCKED_IPS:
                del blocked[next(iter(blocked))]  # oldest block first
            blocked[client] = (decision.reset, decision.limit)

    def _guard_decision(self, client: str, now: float) -> RateLimitDecision | None:
        until, limit = self._blocked[client]
        if until <= now:
            del self._blocked[client]
            return None
        return RateLimitDecision(
            allowed=False,
            limit=limit,
            remaining=0,
            reset=until,
            reset_after=until - now,
            bucket="invalid-requests",
            scope="global",
        )

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
        sink = self.audit_sink
        if type(sink) is LoggingAuditSink and not sink.logger.isEnabledFor(sink.level):
            return  # the default sink would drop the record: do not build it (custom sinks get all)
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
            await sink(record)
        except Exception:
            logger.exception("audit sink failed (request %s)", request_id)

    def _route(self, path: str, method: str) -> tuple[Command, dict[str, str]]:
        allowed: list[str] = []
        for command in self._commands:
            match = command._regex.fullmatch(path)
            if match is None:
                continue
            if command.method == method:
                return command, match.groupdict()
            allowed.append(command.method)
        if allowed:
            exc = error(405, "method_not_allowed", f"Method {method} not allowed")
            exc.headers.append(("allow", ", ".join(sorted(set(allowed)))))
            raise exc
        raise error(404, "not_found", "Not found")

    async def _pipeline(
        self,
        scope: Scope,
        path: str,
        receive: Receive,
        outcome: _Outcome,
        rate_headers: list[tuple[str, str]],
        client: str | None,
        authorization: str | None,
        content_type: str | None,
        content_length: str | None,
        idempotency_key: str | None,
        request_id: str,
    ) -> Reply:
        limiter = self.rate_limiter
        now = time.time()
        # 0. Invalid-request guard: an IP that produced too many 401/403/429 is refused at once.
        # A local dict lookup, not a storage round trip: the block is recorded when the IP's
        # counter fills up (see _count_invalid).
        if self._blocked and client in self._blocked:
            guard = self._guard_decision(client, now)
            if guard is not None:
                raise RateLimited(guard, "You are being blocked from accessing the API temporarily.")

        # 1. Route and headers.
        command, params = self._route(path, scope.get("method", ""))
        outcome.command = command
        if command._decoder is not None:
            if content_type is None or not is_json(content_type):
                raise error(415, "unsupported_media_type", "Content-Type must be application/json")
            if content_length is not None:
                declared = content_length.strip()
                if declared.isdigit() and int(declared) > self.max_body_bytes:
                    raise error(413, "payload_too_large", f"Body exceeds {self.max_body_bytes} bytes")

        # 2. Authenticate.
        principal: Principal | None = None
        token = bearer_credentials(authorization)
        if token == "":
            raise unauthorized("Malformed Authorization header")
        if token is not None:
            try:
                principal = await self.authenticator(token)
            except AuthenticationError:
                principal = None
            if principal is None:
                raise unauthorized("Invalid token")
        elif not command.public:
            raise unauthorized("Authentication required")
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
                raise error(403, "forbidden", "Missing required scope")
            if channel is not None and not await self.channel_authorizer(principal, channel):
                raise error(403, "forbidden", "Missing access to this channel")
        if command.authorize is not None and not await command.authorize(ctx):
            raise error(403, "forbidden", "Missing permissions")

        # 4. Rate limit: the caller's global budget, then the route bucket (user, then shared).
        who = f"user:{principal.id}" if principal is not None else f"ip:{client}"
        overall = self.global_rate_limit if principal is not None else self.ip_rate_limit
        shown: RateLimitDecision | None = None
        has_route_limit = command.rate_limit is not None or command.shared_rate_limit is not None
        if overall is not None:
            if has_route_limit:
                # The headers will show the route bucket: only count here (one storage call).
                if not await limiter.acquire(f"global:{who}", overall):
                    refused = await limiter.peek(
                        f"global:{who}", overall, bucket="global", scope="global", now=now
                    )
                    refused.allowed = False
                    raise RateLimited(refused, "You are being rate limited.")
            else:
                shown = await limiter.hit(f"global:{who}", overall, bucket="global", scope="global", now=now)
                if not shown.allowed:
                    raise RateLimited(shown, "You are being rate limited.")
        if has_route_limit:
            fields = command._major
            major = params[fields[0]] if len(fields) == 1 else ":".join([params[p] for p in fields])
            if command.rate_limit is not None:
                shown = await limiter.hit(
                    f"route:{command.name}:{major}:{who}", command.rate_limit, bucket=command.name, now=now
                )
                if not shown.allowed:
                    raise RateLimited(shown, "You are being rate limited.")
            if command.shared_rate_limit is not None:
                shared = await limiter.hit(
                    f"shared:{command.name}:{major}",
                    command.shared_rate_limit,
                    bucket=f"{command.name}:shared",
                    scope="shared",
                    now=now,
                )
                if not shared.allowed:
                    raise RateLimited(shared, "You are being rate limited.")
        if shown is not None:
            rate_headers.extend(shown.headers())

        # 5. Convert the query string, then read and decode the body.
        if command._query is not None:
            ctx.query = command._query.decode(scope.get("query_string", b""))
        body: Any = None
        raw = b""
        nonce: str | None = None
        if command._decoder is not None:
            raw = await read_body(receive, self.max_body_bytes)
            try:
                body = command._decoder.decode(raw)
            except msgspec.ValidationError as exc:
                raise error(400, "invalid_body", "Invalid request body", validation_errors(exc)) from None
            except msgspec.DecodeError:
                raise error(400, "invalid_json", "Request body is not valid JSON") from None
            if b'"nonce"' in raw:
                nonce = body_nonce(raw)
        if idempotency_key is not None:
            key = clean_token(idempotency_key, MAX_IDEMPOTENCY_KEY)
            if key is None:
                raise error(
                    400,
                    "invalid_body",
                    "Invalid Idempotency-Key header",
                    {"Idempotency-Key": f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"},
                )
            if nonce is not None and nonce != key:
                raise error(
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
        fingerprint = request_fingerprint(command.method, path, raw)
        claim = await store.claim(scoped_key, fingerprint, self.idempotency_ttl)
        if claim.fingerprint != fingerprint:
            raise error(422, "idempotency_conflict", "This idempotency key was used with a different request")
        if claim.state == "full":
            full = error(503, "idempotency_store_full", "Too many requests with idempotency keys in flight")
            full.headers.append(("retry-after", "1"))
            raise full
        if claim.state == "in_progress":
            busy = error(409, "idempotency_in_progress", "A request with this idempotency key is in progress")
            busy.headers.append(("retry-after", "1"))
            raise busy
        if claim.state == "completed":
            assert claim.response is not None
            outcome.replay = True
            stored = claim.response
            return Reply(stored.status, stored.body, [*stored.headers, ("idempotent-replayed", "true")])
        # Pass the owner token only to a store that returned one: a store written before owners
        # existed keeps working with the three-argument calls.
        owned: dict[str, str] = {} if claim.owner is None else {"owner": claim.owner}
        done = False
        try:
            try:
                reply = await self._execute(ctx, body, outcome)
            except HTTPError as exc:
                if exc.status < 500:
                    # A deterministic refusal by the app is part of the key's answer too.
                    response = StoredResponse(exc.status, list(exc.headers), json_encoder.encode(exc.body()))
                    await store.complete(scoped_key, fingerprint, response, self.idempotency_ttl, **owned)
                    done = True
                raise
            stored_headers = [h for h in reply.headers if h[0] in ("x-event-id", "x-event-position")]
            response = StoredResponse(
                reply.status, [("content-type", "application/json"), *stored_headers], reply.body
            )
            await store.complete(scoped_key, fingerprint, response, self.idempotency_ttl, **owned)
            done = True
            return reply
        finally:
            if not done:
                # 5xx, bus unavailable, crash or cancellation: let a retry run for real.
                with anyio.CancelScope(shield=True):
                    await store.release(scoped_key, **owned)

    async def _execute(self, ctx: CommandContext, body: Any, outcome: _Outcome) -> Reply:
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
                raise error(503, "bus_unavailable", "The event bus is unavailable; retry later") from None
            receipts.append(EventReceipt(event_id, event_type, channel, position))
        outcome.event_ids = tuple(r.id for r in receipts)
        headers = [("content-type", "application/json")]
        if receipts:
            first = receipts[0]
            headers.append(("x-event-id", first.id))
            if first.position is not None:
                headers.append(("x-event-position", str(first.position)))
        if command.status == 204:
            return Reply(204, b"", headers)
        if not receipts and nonce is None:
            return Reply(command.status, json_encoder.encode(result if result is not None else {}), headers)
        if result is None:
            document: dict[str, Any] = {}
        elif isinstance(result, dict):
            document = dict(result)
        else:
            built = msgspec.to_builtins(result)
            if not isinstance(built, dict):
                if not receipts:
                    # A non-object answer (a list) cannot echo the nonce; idempotency still holds.
                    return Reply(command.status, json_encoder.encode(built), headers)
                raise TypeError(f"command {command.name!r} must return an object to carry an event receipt")
            document = built
        if receipts:
            document["event"] = receipts[0]
            if len(receipts) > 1:
                document["events"] = receipts
        if nonce is not None:
            document["nonce"] = nonce
        return Reply(command.status, json_encoder.encode(document), headers)
