"""Principals and the pluggable authentication used by both the endpoint and the gateway.

An *authenticator* is any async callable that turns a token into a :class:`Principal`, or
returns ``None`` (or raises :class:`AuthenticationError`) when the token is not valid. The
command endpoint takes the token from ``Authorization: Bearer``; the gateway from IDENTIFY /
RESUME. Tokens are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

__all__ = (
    "AuthenticationError",
    "Authenticator",
    "ChannelAuthorizer",
    "Principal",
    "StaticTokenAuthenticator",
    "allow_all_channels",
    "bearer_token",
)


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is acting: the identity an authenticator resolves a token to.

    ``id`` keys rate limits, idempotency and presence; ``public`` is what other users may see
    (sent in READY and presence updates), so keep secrets out of it.
    """

    id: str
    name: str | None = None
    scopes: frozenset[str] = frozenset()
    public: dict[str, Any] = msgspec.field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The public identity of this principal: ``{"id", "name", **public}``."""
        out: dict[str, Any] = {"id": self.id}
        if self.name is not None:
            out["name"] = self.name
        out.update(self.public)
        return out


class AuthenticationError(Exception):
    """Raised by an authenticator for a token that is malformed, unknown or expired."""


Authenticator = Callable[[str], Awaitable[Principal | None]]
"""``async (token) -> Principal | None``: resolve a credential; ``None`` means rejected."""

ChannelAuthorizer = Callable[[Principal, str], Awaitable[bool]]
"""``async (principal, channel) -> bool``: may this principal read/write this channel?"""


async def allow_all_channels(principal: Principal, channel: str) -> bool:
    """A :data:`ChannelAuthorizer` that grants every channel (the permissive default)."""
    return True


class StaticTokenAuthenticator:
    """Authenticate against a fixed token table, comparing in constant time.

    Every configured token is compared (no early exit), so the response time does not reveal
    how much of a guessed token was right. Suited to service tokens, tests and demos.
    """

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._tokens = [(token.encode(), principal) for token, principal in tokens.items()]

    async def __call__(self, token: str) -> Principal | None:
        candidate = token.encode()
        found: Principal | None = None
        for known, principal in self._tokens:
            if hmac.compare_digest(known, candidate):
                found = principal
        return found


def bearer_token(authorization: str | None) -> str | None:
    """Extract the token from an ``Authorization: Bearer <token>`` header value, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
