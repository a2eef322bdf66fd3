"""Typed query parameters of commands: conversion from strings, constraints, errors with field paths."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import httpx
import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from splitchat import CommandContext, CommandEndpoint, InMemoryBus, StaticTokenAuthenticator
from splitchat._errors import HTTPError
from splitchat._query import MAX_QUERY_FIELDS, QueryDecoder
from tests.endpoint_support import ALICE, AUTH, TOKEN, asgi_client


class Order(enum.Enum):
    ASC = "asc"
    DESC = "desc"


class SearchQuery(msgspec.Struct):
    q: Annotated[str, msgspec.Meta(min_length=1, max_length=50)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50
    before: int | None = None
    exact: bool = False
    order: Order = Order.DESC
    kind: Literal["text", "image"] | None = None
    tag: list[str] = []
    score: float | None = None


def build(bus: InMemoryBus) -> CommandEndpoint:
    endpoint = CommandEndpoint(bus=bus, authenticator=StaticTokenAuthenticator({TOKEN: ALICE}))

    @endpoint.command("GET", "/channels/{channel_id}/search", query=SearchQuery, name="search")
    async def search(ctx: CommandContext) -> dict[str, Any]:
        """Echo the converted query."""
        query: SearchQuery = ctx.query
        return {"channel": ctx.params["channel_id"], "query": msgspec.to_builtins(query)}

    @endpoint.command(
        "POST", "/channels/{channel_id}/notes", query=SearchQuery, body=dict[str, str], name="note"
    )
    async def note(ctx: CommandContext, body: dict[str, str]) -> dict[str, Any]:
        """A command with both a query and a body."""
        return {"limit": ctx.query.limit, "body": body}

    @endpoint.command("GET", "/plain", name="plain")
    async def plain(ctx: CommandContext) -> dict[str, Any]:
        """No query declared: the query string is ignored."""
        return {"query": ctx.query}

    return endpoint


@pytest.fixture
async def client() -> Any:
    async with asgi_client(build(InMemoryBus())) as http:
        yield http


async def test_query_strings_are_converted_to_typed_fields(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/channels/c1/search",
        params=[
            ("q", "hi there"),
            ("limit", "7"),
            ("before", "123"),
            ("exact", "true"),
            ("order", "asc"),
            ("kind", "image"),
            ("tag", "a"),
            ("tag", "b"),
            ("score", "1.5"),
            ("unknown", "ignored"),
        ],
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "channel": "c1",
        "query": {
            "q": "hi there",
            "limit": 7,
            "before": 123,
            "exact": True,
            "order": "asc",
            "kind": "image",
            "tag": ["a", "b"],
            "score": 1.5,
        },
    }


async def test_defaults_apply_when_parameters_are_absent(client: httpx.AsyncClient) -> None:
    response = await client.get("/channels/c1/search?q=x", headers=AUTH)
    assert response.json()["query"] == {
        "q": "x",
        "limit": 50,
        "before": None,
        "exact": False,
        "order": "desc",
        "kind": None,
        "tag": [],
        "score": None,
    }


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("", "$.q"),  # required field missing
        ("q=", "$.q"),  # min_length
        ("q=x&limit=0", "$.limit"),
        ("q=x&limit=101", "$.limit"),
        ("q=x&limit=ten", "$.limit"),
        ("q=x&limit=", "$.limit"),
        ("q=x&before=1.5", "$.before"),
        ("q=x&exact=maybe", "$.exact"),
        ("q=x&order=up", "$.order"),
        ("q=x&kind=video", "$.kind"),
        ("q=x&score=abc", "$.score"),
        ("q=x&limit=1&limit=2", "$.limit"),  # a scalar given twice is ambiguous
    ],
)
async def test_invalid_values_answer_400_invalid_query_with_the_field_path(
    client: httpx.AsyncClient, query: str, path: str
) -> None:
    response = await client.get(f"/channels/c1/search?{query}", headers=AUTH)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "invalid_query"
    assert list(body["errors"]) == [path]


async def test_malformed_and_oversized_query_strings_are_400(client: httpx.AsyncClient) -> None:
    not_utf8 = await client.get("/channels/c1/search?q=%ff%fe", headers=AUTH)
    assert not_utf8.status_code == 400 and not_utf8.json()["code"] == "invalid_query"
    many = "&".join(f"f{n}=1" for n in range(MAX_QUERY_FIELDS + 1))
    too_many = await client.get(f"/channels/c1/search?q=x&{many}", headers=AUTH)
    assert too_many.status_code == 400 and too_many.json()["code"] == "invalid_query"


async def test_query_is_checked_after_authentication(client: httpx.AsyncClient) -> None:
    # An anonymous caller learns nothing about the query's validity: 401 first.
    response = await client.get("/channels/c1/search?limit=zero")
    assert response.status_code == 401


async def test_query_and_body_together(client: httpx.AsyncClient) -> None:
    ok = await client.post("/channels/c1/notes?q=x&limit=3", json={"a": "b"}, headers=AUTH)
    assert ok.status_code == 200 and ok.json() == {"limit": 3, "body": {"a": "b"}}
    bad = await client.post("/channels/c1/notes?q=x&limit=-3", json={"a": "b"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_query"


async def test_commands_without_a_query_type_ignore_the_query_string(client: httpx.AsyncClient) -> None:
    response = await client.get("/plain?anything=%ff", headers=AUTH)
    assert response.status_code == 200 and response.json() == {"query": None}


def test_non_flat_query_types_are_refused_at_declaration() -> None:
    class Nested(msgspec.Struct):
        inner: SearchQuery

    class Mapping(msgspec.Struct):
        extra: dict[str, str]

    for bad in (Nested, Mapping, int, dict[str, str]):
        with pytest.raises(TypeError):
            QueryDecoder(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_query_strings_never_raise_anything_but_http_400(raw: bytes) -> None:
    decoder = QueryDecoder(SearchQuery)
    try:
        result = decoder.decode(raw)
    except HTTPError as exc:
        assert exc.status == 400 and exc.code == "invalid_query"
    else:
        assert isinstance(result, SearchQuery)
        assert 1 <= result.limit <= 100 and 1 <= len(result.q) <= 50
