"""``GET /metrics``, read with the Prometheus client library's own parser, and its writer's edge cases."""

from __future__ import annotations

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgbridge import changelog
from pgbridge.metrics import Exposition, Histogram, Rate
from tests.helpers import close_frame, collect, free_port, start_bridge, subscribe, token, wait_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels; parsing fails on anything Prometheus would refuse."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(port: int, header: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": header} if header else {}
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.text()


async def test_metrics_count_what_the_bridge_did(dsn: str, posts: str, db: asyncpg.Connection) -> None:
    running = await start_bridge(dsn, stats_interval=0.2)
    try:
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
    finally:
        await running.stop()


async def test_a_side_task_that_fails_shows_in_metrics_and_health(
    dsn: str, posts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_bridge(dsn, stats_interval=0.05)
    bridge = running.bridge

    async def broken(conn: object) -> None:
        raise ZeroDivisionError("a bug, not a database outage")

    try:
        monkeypatch.setattr(changelog, "stats", broken)  # the maintenance task's next round fails
        await wait_for(lambda: bridge.task_failure_count["maintenance"] > 0, what="the failure")
        monkeypatch.undo()
        found = samples((await scrape(running.port))[2])
        assert found[("pgbridge_task_failures_total", (("task", "maintenance"),))] >= 1
        assert found[("pgbridge_task_failures_total", (("task", "heartbeat"),))] == 0
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{running.port}/healthz") as resp:
            health = await resp.json()
        assert health["status"] == "degraded" and "ZeroDivisionError" in health["failed_tasks"]["maintenance"]
    finally:
        await running.stop()


async def test_the_metrics_token_is_required_when_set(dsn: str, posts: str) -> None:
    running = await start_bridge(dsn, metrics_token="scrape-secret")
    try:
        for header in (None, "Bearer wrong", "scrape-secret", "Basic scrape-secret"):
            status, _, text = await scrape(running.port, header)
            assert status == 401 and "Authorization: Bearer" in text and "pgbridge_" not in text
        status, _, text = await scrape(running.port, "Bearer scrape-secret")
        assert status == 200 and ("pgbridge_up", ()) in samples(text)
    finally:
        await running.stop()


def test_histogram_buckets_are_cumulative_and_labels_escaped() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(value)
    out = Exposition()
    out.histogram("wait_seconds", "a histogram", histogram)
    out.labelled("things", "gauge", 'help with "quotes" and \\ backslash', "name", {'a"b\\c\nd': 1.5, "plain": 2})
    out.counter("events_total", "a counter", 12)
    found = samples(out.text())
    assert [found[("pgbridge_wait_seconds_bucket", (("le", le),))] for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert found[("pgbridge_wait_seconds_count", ())] == 4
    assert found[("pgbridge_wait_seconds_sum", ())] == pytest.approx(7.65)
    assert found[("pgbridge_things", (("name", 'a"b\\c\nd'),))] == 1.5
    assert found[("pgbridge_events_total", ())] == 12


def test_a_rate_averages_the_last_whole_seconds() -> None:
    rate = Rate(window=10)
    for now in (100.1, 100.5, 100.9, 105.0, 109.99):
        rate.add(now)
    assert rate.per_second(109.99) == 0.4  # seconds 100 and 105; the current second is not over
    assert rate.per_second(110.0) == 0.5
    assert rate.per_second(111.0) == 0.2  # second 100 left the window
    assert rate.per_second(200.0) == 0.0
    rate.add(200.0)  # old seconds are dropped, not kept forever
    assert rate.per_second(201.0) == 0.1


async def test_metrics_answer_while_the_database_is_unreachable() -> None:
    running = await start_bridge(f"postgresql://secret_role@127.0.0.1:{free_port()}/db", wait=False)
    try:
        status, _, text = await scrape(running.port)
        assert status == 200 and samples(text)[("pgbridge_up", ())] == 0
        assert "secret_role" not in text and "127.0.0.1" not in text
    finally:
        await running.stop()
