"""OpenAPI 3.1 document of a command endpoint, generated from its declared commands.

Pure: a function of the :class:`~splitchat._commands.Command` records and a few strings, so it
is testable without a server and the endpoint only caches and serves its JSON. Every schema
comes from msgspec's own JSON Schema generator (the same types that decode the requests), so
the document cannot drift from what the endpoint actually accepts.

The document states everything the pipeline can answer, not only the happy path: each
operation lists the error statuses the pipeline produces (400, 401, 403, 404, 405, 409, 413,
415, 422, 429, 503) with the shared error body (``ErrorBody``) or Discord's 429 body
(``RateLimitBody``), the rate-limit headers, the idempotency and request-id headers, and the
bearer security scheme. That completeness is what API fuzzers (schemathesis) need: an
undocumented status is a finding, so every documented one must be real and vice versa.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from ._commands import Command, EventReceipt
from ._errors import ErrorBody
from ._http import MAX_IDEMPOTENCY_KEY, MAX_REQUEST_ID, RateLimitBody

__all__ = ("openapi_document",)

REF = "#/components/schemas/{name}"
SECURITY_SCHEME = "bearerAuth"

# Error statuses every operation can produce, with what produces them (the response descriptions).
_COMMON_ERRORS: dict[int, str] = {
    400: "Invalid request: `invalid_body`, `invalid_json`, `invalid_query`, or an error the handler raised",
    401: "Missing, malformed or invalid bearer token (`unauthorized`; `WWW-Authenticate: Bearer`)",
    403: "Authenticated but not allowed (`forbidden`): missing scope, channel access or permission",
    404: "Unknown route or a resource the handler did not find (`not_found`, app codes)",
    405: "The path exists with other methods (`method_not_allowed`; see the `Allow` header)",
    409: "A request with the same idempotency key is still running (`idempotency_in_progress`)",
    422: "The idempotency key was used with a different request (`idempotency_conflict`)",
    503: (
        "The event bus, the rate limiter or room in the idempotency store is unavailable "
        "(`bus_unavailable`, `rate_limiter_unavailable`, `idempotency_store_full`)"
    ),
}
_BODY_ERRORS: dict[int, str] = {
    413: "The body exceeds the endpoint's `max_body_bytes` (`payload_too_large`)",
    415: "The body is not JSON (`unsupported_media_type`): send `Content-Type: application/json`",
}


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "schema": schema}


_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": _header(
        "The request id (echoed from the request when it is 1-128 printable ASCII characters, "
        "else generated); it is in the audit record",
        {"type": "string"},
    ),
    "X-RateLimit-Limit": _header("Requests allowed in the bucket's window", {"type": "integer"}),
    "X-RateLimit-Remaining": _header("Requests left in the current window", {"type": "integer"}),
    "X-RateLimit-Reset": _header("Epoch seconds (3 decimals) when the bucket resets", {"type": "string"}),
    "X-RateLimit-Reset-After": _header("Seconds (3 decimals) until the bucket resets", {"type": "string"}),
    "X-RateLimit-Bucket": _header("The bucket these headers describe", {"type": "string"}),
    "X-RateLimit-Scope": _header(
        "Who shares the exhausted bucket", {"type": "string", "enum": ["user", "global", "shared"]}
    ),
    "X-RateLimit-Global": _header("Present (`true`) when the global limit was hit", {"type": "string"}),
    "Retry-After": _header("Whole seconds to wait before retrying", {"type": "integer"}),
    "X-Event-Id": _header("Id of the first event the command published", {"type": "string"}),
    "X-Event-Position": _header(
        "Bus position (`epoch:offset`) of the first event the command published", {"type": "string"}
    ),
    "Idempotent-Replayed": _header(
        "`true` when this is the stored answer of an earlier request", {"type": "string"}
    ),
    "WWW-Authenticate": _header("`Bearer`", {"type": "string"}),
    "Allow": _header("The methods the path accepts", {"type": "string"}),
}
_RATE_HEADERS = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-RateLimit-Reset-After",
    "X-RateLimit-Bucket",
)

_PARAMETERS: dict[str, dict[str, Any]] = {
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes a retry safe: the first answer is stored and replayed for the same key "
        "(same as a body `nonce`; both given must be equal).",
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_IDEMPOTENCY_KEY,
            "pattern": "^[\\x20-\\x7e]+$",
        },
    },
    "RequestId": {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": f"A client-chosen request id for tracing, echoed back when it is 1-{MAX_REQUEST_ID} "
        "printable ASCII characters (any other value is replaced by a generated id, never refused).",
        "schema": {"type": "string"},
    },
}


class CommandEnvelope(msgspec.Struct):
    """Members the endpoint adds to an object answer of a command that published or had a nonce."""

    event: EventReceipt | None = None
    events: list[EventReceipt] | None = None
    nonce: str | None = None


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


def _header_refs(names: Iterable[str]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        resolved: dict[str, Any] = components.get(ref.rsplit("/", 1)[-1], {})
        return resolved
    return schema


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    # A query string cannot say null: an optional field is simply absent, so drop the null branch.
    schema = {key: value for key, value in schema.items() if not (key == "default" and value is None)}
    options = schema.get("anyOf")
    if isinstance(options, list):
        kept = [option for option in options if option != {"type": "null"}]
        del schema["anyOf"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept
    return schema


def _query_parameters(
    command: Command, query: dict[str, Any] | None, components: dict[str, Any]
) -> list[dict[str, Any]]:
    # The query Struct's component schema already holds each field's constraints and default.
    decoder = command._query
    if decoder is None or query is None:
        return []
    schema = _resolve(query, components)
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    parameters = []
    for name, field_schema in properties.items():
        field_schema = _without_null(field_schema)
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": field_schema,
        }
        if name in decoder.multi:
            parameter["style"] = "form"
            parameter["explode"] = True
        parameters.append(parameter)
    return parameters


def _operation(
    command: Command,
    body: dict[str, Any] | None,
    query: dict[str, Any] | None,
    response: dict[str, Any] | None,
    components: dict[str, Any],
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {
            "name": param,
            "in": "path",
            "required": True,
            # Any non-empty segment without "/"; control characters are excluded because an
            # enclosing router (Starlette's Mount matches with ".*") may not route a newline.
            "schema": {"type": "string", "minLength": 1, "pattern": "^[^/\\x00-\\x1f\\x7f]+$"},
        }
        for param in command.params
    ]
    parameters += _query_parameters(command, query, components)
    parameters += [
        {"$ref": "#/components/parameters/IdempotencyKey"},
        {"$ref": "#/components/parameters/RequestId"},
    ]
    operation: dict[str, Any] = {
        "operationId": command.name,
        "summary": command.summary or command.name,
        "parameters": parameters,
    }
    doc = (command.handler.__doc__ or "").strip()
    if doc and doc != command.summary:
        operation["description"] = doc
    if command.public:
        operation["security"] = [{}, {SECURITY_SCHEME: []}]
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    success_headers = _header_refs(
        ("X-Request-Id", *_RATE_HEADERS, "X-Event-Id", "X-Event-Position", "Idempotent-Replayed")
    )
    success: dict[str, Any] = {"description": command.summary or "Success", "headers": success_headers}
    if command.status != 204:
        if response is None:
            schema: dict[str, Any] = {}
        elif _resolve(response, components).get("type") == "object":
            # Published events and an idempotency nonce are added to object answers.
            schema = {"allOf": [response, _ref("CommandEnvelope")]}
        else:
            schema = response
        success["content"] = _json(schema)
    responses: dict[str, Any] = {str(command.status): success}
    errors = dict(_COMMON_ERRORS)
    if body is not None:
        errors.update(_BODY_ERRORS)
    for status in sorted([*errors, 429]):
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    operation["responses"] = responses
    return operation


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, description in {**_COMMON_ERRORS, **_BODY_ERRORS}.items():
        headers = ["X-Request-Id", *_RATE_HEADERS]
        if status == 401:
            headers.append("WWW-Authenticate")
        elif status == 405:
            headers.append("Allow")
        elif status == 409:
            headers.append("Retry-After")
        responses[f"E{status}"] = {
            "description": description,
            "headers": _header_refs(headers),
            "content": _json(_ref("ErrorBody")),
        }
    responses["E429"] = {
        "description": "Rate limited: wait `retry_after` seconds (Discord's body, not the error body)",
        "headers": _header_refs(
            ("X-Request-Id", *_RATE_HEADERS, "Retry-After", "X-RateLimit-Scope", "X-RateLimit-Global")
        ),
        "content": _json(_ref("RateLimitBody")),
    }
    return responses


def openapi_document(
    commands: Sequence[Command],
    *,
    title: str = "splitchat API",
    version: str = "1.0.0",
    description: str | None = None,
    server_url: str | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-ready dict) of ``commands``.

    Paths are relative to the endpoint's mount point; ``server_url`` (for example the mount
    path ``"/api"``) becomes the document's single server.
    """
    types: list[Any] = [ErrorBody, RateLimitBody, CommandEnvelope]
    # Order matters: the schemas are consumed below in this same order (body, response, query).
    types.extend(
        declared
        for command in commands
        for declared in (command.body_type, command.response_type, command.query_type)
        if declared is not None
    )
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    by_type = iter(schemas[3:])
    paths: dict[str, dict[str, Any]] = {}
    for command in commands:
        body = next(by_type) if command.body_type is not None else None
        response = next(by_type) if command.response_type is not None else None
        query = next(by_type) if command.query_type is not None else None
        operation = _operation(command, body, query, response, components)
        paths.setdefault(command.path, {})[command.method.lower()] = operation
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    document: dict[str, Any] = {"openapi": "3.1.0", "info": info}
    if server_url is not None:
        document["servers"] = [{"url": server_url or "/"}]
    document["paths"] = paths
    document["components"] = {
        "schemas": components,
        "responses": _error_responses(),
        "parameters": _PARAMETERS,
        "headers": _HEADERS,
        "securitySchemes": {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <token>`, resolved by the app's authenticator",
            }
        },
    }
    document["security"] = [{SECURITY_SCHEME: []}]
    return document
