"""Typed query parameters of a command: a msgspec Struct filled from the query string.

The query string is parsed into ``{name: str}`` (``{name: [str, ...]}`` for a field whose type is
a list, set or tuple, so ``?tag=a&tag=b`` works) and converted with
``msgspec.convert(..., strict=False)``: ``"50"`` becomes ``50`` for an ``int`` field and
``"true"`` becomes ``True`` for a ``bool``, while constraints (``msgspec.Meta(ge=1, le=100)``)
are checked exactly as for bodies. A value that does not convert answers 400 ``invalid_query``
with the field path (``{"$.limit": "Expected `int` >= 1"}``), never a 500.

Only flat Structs are accepted (each field a scalar, an optional scalar or a sequence of
scalars) because a query string has no nesting: the restriction is checked at declaration, so
a command that cannot be called is refused at import time rather than at the first request.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import msgspec
import msgspec.inspect as mi

from ._errors import HTTPError
from ._http import validation_errors

__all__ = ("QueryDecoder",)

# A query string with more pairs than this is refused (400): parsing cost stays bounded.
MAX_QUERY_FIELDS = 100

_SCALARS = (
    mi.StrType,
    mi.IntType,
    mi.FloatType,
    mi.BoolType,
    mi.NoneType,
    mi.LiteralType,
    mi.EnumType,
    mi.DecimalType,
    mi.DateTimeType,
    mi.DateType,
    mi.TimeType,
    mi.UUIDType,
)
_SEQUENCES = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)


def _is_scalar(info: mi.Type) -> bool:
    if isinstance(info, mi.UnionType):
        return all(isinstance(member, _SCALARS) for member in info.types)
    return isinstance(info, _SCALARS)


class QueryDecoder:
    """Converts a raw ASGI ``query_string`` into an instance of a flat msgspec Struct."""

    __slots__ = ("fields", "multi", "type")

    def __init__(self, query_type: Any) -> None:
        info = mi.type_info(query_type)
        if not isinstance(info, mi.StructType):
            raise TypeError(f"query type must be a msgspec.Struct, got {query_type!r}")
        multi: set[str] = set()
        for field in info.fields:
            if isinstance(field.type, _SEQUENCES) and _is_scalar(field.type.item_type):
                multi.add(field.encode_name)
            elif not _is_scalar(field.type):
                raise TypeError(
                    f"query field {field.name!r} of {query_type.__name__} must be a scalar "
                    "or a sequence of scalars (a query string has no nesting)"
                )
        self.type = query_type
        self.fields: tuple[mi.Field, ...] = info.fields
        self.multi = frozenset(multi)

    def decode(self, query_string: bytes) -> Any:
        """The Struct for this query string, or :class:`HTTPError` 400 ``invalid_query``."""
        try:
            pairs = parse_qsl(
                query_string.decode("latin-1"),
                keep_blank_values=True,
                errors="strict",
                max_num_fields=MAX_QUERY_FIELDS,
            )
        except (ValueError, UnicodeDecodeError):  # too many fields, or percent-encoded non-UTF-8
            raise HTTPError(
                400, "invalid_query", f"Query string is malformed or has over {MAX_QUERY_FIELDS} fields"
            ) from None
        values: dict[str, Any] = {}
        for name, value in pairs:
            if name in self.multi:
                values.setdefault(name, []).append(value)
            elif name in values:
                raise HTTPError(
                    400, "invalid_query", "Invalid query parameters", errors={f"$.{name}": "given twice"}
                )
            else:
                values[name] = value
        try:
            return msgspec.convert(values, self.type, strict=False)
        except msgspec.ValidationError as exc:
            raise HTTPError(
                400, "invalid_query", "Invalid query parameters", errors=validation_errors(exc)
            ) from None
