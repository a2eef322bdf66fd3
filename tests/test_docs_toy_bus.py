"""The toy bus worked example in docs/backends.md really passes the conformance kit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_DOC = Path(__file__).resolve().parent.parent / "docs" / "backends.md"


def _example_namespace() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", _DOC.read_text(encoding="utf-8"), flags=re.S)
    (example,) = [b for b in blocks if "class TestToyBus(BusConformance)" in b]
    namespace: dict[str, Any] = {"__name__": __name__}
    exec(compile(example, str(_DOC), "exec"), namespace)
    return namespace


TestToyBus = _example_namespace()["TestToyBus"]
