"""The inspector page at ``/``, its JavaScript running for real in a headless Chromium."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.browser.chromium import Browser, needs_chromium
from tests.helpers import Cluster, free_port, psql, token

if TYPE_CHECKING:
    from tests.conftest import Bridges

ROWS = "document.querySelector('#events tbody')"
STATE = "document.getElementById('state').dataset.state"


def page_url(port: int, tok: str, collection: str = "posts") -> str:
    return f"http://127.0.0.1:{port}/#collection={collection}&token={tok}"


async def test_the_page_and_its_files_are_served_with_a_strict_policy(
    dsn: str, posts: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    async with aiohttp.ClientSession() as http:
        for path, kind in (("/", "text/html"), ("/inspector/inspector.js", "text/javascript"),
                           ("/inspector/inspector.css", "text/css")):  # fmt: skip
            async with http.get(f"http://127.0.0.1:{running.port}{path}") as resp:
                assert resp.status == 200, path
                assert resp.content_type == kind
                assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
                assert len(await resp.read()) > 500
        async with http.get(f"http://127.0.0.1:{running.port}/inspector/../server.py") as resp:
            assert resp.status == 404


@needs_chromium
async def test_the_inspector_shows_a_row_inserted_with_psql(
    dsn: str, posts: str, cluster: Cluster, tmp_path: Path, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn, heartbeat=0.5)
    async with Browser(tmp_path / "profile") as browser:
        await browser.goto(page_url(running.port, token()))
        await browser.until(f"{STATE} === 'live'", what="the inspector to subscribe")
        psql(cluster, dsn, "UPDATE posts SET title = 'x' WHERE false")  # nothing: no row appears
        psql(cluster, dsn, "INSERT INTO posts (title) VALUES ('from psql')")
        await browser.until(f"{ROWS}.innerText.includes('from psql')", what="the row to appear")
        first = await browser.evaluate(
            f"[...{ROWS}.rows].filter(r => r.className === 'create').map(r => [...r.cells].map(c => c.innerText))"
        )
        assert len(first) == 1
        number, kind, at, event_id, data, old = first[0]
        assert number == "1" and kind == "posts.create" and event_id.endswith(".0") and at.endswith("Z")
        assert '"title": "from psql"' in data and old == ""
        psql(cluster, dsn, "UPDATE posts SET title = 'changed'")
        await browser.until(f"{ROWS}.rows[0].className === 'update'", what="the update")
        cells = await browser.evaluate(f"[...{ROWS}.rows[0].cells].map(c => c.innerText)")
        assert '"title": "changed"' in cells[4] and '"title": "from psql"' in cells[5]  # new and old side by side
        await browser.until("document.getElementById('heartbeat').innerText.startsWith('heartbeat ')",
                            what="a heartbeat to show")  # fmt: skip
        assert browser.errors == []


@needs_chromium
async def test_the_inspector_reconnects_and_resumes_after_the_bridge_restarts(
    dsn: str, posts: str, cluster: Cluster, tmp_path: Path, start_bridge: Bridges
) -> None:
    port = free_port()
    running = await start_bridge(dsn, port=port)
    async with Browser(tmp_path / "profile") as browser:
        await browser.goto(page_url(port, token()))
        await browser.until(f"{STATE} === 'live'", what="the inspector to subscribe")
        psql(cluster, dsn, "INSERT INTO posts (title) VALUES ('before the restart')")
        await browser.until(f"{ROWS}.innerText.includes('before the restart')")
        await running.stop()  # the restart: stopped here, started again on the same port below
        await browser.until(f"{STATE} === 'reconnecting'", what="the page to notice the restart")
        psql(cluster, dsn, "INSERT INTO posts (title) VALUES ('while it was down 1'), ('while it was down 2')")
        await start_bridge(dsn, port=port)
        await browser.until(f"{ROWS}.innerText.includes('while it was down 2')", timeout=30,
                            what="the rows committed while the bridge was down")  # fmt: skip
        assert await browser.evaluate(f"{STATE}") == "live"
        titles = await browser.evaluate(
            f"[...{ROWS}.rows].filter(r => r.className === 'create')"
            ".map(r => JSON.parse(r.cells[4].innerText).title).reverse()"
        )
        assert titles == ["before the restart", "while it was down 1", "while it was down 2"]  # once, in order
        notices = await browser.evaluate(f"{ROWS}.innerText")
        assert "resuming after" in notices and "reconnecting" in notices


@pytest.mark.parametrize(
    "title",
    [
        "<script>window.pwned = 'script'</script>",
        "<img src=x onerror=\"window.pwned = 'img'\">",
        "<b>bold</b> &amp; <a href='javascript:window.pwned=1'>link</a>",
    ],
)
@needs_chromium
async def test_row_values_render_as_text_never_as_markup(
    dsn: str, posts: str, cluster: Cluster, tmp_path: Path, title: str, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    async with Browser(tmp_path / "profile") as browser:
        await browser.goto(page_url(running.port, token()))
        await browser.until(f"{STATE} === 'live'", what="the inspector to subscribe")
        quoted = title.replace("'", "''")
        psql(cluster, dsn, f"INSERT INTO posts (title, status) VALUES ('{quoted}', '{quoted}')")
        await browser.until(f"{ROWS}.rows[0].className === 'create'", what="the row to appear")
        data = await browser.evaluate(f"JSON.parse({ROWS}.rows[0].cells[4].innerText)")
        assert data["title"] == title and data["status"] == title  # shown exactly, as text
        assert await browser.evaluate("document.querySelectorAll('#events img, #events script, #events a, "
                                      "#events b').length") == 0  # fmt: skip
        assert await browser.evaluate("window.pwned === undefined")
