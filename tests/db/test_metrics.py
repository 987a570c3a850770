"""``GET /metrics`` of a running bridge, read with the Prometheus client library's own parser (the
writer's edge cases are tests/unit/test_exposition.py's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
import asyncpg
import pytest

from pgbridge import changelog
from tests.helpers import close_frame, collect, free_port, status_with_header, subscribe, token, wait_for
from tests.unit.test_exposition import samples

if TYPE_CHECKING:
    from tests.conftest import Bridges


async def scrape(port: int, header: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": header} if header else {}
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.text()


async def test_metrics_count_what_the_bridge_did(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn, stats_interval=0.2)
    async with running.connect() as ws, running.connect(token(collections=["posts"])) as other:
        await subscribe(ws, "posts")
        await subscribe(other, "posts", filter={"title": "nothing matches"})
        for n in range(3):
            await db.execute("INSERT INTO posts (title) VALUES ($1)", f"row {n}")
        await collect(ws, 3)
        async with running.connect("not-a-token") as rejected:
            assert await close_frame(rejected) == (1008, "Authentication failed")
        await wait_for(lambda: (stats := running.bridge.stats) is not None and stats.changelog_transactions >= 3,
                       what="the change-log figures")  # fmt: skip
        status, content_type, text = await scrape(running.port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    found = samples(text)
    assert found[("pgbridge_up", ())] == 1
    assert found[("pgbridge_connections", ())] == 2
    assert found[("pgbridge_subscriptions", (("collection", "posts"),))] == 2
    assert found[("pgbridge_changes_received_total", ())] == 3
    assert found[("pgbridge_frames_sent_total", ())] == 2 + 3  # two confirmations, three events
    assert found[("pgbridge_bytes_sent_total", ())] > 3 * len('{"type":"posts.create"}')
    assert found[("pgbridge_clients_closed_total", (("reason", "Authentication failed"),))] == 1
    assert found[("pgbridge_listener_reconnects_total", ())] == 0
    assert found[("pgbridge_changelog_transactions", ())] >= 3
    assert found[("pgbridge_changelog_bytes", ())] > 0
    assert 0 <= found[("pgbridge_notification_queue_usage", ())] < 0.01
    assert found[("pgbridge_task_failures_total", (("task", "maintenance"),))] == 0
    assert found[("pgbridge_delivery_latency_seconds_count", ())] == 3
    assert found[("pgbridge_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert 0 < found[("pgbridge_delivery_latency_seconds_sum", ())] < 3 * 5


async def test_a_side_task_that_fails_shows_in_metrics_and_health(
    dsn: str, posts: str, monkeypatch: pytest.MonkeyPatch, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn, stats_interval=0.05)
    bridge = running.bridge

    async def broken(conn: object) -> None:
        raise ZeroDivisionError("a bug, not a database outage")

    monkeypatch.setattr(changelog, "stats", broken)  # the maintenance task's next round fails
    await wait_for(lambda: bridge.task_failure_count["maintenance"] > 0, what="the failure")
    monkeypatch.undo()
    found = samples((await scrape(running.port))[2])
    assert found[("pgbridge_task_failures_total", (("task", "maintenance"),))] >= 1
    assert found[("pgbridge_task_failures_total", (("task", "heartbeat"),))] == 0
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{running.port}/healthz") as resp:
        health = await resp.json()
    assert health["status"] == "degraded" and "ZeroDivisionError" in health["failed_tasks"]["maintenance"]


async def test_the_metrics_token_is_required_when_set(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, metrics_token="scrape-secret")
    for header in (None, "Bearer wrong", "scrape-secret", "Basic scrape-secret"):
        status, _, text = await scrape(running.port, header)
        assert status == 401 and "Authorization: Bearer" in text and "pgbridge_" not in text
    refused = await status_with_header(running.port, "/metrics", b"Authorization: Bearer \xff")  # not UTF-8
    assert refused.startswith(b"HTTP/1.1 401"), refused
    status, _, text = await scrape(running.port, "Bearer scrape-secret")
    assert status == 200 and ("pgbridge_up", ()) in samples(text)


async def test_metrics_answer_while_the_database_is_unreachable(start_bridge: Bridges) -> None:
    running = await start_bridge(f"postgresql://secret_role@127.0.0.1:{free_port()}/db", wait=False)
    status, _, text = await scrape(running.port)
    assert status == 200 and samples(text)[("pgbridge_up", ())] == 0
    assert "secret_role" not in text and "127.0.0.1" not in text
