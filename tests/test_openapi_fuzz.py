"""Schemathesis fuzzes the example chat app's HTTP API from its own OpenAPI document.

A real uvicorn server on a loopback port; schemathesis generates requests from
``/api/openapi.json`` (valid and invalid ones), sends them with a valid bearer token and checks
every answer: no 5xx, documented status codes, content types, headers and response schemas.
Bounded: a fixed number of examples per operation, no shrinking time beyond Hypothesis' default.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from examples.chat.app import ChatConfig, build_app  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from .browser_support import serve_in_thread  # noqa: E402

LIFTED = ChatConfig(
    message_rate="10000/second",
    typing_rate="10000/second",
    global_rate="10000/second",
    login_rate="1000/minute",
)
APP = build_app(LIFTED)


# Schema-valid requests may legitimately be refused for reasons a schema cannot express:
# 400 for a cross-field rule (a body nonce that differs from the Idempotency-Key header) or an
# app rule (blank message content), 422 idempotency_conflict because the fuzzer reuses an
# Idempotency-Key value across different requests, which is exactly what 422 refuses.
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422", "429"]
            }
        }
    }
)
ENDPOINT = next(route.app for route in APP.routes if getattr(route, "path", None) == "/api")
schema = schemathesis.openapi.from_dict(ENDPOINT.openapi("/api"), config=CONFIG)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    with serve_in_thread(APP) as url:
        token = httpx.post(f"{url}/api/login", json={"name": "fuzzer"}, timeout=10).json()["token"]
        yield url, token


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_chat_api_conforms_to_its_openapi_document(case: Any, server: tuple[str, str]) -> None:
    url, token = server
    case.call_and_validate(base_url=url + "/api", headers={"Authorization": f"Bearer {token}"})
