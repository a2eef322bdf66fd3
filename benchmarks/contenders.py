"""The contenders: which server module, what it needs installed, and why it might be skipped."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

__all__ = ("CONTENDERS", "REFERENCE", "Contender")

REFERENCE = "websockets.broadcast"
"""Ratios in the table are to this contender's median."""


@dataclass(frozen=True)
class Contender:
    """One server under test, started as ``python -m <module>``."""

    name: str
    module: str
    requires: tuple[str, ...]
    needs_attributes: tuple[tuple[str, str], ...] = ()
    cross_node: tuple[str, ...] | None = None
    """Modules needed for the two-node ``redis`` scenario; ``None``: the contender has no cross-node bus."""

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (a missing package or API), or ``None``."""
        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                return f"package {package!r} is not installed (pip install -r benchmarks/requirements.txt)"
        for module, attribute in self.needs_attributes:
            if not hasattr(importlib.import_module(module), attribute):
                return f"{module}.{attribute} does not exist yet on this branch"
        return None

    def cross_node_unavailable(self) -> str | None:
        """Why this contender cannot run the two-node ``redis`` scenario, or ``None``."""
        if self.cross_node is None:
            return "no cross-node bus (a single-process library)"
        for module in self.cross_node:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"module {module!r} is not available (needed for the Redis bus)"
        return None


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender(REFERENCE, "benchmarks.servers.websockets_broadcast", ("websockets",)),
        Contender(
            "starlette+broadcaster",
            "benchmarks.servers.starlette_broadcaster",
            ("starlette", "uvicorn", "broadcaster"),
            cross_node=("redis",),
        ),
        Contender(
            "python-socketio",
            "benchmarks.servers.socketio_server",
            ("socketio", "uvicorn", "starlette"),
            cross_node=("redis",),
        ),
        Contender(
            "splitchat",
            "benchmarks.servers.splitchat_server",
            ("splitchat", "uvicorn"),
            (("splitchat", "Gateway"), ("splitchat", "CommandEndpoint")),
            cross_node=("redis", "splitchat.bus.redis"),
        ),
    )
}
