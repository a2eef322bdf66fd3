"""The command endpoint's error vocabulary: one exception, stable codes, one JSON body shape.

Every non-2xx answer of the endpoint (except 429, which keeps Discord's body) is
``{"code": str, "message": str, "errors": {field_path: message}}`` so clients can switch on
``code`` without parsing prose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

__all__ = ("ErrorBody", "HTTPError")


class ErrorBody(msgspec.Struct, frozen=True):
    """The JSON body of an error response."""

    code: str
    message: str
    errors: dict[str, str] = msgspec.field(default_factory=dict)


class HTTPError(Exception):
    """Raise from a command handler (or hook) to answer with an error status and a stable code.

    Example: ``raise HTTPError(404, "unknown_channel", "Unknown channel")``. ``errors`` maps a
    JSON path (``$.content``) to a message; ``headers`` are added to the response.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str = "",
        *,
        errors: Mapping[str, str] | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"HTTPError status must be 4xx or 5xx, got {status}")
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message or code.replace("_", " ").capitalize()
        self.errors = dict(errors or {})
        self.headers = list(headers)

    def __repr__(self) -> str:
        return f"HTTPError({self.status}, {self.code!r}, {self.message!r})"

    def body(self) -> ErrorBody:
        """The JSON body of this error."""
        return ErrorBody(code=self.code, message=self.message, errors=self.errors)
