"""HTTP plumbing of the command endpoint: reading and validating request pieces, sending replies.

Pure helpers and small value types with no knowledge of commands, so the endpoint module keeps
only the pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec

from ._auth import bearer_token
from ._errors import HTTPError
from ._ratelimit import RateLimitDecision
from ._types import Message, Receive, Scope, Send

_VALIDATION_PATH = re.compile(r"^(?P<msg>.*) - at `(?P<path>\$[^`]*)`$", re.DOTALL)
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
MAX_NONCE = 64
MAX_IDEMPOTENCY_KEY = 255
MAX_REQUEST_ID = 128

json_encoder = msgspec.json.Encoder()


class _NonceProbe(msgspec.Struct):
    # Reads only the "nonce" member of an object body, whatever the command's body type is.
    nonce: str | int | None = None


_nonce_decoder = msgspec.json.Decoder(_NonceProbe)


class Reply:
    """A response under construction (status, headers as str pairs, body bytes)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []


class ClientGone(Exception):
    """The client disconnected before the request body was read."""


def error(status: int, code: str, message: str, errors: Mapping[str, str] | None = None) -> HTTPError:
    """An :class:`HTTPError` with the endpoint's stable error body."""
    return HTTPError(status, code, message, errors=errors)


def validation_errors(exc: msgspec.ValidationError) -> dict[str, str]:
    """``{json_path: message}`` from msgspec's message (``... - at `$.content```)."""
    text = str(exc)
    path = "$"
    match = _VALIDATION_PATH.match(text)
    if match:
        text, path = match.group("msg"), match.group("path")
    missing = _MISSING_FIELD.match(text)
    if missing:
        return {f"{path}.{missing.group('field')}": "This field is required"}
    return {path: text}


def is_json(content_type: str) -> bool:
    """Whether a Content-Type is JSON (``application/json`` or ``application/*+json``, any parameters)."""
    if content_type == "application/json":
        return True  # what nearly every client sends: skip the parsing
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def clean_token(value: str, max_len: int) -> str | None:
    """``value`` if it is 1..max_len printable ASCII characters (safe to echo and to key on), else None."""
    if 0 < len(value) <= max_len and value.isascii() and value.isprintable():
        return value
    return None


class RateLimited(Exception):
    """Internal: answer 429 with Discord's body (not the error format) and the limit's headers."""

    def __init__(self, decision: RateLimitDecision, message: str) -> None:
        body = RateLimitBody(message, decision.retry_after, decision.scope == "global")
        self.reply = Reply(429, json_encoder.encode(body), [("content-type", "application/json")])
        self.reply.headers.extend(decision.headers())


class RateLimitBody(msgspec.Struct):
    """Discord's 429 body: ``{"message", "retry_after", "global"}``."""

    message: str
    retry_after: float
    # "global" is a Python keyword: the attribute is renamed, the JSON member is not.
    is_global: bool = msgspec.field(name="global")


def unauthorized(message: str) -> HTTPError:
    """A 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``."""
    exc = error(401, "unauthorized", message)
    exc.headers.append(("www-authenticate", "Bearer"))
    return exc


def bearer_credentials(authorization: str | None) -> str | None:
    """The bearer token; ``None`` when absent; ``""`` when the header is present but malformed."""
    token = bearer_token(authorization)
    if token is None and authorization and authorization.strip():
        # A malformed Authorization header is a failed authentication, not an absent one.
        return ""
    return token


def body_nonce(raw: bytes) -> str | None:
    """The top-level ``nonce`` of a JSON object body, normalised to str (400 when it is invalid)."""
    try:
        probe = _nonce_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        errors = validation_errors(exc)
        if "$.nonce" not in errors:
            return None  # the body is not an object (a list body): it has no nonce member
        raise error(400, "invalid_body", "Invalid nonce", errors) from None
    except msgspec.DecodeError:  # pragma: no cover - the body already decoded as JSON
        return None
    if probe.nonce is None:
        return None
    nonce = str(probe.nonce)
    if clean_token(nonce, MAX_NONCE) is None:
        raise error(
            400,
            "invalid_body",
            "Invalid nonce",
            {"$.nonce": f"must be 1 to {MAX_NONCE} printable ASCII characters"},
        )
    return nonce


def route_path(scope: Scope) -> str:
    """The request path relative to the mount point."""
    # Same rule as Starlette's Mount: strip root_path when the server kept it in path.
    path: str = scope.get("path", "/")
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        if path == root_path:
            return "/"
        if path[len(root_path)] == "/":
            return path[len(root_path) :]
    return path


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the body, refusing (413) as soon as it exceeds ``limit``: never buffers more than that."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise error(413, "payload_too_large", f"Body exceeds {limit} bytes")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


_ENCODED_NAMES: dict[str, bytes] = {
    name: name.encode("latin-1")
    for name in (
        "content-type",
        "x-event-id",
        "x-event-position",
        "x-request-id",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-reset-after",
        "x-ratelimit-bucket",
        "x-ratelimit-scope",
        "x-ratelimit-global",
        "retry-after",
        "allow",
        "www-authenticate",
        "idempotent-replayed",
    )
}
_JSON = b"application/json"


async def send_reply(send: Send, reply: Reply) -> None:
    """Send ``reply`` as ASGI messages (adds Content-Length and a JSON Content-Type)."""
    names = _ENCODED_NAMES
    has_type = False
    headers: list[tuple[bytes, bytes]] = []
    for name, value in reply.headers:
        encoded = names.get(name)
        if encoded is None:
            encoded = name.encode("latin-1")
        if name == "content-type":
            has_type = True
            # The endpoint's own Content-Type is always this one: skip encoding it.
            headers.append((encoded, _JSON if value == "application/json" else value.encode("latin-1")))
        else:
            headers.append((encoded, value.encode("latin-1")))
    if reply.status != 204:
        headers.append((b"content-length", b"%d" % len(reply.body)))
        if not has_type:
            headers.append((b"content-type", _JSON))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body if reply.status != 204 else b""})
