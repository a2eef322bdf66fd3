"""The OpenAPI and AsyncAPI documents: valid against their specifications, complete, and true.

"Valid" is checked with openapi-spec-validator (OpenAPI 3.1) and with the official AsyncAPI
3.0.0 JSON Schema (vendored in tests/data) through jsonschema. "True" is checked by sending
real traffic: frames a real gateway sends and accepts validate against the AsyncAPI message
schemas, and HTTP answers validate against the OpenAPI response schemas.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
from examples.chat.app import EVENT_TYPES, ChatConfig, build_app
from hypothesis import given, settings, strategies as st
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from starlette.applications import Starlette
from starlette.routing import Mount
from websockets.sync.client import connect

from splitchat import (
    CommandContext,
    CommandEndpoint,
    GatewayConfig,
    InMemoryBus,
    StaticTokenAuthenticator,
    gateway_asyncapi,
)
from tests.endpoint_support import AUTH, asgi_client, build_endpoint

from .browser_support import serve_in_thread

ASYNCAPI_SCHEMA = json.loads((Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json").read_text())
LIFTED = ChatConfig(
    message_rate="1000/second", typing_rate="1000/second", global_rate="1000/second", login_rate="1000/minute"
)
ERROR_STATUSES = {"400", "401", "403", "404", "405", "409", "422", "429", "503"}


def asyncapi_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(ASYNCAPI_SCHEMA)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def validator_for(document: dict[str, Any], pointer: str) -> jsonschema.Draft202012Validator:
    """A validator for the schema at ``pointer`` whose ``#/components/...`` refs resolve in ``document``."""
    return jsonschema.Draft202012Validator({"$ref": f"#{pointer}", "components": document["components"]})


@pytest.fixture(scope="module")
def chat_server() -> Iterator[str]:
    with serve_in_thread(build_app(LIFTED)) as url:
        yield url


# ---- OpenAPI -------------------------------------------------------------------------------------------


def test_chat_openapi_document_is_served_and_valid(chat_server: str) -> None:
    response = httpx.get(f"{chat_server}/api/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document = response.json()
    validate_openapi(document)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": "/api"}]  # the mount point, from the ASGI root_path
    operations = {
        (method.upper(), path): op for path, item in document["paths"].items() for method, op in item.items()
    }
    assert set(operations) == {
        ("GET", "/channels"),
        ("GET", "/channels/{channel_id}/presence"),
        ("GET", "/channels/{channel_id}/messages"),
        ("POST", "/channels/{channel_id}/messages"),
        ("PATCH", "/channels/{channel_id}/messages/{message_id}"),
        ("DELETE", "/channels/{channel_id}/messages/{message_id}"),
        ("POST", "/channels/{channel_id}/typing"),
    }
    history = operations[("GET", "/channels/{channel_id}/messages")]
    params = {p.get("name", p.get("$ref")): p for p in history["parameters"]}
    assert params["channel_id"]["in"] == "path" and params["channel_id"]["required"] is True
    assert params["limit"] == {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
    }
    assert params["before"]["schema"]["type"] == "integer"  # the null branch of `int | None` is dropped
    assert {"#/components/parameters/IdempotencyKey", "#/components/parameters/RequestId"} <= set(params)
    create = operations[("POST", "/channels/{channel_id}/messages")]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateMessage"
    }
    assert set(create["responses"]) == {"200", "413", "415"} | ERROR_STATUSES
    assert create["responses"]["200"]["content"]["application/json"]["schema"]["allOf"][0] == {
        "$ref": "#/components/schemas/MessageObject"
    }
    assert "X-RateLimit-Remaining" in create["responses"]["200"]["headers"]
    delete = operations[("DELETE", "/channels/{channel_id}/messages/{message_id}")]
    assert "content" not in delete["responses"]["204"] and "requestBody" not in delete
    assert set(delete["responses"]) == {"204"} | ERROR_STATUSES  # no body: no 413/415
    components = document["components"]
    assert components["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": components["securitySchemes"]["bearerAuth"]["description"],
    }
    assert document["security"] == [{"bearerAuth": []}]
    assert components["responses"]["E429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RateLimitBody"
    }
    assert set(components["schemas"]["RateLimitBody"]["properties"]) == {"message", "retry_after", "global"}
    assert "Retry-After" in components["responses"]["E429"]["headers"]
    assert "WWW-Authenticate" in components["responses"]["E401"]["headers"]


