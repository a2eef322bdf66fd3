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

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (a missing package or API), or ``None``."""
        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                return f"package {package!r} is not installed (pip install -r benchmarks/requirements.txt)"
        for module, attribute in self.needs_attributes:
            if not hasattr(importlib.import_module(module), attribute):
                return f"{module}.{attribute} does not exist yet on this branch"
        return None


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender(REFERENCE, "benchmarks.servers.websockets_broadcast", ("websockets",)),
        Contender(
            "starlette+broadcaster",
            "benchmarks.servers.starlette_broadcaster",
            ("starlette", "uvicorn", "broadcaster"),
        ),
        Contender(
            "python-socketio", "benchmarks.servers.socketio_server", ("socketio", "uvicorn", "starlette")
        ),
        Contender(
            "splitchat",
            "benchmarks.servers.splitchat_server",
            ("splitchat", "uvicorn"),
            (("splitchat", "Gateway"), ("splitchat", "CommandEndpoint")),
        ),
    )
}
