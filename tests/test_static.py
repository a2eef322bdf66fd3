"""The browser client ships inside the package and is served by splitchat.static_files()."""

from __future__ import annotations

from importlib import resources

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

import splitchat


def test_browser_client_is_package_data() -> None:
    shipped = resources.files("splitchat") / "static" / splitchat.BROWSER_CLIENT_FILENAME
    assert shipped.is_file()
    assert splitchat.browser_client_path().read_text() == shipped.read_text()


async def test_static_files_serves_the_module_with_a_javascript_type() -> None:
    app = Starlette(routes=[Mount("/assets", app=splitchat.static_files()), splitchat.browser_client_mount()])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for path in ("/assets/splitchat.js", "/splitchat/splitchat.js"):
            response = await client.get(path)
            assert response.status_code == 200
            # Browsers refuse to run a module script served with a non-JavaScript MIME type.
            assert "javascript" in response.headers["content-type"]
            assert response.text == splitchat.browser_client_path().read_text()
        assert (await client.get("/splitchat/../pyproject.toml")).status_code == 404
        assert (await client.get("/splitchat/missing.js")).status_code == 404
