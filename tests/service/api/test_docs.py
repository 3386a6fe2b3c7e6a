"""Swagger UI (/docs) and ReDoc (/redoc) load every asset from this server, never a CDN, so they
render offline; ``docs_enabled=false`` turns the pages and the document off; their requests are
labelled as themselves in the request metric, not ``unmatched``."""

from __future__ import annotations

import re

import httpx
import pytest
from tests.service.api.api_support import FormulaScorer, assert_error, serving

from service.api import build_app
from service.config import Settings

pytestmark = pytest.mark.anyio

REQUESTS = "reclora_http_request_duration_seconds_count"
ASSET = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def referenced(html: str) -> list[str]:
    """Every URL the page loads: script, stylesheet, icon, and the document it renders."""
    return [a or b for a, b in ASSET.findall(html)]


@pytest.mark.parametrize("page,script,marker", [("/docs", "/docs/static/swagger-ui-bundle.js", b"SwaggerUIBundle"),
                                                ("/redoc", "/docs/static/redoc.standalone.js", b"Redoc")])
async def test_docs_pages_load_only_local_assets(client: httpx.AsyncClient, page: str, script: str, marker: bytes):
    response = await client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assets = referenced(response.text)
    assert script in assets and "/openapi.json" in assets
    assert all(a.startswith("/") and not a.startswith("//") for a in assets), assets  # nothing off this host
    assert "cdn" not in response.text.lower() and "fonts.googleapis" not in response.text
    for asset in assets:
        served = await client.get(asset)
        assert served.status_code == 200, asset
    served = await client.get(script)
    assert "javascript" in served.headers["content-type"] and marker in served.content
    assert len(served.content) > 100_000  # the real bundle, not a stub


async def test_swagger_ui_gets_its_stylesheet(client: httpx.AsyncClient):
    assets = referenced((await client.get("/docs")).text)
    assert "/docs/static/swagger-ui.css" in assets
    css = await client.get("/docs/static/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css") and b".swagger-ui" in css.content


async def test_docs_requests_are_labelled_as_themselves(client: httpx.AsyncClient, app):
    paths = ["/docs", "/redoc", "/openapi.json", "/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css",
             "/docs/static/redoc.standalone.js", "/docs/static/favicon.png"]
    for path in paths:
        assert (await client.get(path)).status_code == 200, path
    assert (await client.get("/docs/static/not-there.js")).status_code == 404
    registry = app.state.metrics.registry
    for path in paths:
        assert registry.get_sample_value(REQUESTS, {"method": "GET", "route": path, "status": "200"}) == 1, path
    assert registry.get_sample_value(REQUESTS, {"method": "GET", "route": "unmatched", "status": "404"}) == 1
    assert registry.get_sample_value(REQUESTS, {"method": "GET", "route": "/docs/static/not-there.js",
                                                "status": "404"}) is None


async def test_docs_can_be_turned_off(settings: Settings):
    app = build_app(settings.replace(docs_enabled=False), scorer=FormulaScorer())
    async with serving(app) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/static/swagger-ui-bundle.js"):
            assert_error(await client.get(path), 404, "not_found")
        assert (await client.post("/v1/score", json={"user_id": "u1", "candidates": [1]})).status_code == 200
