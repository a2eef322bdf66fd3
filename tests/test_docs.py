"""The documentation site builds cleanly, and every Python sample in it runs.

* ``mkdocs build --strict`` into a temporary directory: no broken link, no missing page, no
  warning (skipped when mkdocs is not installed).
* Every fenced block in docs/*.md and README.md declares a language, so Python cannot hide in
  an unlabelled fence; every ```python block is executed. A block that defines
  ``async def main(...)`` has it run; its parameters are fixtures (``base_url`` and ``token``:
  the example chat app on a real uvicorn server and a login token for it).
* docs/quickstart.md and docs/testing.md have their own tests, which drive their samples
  further (tests/test_quickstart.py, tests/test_testing_harness.py); they are not run twice.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .browser_support import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
TESTED_ELSEWHERE = {
    "docs/quickstart.md": "tests/test_quickstart.py",
    "docs/testing.md": "tests/test_testing_harness.py",
}
FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def fences(path: Path) -> list[tuple[int, str, str]]:
    """(line number, language, body) of every fenced block of a page."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m["lang"].strip(), m["body"]) for m in FENCE.finditer(text)]


def python_blocks() -> list[Any]:
    params = []
    for path in PAGES:
        relative = path.relative_to(ROOT).as_posix()
        for line, lang, body in fences(path):
            if lang == "python" and relative not in TESTED_ELSEWHERE:
                params.append(pytest.param(relative, line, body, id=f"{relative}:{line}"))
    return params


def test_every_fence_declares_a_language() -> None:
    unlabelled = [f"{p.relative_to(ROOT)}:{line}" for p in PAGES for line, lang, _ in fences(p) if not lang]
    assert unlabelled == []


def test_pages_tested_elsewhere_still_have_their_samples() -> None:
    for page, test_file in TESTED_ELSEWHERE.items():
        assert any(lang == "python" for _, lang, _ in fences(ROOT / page)), page
        assert Path(page).name in (ROOT / test_file).read_text()


@pytest.fixture(scope="module")
def chat_server() -> Iterator[str]:
    from examples.chat.app import ChatConfig, build_app

    with serve_in_thread(build_app(ChatConfig())) as url:
        yield url


@pytest.mark.parametrize(("page", "line", "source"), python_blocks())
def test_python_sample_runs(page: str, line: int, source: str, request: pytest.FixtureRequest) -> None:
    # Run as a real module (msgspec resolves a Struct's annotations through its module), and pad
    # with the lines above the block so that tracebacks point at the page's line numbers.
    module = types.ModuleType(f"docs_sample_{Path(page).stem.replace('-', '_')}_{line}")
    sys.modules[module.__name__] = module
    try:
        exec(compile("\n" * line + source, page, "exec"), module.__dict__)
        run_main(module.__dict__.get("main"), page, line, request)
    finally:
        del sys.modules[module.__name__]


def run_main(main: Any, page: str, line: int, request: pytest.FixtureRequest) -> None:
    if main is None:
        return
    assert inspect.iscoroutinefunction(main), f"{page}:{line}: main must be async"
    kwargs: dict[str, Any] = {}
    wanted = inspect.signature(main).parameters
    if wanted:
        base_url = request.getfixturevalue("chat_server")
        token = httpx.post(f"{base_url}/api/login", json={"name": "docs"}, timeout=10).json()["token"]
        available = {"base_url": base_url, "token": token}
        kwargs = {name: available[name] for name in wanted}

    async def run() -> None:
        with anyio.fail_after(20):
            await main(**kwargs)

    anyio.run(run, backend="asyncio")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")
def test_docs_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr
    index = (tmp_path / "site" / "index.html").read_text()
    assert "Why POST in and WebSocket out?" in index
    assert (tmp_path / "site" / "img" / "architecture.svg").exists()
