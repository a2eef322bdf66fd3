"""Serve the browser client (``splitchat.js``) that ships inside the package.

The module is a plain ES module with no build step, so any Starlette app can mount the
package's ``static`` directory and import it from a page::

    Mount("/splitchat", app=static_files(), name="splitchat")
    # <script type="module"> import { SplitchatClient } from "/splitchat/splitchat.js"; </script>
"""

from __future__ import annotations

from pathlib import Path

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

__all__ = ("BROWSER_CLIENT_FILENAME", "browser_client_mount", "browser_client_path", "static_files")

BROWSER_CLIENT_FILENAME = "splitchat.js"
"""File name of the browser client inside the directory served by :func:`static_files`."""

_STATIC_DIR = Path(__file__).resolve().parent / "static"


def browser_client_path() -> Path:
    """Filesystem path of the shipped ``splitchat.js`` (e.g. to copy it into a CDN bundle)."""
    return _STATIC_DIR / BROWSER_CLIENT_FILENAME


def static_files() -> StaticFiles:
    """A Starlette ``StaticFiles`` app serving splitchat's browser assets (``splitchat.js``).

    ``check_dir`` is left on, so a broken install fails at start-up, not on the first request.
    """
    return StaticFiles(directory=_STATIC_DIR)


def browser_client_mount(path: str = "/splitchat", *, name: str = "splitchat") -> Mount:
    """A route serving the browser client under ``path`` (``{path}/splitchat.js``)."""
    return Mount(path, app=static_files(), name=name)
