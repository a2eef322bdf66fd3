"""The app-test harness (splitchat.testing) against the real Gateway, in-process, on both backends."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest

from splitchat import Gateway, InMemoryBus, Principal, StaticTokenAuthenticator, encode_event
from splitchat.testing import GatewayClosed, GatewayCommunicator, GatewayFaults

TOKEN = "harness-token"
AUTH = StaticTokenAuthenticator({TOKEN: Principal(id="7", name="tester")})


async def publish(bus: InMemoryBus, channel: str, n: int) -> None:
    await bus.publish(channel, encode_event(id=f"ev{n}", type="NUMBER", channel=channel, data={"n": n}))


async def test_identify_dispatch_heartbeat() -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH) as gateway:
        async with GatewayCommunicator(gateway) as gw:
            hello = await gw.connect()
            assert hello["d"]["heartbeat_interval"] == 41250
            ready = await gw.identify(TOKEN, ["room"])
            assert ready["s"] == 1 and ready["d"]["subscriptions"] == ["room"]
            await gw.receive_dispatch("PRESENCE_UPDATE")
            await publish(bus, "room", 1)
            frame = await gw.receive_dispatch("NUMBER")
            assert (frame["d"], frame["id"], frame["channel"], frame["s"]) == ({"n": 1}, "ev1", "room", 3)
            assert (await gw.heartbeat(3))["op"] == 11
            await gw.receive_nothing(0.05)


async def test_a_missing_frame_fails_the_test_instead_of_hanging() -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH) as gateway:
        async with GatewayCommunicator(gateway, timeout=0.2) as gw:
            await gw.connect()
            await gw.identify(TOKEN, [])
            with anyio.fail_after(2):  # the harness's own timeout fires well before this one
                with pytest.raises(TimeoutError, match="no frame from the gateway within 0.2 s"):
                    await gw.receive()


async def test_bad_token_and_protocol_errors_surface_as_close_codes() -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH) as gateway:
        async with GatewayCommunicator(gateway) as gw:
            await gw.connect()
            with pytest.raises(GatewayClosed) as info:
                await gw.identify("wrong", [])
            assert info.value.code == 4004
        async with GatewayCommunicator(gateway) as gw:
            await gw.connect()
            await gw.send_raw("{not json")
            assert await gw.wait_closed() == 4002


async def test_cut_then_resume_replays_what_was_missed() -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH) as gateway:
        async with GatewayCommunicator(gateway) as gw:
            await gw.connect()
            session_id = (await gw.identify(TOKEN, ["room"]))["d"]["session_id"]
            await gw.receive_dispatch("PRESENCE_UPDATE")
            await publish(bus, "room", 1)
            last = (await gw.receive_dispatch("NUMBER"))["s"]
            await gw.cut()
        for n in (2, 3):
            await publish(bus, "room", n)
        async with GatewayCommunicator(gateway) as gw:
            await gw.connect()
            await gw.resume(TOKEN, session_id, last)
            replay = [await gw.receive_dispatch() for _ in range(3)]
            assert [f["t"] for f in replay] == ["NUMBER", "NUMBER", "RESUMED"]
            assert [f["d"].get("n") for f in replay[:2]] == [2, 3]
            assert replay[2]["d"]["replayed"] == 2


async def test_stalled_reader_is_closed_as_a_slow_consumer() -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH, send_queue_frames=8) as gateway:
        async with GatewayCommunicator(gateway, buffer=1) as gw:
            await gw.connect()
            await gw.identify(TOKEN, ["room"])
            gw.stall()
            for n in range(40):
                await publish(bus, "room", n)
            # Wait for the condition itself (the gateway gives up on the reader WHILE it is still
            # stalled), not for a guessed amount of time; the timeout only bounds a hang.
            assert await gw.wait_close_attempted(timeout=10) == 4010
            gw.unstall()
            assert await gw.wait_closed() == 4010


@pytest.mark.parametrize(("fault", "op", "code"), [("reconnect", 7, 1012), ("invalidate_sessions", 9, 1000)])
async def test_gateway_faults_force_reconnect_and_invalid_session(fault: str, op: int, code: int) -> None:
    async with InMemoryBus() as bus, Gateway(bus, AUTH) as gateway:
        faults = GatewayFaults(gateway)
        async with GatewayCommunicator(faults) as gw:
            await gw.connect()
            await gw.identify(TOKEN, ["room"])
            await gw.receive_dispatch("PRESENCE_UPDATE")
            assert faults.open_connections == 1
            assert await getattr(faults, fault)() == 1
            frame = await gw.receive()
            assert frame["op"] == op
            assert await gw.wait_closed() == code


def test_docs_testing_example_runs() -> None:
    """The example in docs/testing.md is real: extract it and run it (on asyncio and trio)."""
    text = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/testing.md has no python example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "docs/testing.md", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    assert tests
    for backend in ("asyncio", "trio"):
        for test in tests:
            anyio.run(test, backend=backend)
