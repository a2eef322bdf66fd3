"""Test helpers for code built on splitchat.

:class:`BusConformance` is the bus conformance kit: subclass it in a pytest module, give it a
``bus`` fixture, and every contract check of :mod:`splitchat.bus` runs against your bus.
This package imports pytest; it is meant for test suites only.
"""

from __future__ import annotations

from ._conformance import BusConformance

# --- app test harness (client branch) ---
from ._harness import ClientDisconnected, GatewayClosed, GatewayCommunicator, GatewayFaults, command_client

# --- end app test harness ---

__all__ = (
    "BusConformance",
    # app test harness
    "ClientDisconnected",
    "GatewayClosed",
    "GatewayCommunicator",
    "GatewayFaults",
    "command_client",
    # end app test harness
)