def test_answers_validate_against_the_documented_response_schemas(chat_server: str) -> None:
    with httpx.Client(base_url=chat_server, timeout=10) as http:
        document = http.get("/api/openapi.json").json()
        token = http.post("/api/login", json={"name": "doc"}).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        paths = document["paths"]
        cases = [
            (http.get("/api/channels", headers=auth), paths["/channels"]["get"], "200"),
            (
                http.post(
                    "/api/channels/general/messages", json={"content": "x", "nonce": "n"}, headers=auth
                ),
                paths["/channels/{channel_id}/messages"]["post"],
                "200",
            ),
            (
                http.get("/api/channels/general/messages?limit=2", headers=auth),
                paths["/channels/{channel_id}/messages"]["get"],
                "200",
            ),
            (
                http.get("/api/channels/general/messages?limit=0", headers=auth),
                paths["/channels/{channel_id}/messages"]["get"],
                "400",
            ),
            (http.get("/api/channels"), paths["/channels"]["get"], "401"),
            (
                http.get("/api/channels/nope/presence", headers=auth),
                paths["/channels/{channel_id}/presence"]["get"],
                "404",
            ),
        ]
        for response, operation, status in cases:
            assert str(response.status_code) == status, response.text
            documented = operation["responses"][status]
            if "$ref" in documented:
                documented = document["components"]["responses"][documented["$ref"].rsplit("/", 1)[-1]]
            schema = documented["content"]["application/json"]["schema"]
            root = {**schema, "components": document["components"]}
            jsonschema.Draft202012Validator(root).validate(response.json())


def test_openapi_validator_rejects_a_broken_document() -> None:
    # The check can fail: a document without its info object, or with a dangling $ref, is refused.
    document = CommandEndpoint(bus=InMemoryBus(), authenticator=StaticTokenAuthenticator({})).openapi()
    validate_openapi(document)
    broken = {key: value for key, value in document.items() if key != "info"}
    with pytest.raises(OpenAPIValidationError):
        validate_openapi(broken)


async def test_endpoint_document_covers_every_declared_command() -> None:
    endpoint = build_endpoint(InMemoryBus())
    document = endpoint.openapi(server_url="/v1")
    validate_openapi(document)
    operation_ids = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    assert operation_ids == {command.name for command in endpoint.commands}
    status = document["paths"]["/status"]["get"]
    assert status["security"] == [{}, {"bearerAuth": []}]  # public: the token is optional
    broadcast = document["paths"]["/admin/broadcast"]["post"]
    assert broadcast["summary"] == "Needs the admin scope."
    async with asgi_client(endpoint) as client:
        served = await client.get("/openapi.json")
        assert served.status_code == 200 and served.json()["servers"] == [{"url": "/"}]
        assert (await client.get("/status", headers=AUTH)).status_code == 200


async def test_openapi_path_is_configurable_and_can_be_disabled() -> None:
    moved = CommandEndpoint(
        bus=InMemoryBus(),
        authenticator=StaticTokenAuthenticator({}),
        openapi_path="/docs/api.json",
        title="T",
    )
    hidden = CommandEndpoint(bus=InMemoryBus(), authenticator=StaticTokenAuthenticator({}), openapi_path=None)
    app = Starlette(routes=[Mount("/m", app=moved), Mount("/h", app=hidden)])
    async with asgi_client(app) as client:
        found = await client.get("/m/docs/api.json")
        assert found.status_code == 200 and found.json()["info"]["title"] == "T"
        assert found.json()["servers"] == [{"url": "/m"}]
        assert (await client.get("/m/openapi.json")).status_code == 404
        assert (await client.get("/h/openapi.json")).status_code == 404


