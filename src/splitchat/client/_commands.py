"""The command (HTTP POST) side of the client: retries that never duplicate.

Every command gets one nonce, sent as ``Idempotency-Key`` on *every* attempt, so when a response
is lost and the command retried, the endpoint answers with the original receipt instead of
publishing a second event. Retries happen on network errors, 5xx and 429; the delay honours the
server's hint (:func:`retry_hint`) and otherwise uses full jitter. Attempts and total time are both bounded.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx
import msgspec

from ..bus import Position
from ._backoff import FullJitterBackoff

__all__ = ("CommandError", "CommandFailed", "EventReceipt", "Receipt", "RetryPolicy", "send_command")


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How :meth:`SplitchatClient.send` retries.

    ``max_attempts`` bounds tries (first one included); ``deadline`` bounds the total time in
    seconds (a retry whose wait would cross it is not made); ``min_delay``/``max_delay`` are the
    full-jitter backoff bounds used when the server gives no retry hint; ``max_retry_after``
    caps a server hint so a bogus header cannot park the caller for an hour.
    """

    max_attempts: int = 5
    deadline: float = 30.0
    min_delay: float = 0.2
    max_delay: float = 5.0
    max_retry_after: float = 60.0


class EventReceipt(msgspec.Struct, frozen=True, kw_only=True):
    """The event a command published: its stable id and where the bus put it."""

    id: str
    type: str | None
    channel: str | None
    position: Position | None


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """A command's successful answer.

    ``body`` is the handler's JSON (``None`` if the answer was not JSON), ``event`` the published
    event (``None`` for commands that publish nothing), ``nonce`` the idempotency key used on every
    attempt, ``attempts`` how many HTTP requests it took.
    """

    status: int
    body: Any
    event: EventReceipt | None
    nonce: str
    attempts: int


class CommandError(Exception):
    """A non-retryable 4xx answer. ``code``/``message``/``errors`` come from the JSON error body."""

    def __init__(self, status: int, body: Any) -> None:
        info = body if isinstance(body, Mapping) else {}
        self.status = status
        self.body = body
        self.code: str | None = info.get("code") if isinstance(info.get("code"), str) else None
        message = info.get("message")
        self.message: str = message if isinstance(message, str) else f"HTTP {status}"
        errors = info.get("errors")
        self.errors: dict[str, Any] = dict(errors) if isinstance(errors, Mapping) else {}
        super().__init__(f"{status} {self.code or ''}: {self.message}".replace("  ", " "))


class CommandFailed(Exception):
    """Retries were exhausted (attempts or deadline) on network errors, 5xx or 429.

    ``last_status`` is the last HTTP status (``None`` if the last attempt had no response).
    The command may or may not have been applied; re-sending it with the same ``nonce`` is safe.
    """

    def __init__(self, message: str, *, nonce: str, attempts: int, last_status: int | None) -> None:
        super().__init__(message)
        self.nonce = nonce
        self.attempts = attempts
        self.last_status = last_status


def new_nonce() -> str:
    """A fresh random nonce (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def retry_hint(response: httpx.Response, body: Any, max_seconds: float) -> float | None:
    """Seconds the server asked us to wait, or ``None`` without a usable hint.

    One rule, shared with the browser client: the precise body ``retry_after`` (float seconds)
    first, else ``X-RateLimit-Reset-After``, else ``Retry-After`` (whole seconds, so the least
    precise: taking the largest hint would turn every 0.3 s wait into 1 s); capped at
    ``max_seconds`` so a bogus hint cannot park the caller for an hour.
    """
    candidates: list[str | float | None] = []
    if isinstance(body, Mapping):
        value = body.get("retry_after")
        if isinstance(value, int | float) and not isinstance(value, bool):
            candidates.append(value)
    candidates += [response.headers.get("X-RateLimit-Reset-After"), response.headers.get("Retry-After")]
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            seconds = float(candidate)
        except ValueError:
            continue  # an HTTP-date Retry-After: try the next source
        if math.isfinite(seconds) and seconds >= 0:
            return min(seconds, max_seconds)
    return None


def _parse_body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return None


def _parse_position(value: Any) -> Position | None:
    if isinstance(value, Mapping):
        epoch, offset = value.get("epoch"), value.get("offset")
        if isinstance(epoch, str) and isinstance(offset, int) and not isinstance(offset, bool):
            return Position(epoch, offset)
    if isinstance(value, str):
        epoch, sep, offset_text = value.rpartition(":")
        if sep and offset_text.isdigit():
            return Position(epoch, int(offset_text))
    return None


def _parse_receipt(response: httpx.Response, body: Any) -> EventReceipt | None:
    info = body.get("event") if isinstance(body, Mapping) else None
    if isinstance(info, Mapping) and isinstance(info.get("id"), str):
        position = _parse_position(info.get("position"))
        if position is None:
            position = _parse_position(response.headers.get("X-Event-Position"))
        kind, channel = info.get("type"), info.get("channel")
        return EventReceipt(
            id=info["id"],
            type=kind if isinstance(kind, str) else None,
            channel=channel if isinstance(channel, str) else None,
            position=position,
        )
    event_id = response.headers.get("X-Event-Id")
    if event_id:
        return EventReceipt(
            id=event_id,
            type=None,
            channel=None,
            position=_parse_position(response.headers.get("X-Event-Position")),
        )
    return None


async def send_command(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    json: Any = None,
    *,
    nonce: str | None = None,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy,
    backoff: FullJitterBackoff,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> Receipt:
    """Send one command with bounded, idempotent retries (see the module docstring).

    ``sleep`` waits between attempts (tests pass a recording fake).
    """
    if nonce is None and isinstance(json, Mapping) and isinstance(json.get("nonce"), str):
        nonce = json["nonce"]
    key = nonce if nonce is not None else new_nonce()
    request_headers = {**(headers or {}), "Idempotency-Key": key}
    deadline = anyio.current_time() + policy.deadline
    attempts = 0
    while True:
        attempts += 1
        status: int | None = None
        hint: float | None = None
        problem: str
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                response = await http.request(method, url, json=json, headers=request_headers)
        except (httpx.TransportError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            status = response.status_code
            body = _parse_body(response)
            if status < 400:
                return Receipt(
                    status=status,
                    body=body,
                    event=_parse_receipt(response, body),
                    nonce=key,
                    attempts=attempts,
                )
            if status != 429 and status < 500:
                raise CommandError(status, body)
            hint = retry_hint(response, body, policy.max_retry_after)
            problem = f"HTTP {status}"
        if attempts >= policy.max_attempts:
            raise CommandFailed(
                f"gave up after {attempts} attempts ({problem})",
                nonce=key,
                attempts=attempts,
                last_status=status,
            )
        delay = backoff.next_delay() if hint is None else hint
        if anyio.current_time() + delay >= deadline:
            raise CommandFailed(
                f"deadline of {policy.deadline}s reached ({problem})",
                nonce=key,
                attempts=attempts,
                last_status=status,
            )
        await sleep(delay)
