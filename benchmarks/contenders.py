"""The contenders: which server module, what it needs installed, and why it might be skipped."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ("CONTENDERS", "REFERENCE", "Contender")

NODE_DIR = Path(__file__).resolve().parent / "node"
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
    node_script: str | None = None
    """A Node.js peer: the script (under benchmarks/node) run with ``node`` instead of ``python -m``."""

    def command(self, python: str) -> list[str]:
        """The argv that starts this contender's server."""
        if self.node_script is not None:
            return ["node", str(NODE_DIR / self.node_script)]
        return [python, "-m", self.module]

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (a missing package or API), or ``None``."""
        if self.node_script is not None:
            if shutil.which("node") is None:
                return "node is not installed"
            for package in self.requires:
                if not (NODE_DIR / "node_modules" / package).is_dir():
                    return f"npm package {package!r} is missing (npm install --prefix benchmarks/node)"
            return None
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
        Contender("node ws", "benchmarks/node/ws_server.js", ("ws",), node_script="ws_server.js"),
        Contender(
            "splitchat",
            "benchmarks.servers.splitchat_server",
            ("splitchat", "uvicorn"),
            (("splitchat", "Gateway"), ("splitchat", "CommandEndpoint")),
            cross_node=("redis", "splitchat.bus.redis"),
        ),
        Contender(
            "splitchat-fast",
            "benchmarks.servers.splitchat_fast_server",
            ("splitchat", "uvicorn"),
            (("splitchat", "GatewayServer"), ("splitchat", "CommandEndpoint")),
            cross_node=("redis", "splitchat.bus.redis"),
        ),
    )
}