def test_document_is_rebuilt_when_a_command_is_added() -> None:
    endpoint = CommandEndpoint(bus=InMemoryBus(), authenticator=StaticTokenAuthenticator({}))
    assert endpoint._openapi_bytes("/x") == endpoint._openapi_bytes("/x")

    @endpoint.command("GET", "/late", name="late")
    async def late(ctx: CommandContext) -> dict[str, Any]:
        """Added after the first request."""
        return {}

    assert "/late" in msgspec.json.decode(endpoint._openapi_bytes("/x"))["paths"]
    with pytest.raises(ValueError, match="OpenAPI"):

        @endpoint.command("GET", "/openapi.json", name="clash")
        async def clash(ctx: CommandContext) -> dict[str, Any]:
            """Shadows the document."""
            return {}


# ---- AsyncAPI ------------------------------------------------------------------------------------------


def test_chat_asyncapi_document_is_served_and_valid(chat_server: str) -> None:
    document = httpx.get(f"{chat_server}/asyncapi.json", timeout=10).json()
    assert asyncapi_errors(document) == []
    assert document["asyncapi"] == "3.0.0"
    messages = document["components"]["messages"]
    for key in (
        "HELLO",
        "IDENTIFY",
        "RESUME",
        "HEARTBEAT",
        "HEARTBEAT_ACK",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "RECONNECT",
        "INVALID_SESSION",
        "DISPATCH_READY",
        "DISPATCH_RESUMED",
        "DISPATCH_SUBSCRIBED",
        "DISPATCH_UNSUBSCRIBED",
        "DISPATCH_RATE_LIMITED",
        "DISPATCH_PRESENCE_UPDATE",
    ):
        assert key in messages
    for event_type in EVENT_TYPES:
        assert f"DISPATCH_{event_type}" in messages
    create = messages["DISPATCH_MESSAGE_CREATE"]["payload"]
    assert create["properties"]["d"] == {"$ref": "#/components/schemas/MessageObject"}
    assert create["properties"]["t"] == {"const": "MESSAGE_CREATE"}
    assert {"id", "channel"} <= set(create["required"])
    assert document["x-close-codes"]["4004"]["resumable"] is False
    assert document["x-close-codes"]["4009"]["resumable"] is True
    assert "heartbeat_interval=41250 ms" in document["info"]["description"]


def test_asyncapi_schema_check_can_fail() -> None:
    document = gateway_asyncapi()
    assert asyncapi_errors(document) == []
    assert asyncapi_errors({**document, "asyncapi": "2.6.0"})
    bad_operation = json.loads(json.dumps(document))
    bad_operation["operations"]["sendServerFrames"]["action"] = "publish"  # AsyncAPI 2 vocabulary
    assert asyncapi_errors(bad_operation)


def test_reserved_event_types_are_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        gateway_asyncapi(events={"READY": dict})


