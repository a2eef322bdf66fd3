from __future__ import annotations

import types
from datetime import UTC, datetime

import pytest
from hypothesis import given, strategies as st

import splitchat
from splitchat import (
    SPLITCHAT_EPOCH_MS,
    Principal,
    SnowflakeGenerator,
    StaticTokenAuthenticator,
    bearer_token,
    snowflake_time,
)


def test_snowflakes_are_unique_sorted_and_carry_time() -> None:
    ms = SPLITCHAT_EPOCH_MS + 123_456
    gen = SnowflakeGenerator(worker_id=5, clock_ms=lambda: ms)
    ids = [gen.next_id() for _ in range(10_000)]  # > 4096 in one ms: borrows the next ms
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert (ids[0] >> 12) & 0x3FF == 5
    assert snowflake_time(ids[0]) == datetime.fromtimestamp(ms / 1000, tz=UTC)


def test_snowflake_survives_clock_going_backwards() -> None:
    times = iter([SPLITCHAT_EPOCH_MS + 1000, SPLITCHAT_EPOCH_MS + 10])
    gen = SnowflakeGenerator(clock_ms=lambda: next(times))
    assert gen.next_id() < gen.next_id()


def test_snowflake_worker_id_range() -> None:
    with pytest.raises(ValueError):
        SnowflakeGenerator(worker_id=1024)


async def test_static_token_authenticator() -> None:
    alice = Principal(id="1", name="alice")
    auth = StaticTokenAuthenticator({"secret-a": alice})
    assert await auth("secret-a") == alice
    assert await auth("secret-b") is None
    assert await auth("") is None


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_principal_identity_is_public_only() -> None:
    p = Principal(id="7", name="bob", scopes=frozenset({"admin"}), public={"avatar": "x"})
    assert p.identity() == {"id": "7", "name": "bob", "avatar": "x"}


def test_public_api_is_exported_and_documented() -> None:
    assert len(set(splitchat.__all__)) == len(splitchat.__all__)
    public = {n for n in vars(splitchat) if not n.startswith("_")} - {"annotations"}
    modules = {n for n in public if isinstance(getattr(splitchat, n), types.ModuleType)}
    assert public - modules == set(splitchat.__all__) - {"__version__"}
    for name in splitchat.__all__:
        obj = getattr(splitchat, name)
        if isinstance(obj, (type, types.FunctionType)):
            assert obj.__doc__, f"{name} has no docstring"


@given(st.one_of(st.none(), st.text(max_size=30), st.text(max_size=20).map(lambda t: "Bearer " + t)))
def test_bearer_credentials_agrees_with_bearer_token(header: str | None) -> None:
    from splitchat._http import bearer_credentials

    token = bearer_token(header)
    credentials = bearer_credentials(header)
    if token is not None:
        assert credentials == token
    elif header is not None and header.strip():
        assert credentials == ""  # present but malformed: a failed authentication
    else:
        assert credentials is None
