"""Test helpers for splitchat itself and for apps built on it."""

from __future__ import annotations

# --- app test harness (client branch) ---
from ._harness import ClientDisconnected, GatewayClosed, GatewayCommunicator, GatewayFaults, command_client

# --- end app test harness ---

__all__ = (
    # app test harness
    "ClientDisconnected",
    "GatewayClosed",
    "GatewayCommunicator",
    "GatewayFaults",
    "command_client",
    # end app test harness
)