def test_real_gateway_frames_validate_against_the_asyncapi_messages(chat_server: str) -> None:
    """Every frame a real session sends or receives matches the message the document names for it."""
    document = httpx.get(f"{chat_server}/asyncapi.json", timeout=10).json()

    def check(frame: dict[str, Any]) -> str:
        key = (
            f"DISPATCH_{frame['t']}" if frame["op"] == 0 else {10: "HELLO", 11: "HEARTBEAT_ACK"}[frame["op"]]
        )
        validator_for(document, f"/components/messages/{key}/payload").validate(frame)
        return key

    with httpx.Client(base_url=chat_server, timeout=10) as http:
        token = http.post("/api/login", json={"name": "frames"}).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        seen: list[str] = []
        with connect(chat_server.replace("http", "ws") + "/gateway", open_timeout=10) as ws:

            def send(key: str, frame: dict[str, Any]) -> None:
                validator_for(document, f"/components/messages/{key}/payload").validate(frame)
                ws.send(json.dumps(frame))

            def receive_until(t: str) -> None:
                while True:
                    frame = json.loads(ws.recv(timeout=10))
                    seen.append(check(frame))
                    if frame.get("t") == t or (t == "HEARTBEAT_ACK" and frame["op"] == 11):
                        return

            seen.append(check(json.loads(ws.recv(timeout=10))))
            send("IDENTIFY", {"op": 2, "d": {"token": token, "subscriptions": ["general"], "properties": {}}})
            receive_until("READY")
            send("HEARTBEAT", {"op": 1, "d": 1})
            receive_until("HEARTBEAT_ACK")
            send("SUBSCRIBE", {"op": 12, "d": {"channels": ["random", "nope"]}})
            receive_until("SUBSCRIBED")
            created = http.post(
                "/api/channels/general/messages", json={"content": "hi", "nonce": "n1"}, headers=auth
            )
            receive_until("MESSAGE_CREATE")
            message_id = created.json()["id"]
            http.patch(f"/api/channels/general/messages/{message_id}", json={"content": "ho"}, headers=auth)
            receive_until("MESSAGE_UPDATE")
            http.post("/api/channels/random/typing", headers=auth)
            receive_until("TYPING_START")
            http.delete(f"/api/channels/general/messages/{message_id}", headers=auth)
            receive_until("MESSAGE_DELETE")
            send("UNSUBSCRIBE", {"op": 13, "d": {"channels": ["random"]}})
            receive_until("UNSUBSCRIBED")
        for key in (
            "HELLO",
            "DISPATCH_READY",
            "HEARTBEAT_ACK",
            "DISPATCH_SUBSCRIBED",
            "DISPATCH_MESSAGE_CREATE",
            "DISPATCH_MESSAGE_UPDATE",
            "DISPATCH_TYPING_START",
            "DISPATCH_MESSAGE_DELETE",
            "DISPATCH_UNSUBSCRIBED",
        ):
            assert key in seen


def test_a_frame_that_breaks_the_schema_is_caught() -> None:
    document = gateway_asyncapi()
    hello = validator_for(document, "/components/messages/HELLO/payload")
    good = {"op": 10, "d": msgspec.to_builtins(GatewayConfig().hello()), "s": None, "t": None}
    hello.validate(good)
    with pytest.raises(jsonschema.ValidationError):
        hello.validate({**good, "d": {"heartbeat_interval": "soon"}})
    with pytest.raises(jsonschema.ValidationError):
        validator_for(document, "/components/messages/IDENTIFY/payload").validate({"op": 2, "d": {}})


# ---- the payload Structs agree with the machine's own checks ------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
_channels = st.lists(st.text(min_size=0, max_size=3) | st.integers(0, 3), max_size=4) | _json_values


def _outcome(op: int, d: Any) -> bool:
    """Whether the sans-I/O machine accepts ``d`` for ``op`` (False: it closes with 4002)."""
    from splitchat import ClientFrame, GatewayConnection
    from splitchat._protocol import Authenticate, Close, ResumeLookup

    machine = GatewayConnection(GatewayConfig())
    machine.start(0.0)
    actions = machine.receive_frame(ClientFrame(op=op, d=d), 0.0)
    if any(isinstance(a, Close) and a.code == 4002 for a in actions):
        return False
    assert any(isinstance(a, Authenticate | ResumeLookup) for a in actions), actions
    return True


def _struct_accepts(kind: Any, d: Any) -> bool:
    try:
        msgspec.convert(d, kind)
    except msgspec.ValidationError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={"token": st.text(max_size=3) | st.integers(0, 2) | st.none(), "subscriptions": _channels},
    )
    | _json_values
)
def test_identify_struct_agrees_with_the_machine(d: Any) -> None:
    from splitchat import IdentifyPayload as Identify

    assert _outcome(2, d) == _struct_accepts(Identify, d)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "token": st.text(max_size=3) | st.none(),
            "session_id": st.text(max_size=3) | st.integers(0, 2),
            "seq": st.integers(-2, 3) | st.booleans() | st.floats(0, 2) | st.text(max_size=2),
        },
    )
    | _json_values
)
def test_resume_struct_agrees_with_the_machine(d: Any) -> None:
    from splitchat import ResumePayload as Resume

    assert _outcome(6, d) == _struct_accepts(Resume, d)
