"""Every row of the protocol's error and close tables, and a server that stays up for everyone else."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import asyncpg
import jwt
import pytest
import websockets

from pgbridge import protocol
from tests.helpers import (
    SECRET,
    RunningBridge,
    close_frame,
    collect,
    recv,
    send,
    subscribe,
    token,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ("not json", {"error": "Invalid JSON"}),
        ("[1, 2]", {"error": "Message must be a JSON object"}),
        ('"subscribe"', {"error": "Message must be a JSON object"}),
        ("42", {"error": "Message must be a JSON object"}),
        ('{"collection": "posts"}', {"error": "Missing action (expected subscribe, unsubscribe, ping or refresh)"}),
        ('{"action": "subscribe"}', {"error": "Missing collection", "action": "subscribe"}),
        ('{"action": "subscribe", "collection": ""}', {"error": "Missing collection", "action": "subscribe"}),
        ('{"action": "unsubscribe"}', {"error": "Missing collection", "action": "unsubscribe"}),
        (
            '{"action": "subscribe", "collection": 5}',
            {"error": "Invalid collection: must be a string", "action": "subscribe"},
        ),
        (
            '{"action": "explode", "collection": "posts"}',
            {
                "error": "Unknown action: 'explode' (expected subscribe, unsubscribe, ping or refresh)",
                "action": "explode",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "operations": ["create", "truncate"]}',
            {
                "error": "Unknown operation: 'truncate' (expected create, update or delete)",
                "action": "subscribe",
                "collection": "posts",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "operations": "create"}',
            {
                "error": "Invalid operations: must be a non-empty list of create, update, delete",
                "action": "subscribe",
                "collection": "posts",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "operations": []}',
            {
                "error": "Invalid operations: must be a non-empty list of create, update, delete",
                "action": "subscribe",
                "collection": "posts",
            },
        ),
        (
            '{"action": "subscribe", "collection": "nope"}',
            {
                "error": "Collection 'nope' is not published or not allowed for this token",
                "action": "subscribe",
                "collection": "nope",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "since": 12}',
            {
                "error": 'Invalid since: expected the "id" of an event, such as "12.3456.0"',
                "action": "subscribe",
                "collection": "posts",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "snapshot": true, "since": "1.2.0"}',
            {
                "error": "since and snapshot cannot be combined: a snapshot starts from the table's rows, since "
                "from an event",
                "action": "subscribe",
                "collection": "posts",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "limit": 10}',
            {
                "error": "Invalid limit: a positive integer, only with snapshot",
                "action": "subscribe",
                "collection": "posts",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "snapshot": true, "limit": 0}',
            {
                "error": "Invalid limit: a positive integer, only with snapshot",
                "action": "subscribe",
                "collection": "posts",
            },
        ),
        (
            '{"action": "subscribe", "collection": "posts", "snapshot": "yes"}',
            {"error": "Invalid snapshot: must be true or false", "action": "subscribe", "collection": "posts"},
        ),
        (
            '{"action": "refresh"}',
            {"error": "Invalid refresh: token must be the new JWT, as a string", "action": "refresh"},
        ),
        (
            '{"action": "refresh", "token": 42}',
            {"error": "Invalid refresh: token must be the new JWT, as a string", "action": "refresh"},
        ),
        (
            '{"action": "subscribe", "collection": "posts", "filter": {"author_id": {"like": "x"}}}',
            {
                "error": "Invalid filter: unknown operator 'like' on author_id "
                "(use one of eq, neq, lt, lte, gt, gte, in)",
                "action": "subscribe",
                "collection": "posts",
            },
        ),
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_stays(
    bridge: RunningBridge, db: asyncpg.Connection, frame: str, error: dict[str, str]
) -> None:
    async with bridge.connect() as ws:
        await ws.send(frame)
        assert await recv(ws) == error
        # still open and serving
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('after')")
        assert (await recv(ws))["data"]["title"] == "after"


@pytest.mark.parametrize("depth", [4, 500, 5000])
async def test_a_filter_nested_too_deep_gets_an_error_not_a_1011(
    bridge: RunningBridge, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    """A filter 500 deep once closed the connection with 1011, logging orjson's traceback each time."""
    nested = "1"
    for _ in range(depth - 1):
        nested = '{"a": ' + nested + "}"
    async with bridge.connect() as ws:
        await ws.send('{"action": "subscribe", "collection": "posts", "filter": {"author_id": ' + nested + "}}")
        if depth > 1000:  # deeper than the JSON parser goes: not a message at all
            assert await recv(ws) == {"error": "Invalid JSON"}
        else:
            assert await recv(ws) == {
                "error": "Invalid filter: nested too deep (at most 3 levels: {column: {operator: [values]}})",
                "action": "subscribe",
                "collection": "posts",
            }
        await subscribe(ws, "posts", filter={"author_id": {"in": [1, 2]}})  # three levels: fine
        await db.execute("INSERT INTO posts (title, author_id) VALUES ('after', 2)")
        assert (await recv(ws))["data"]["title"] == "after"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_binary_frames_are_refused(bridge: RunningBridge) -> None:
    async with bridge.connect() as ws:
        await ws.send(b'{"action": "ping"}')
        assert await recv(ws) == {"error": "Binary frames are not supported"}
        await send(ws, {"action": "ping"})
        assert (await recv(ws))["type"] == "pong"


async def test_a_frame_over_the_limit_closes_with_1009_and_others_carry_on(
    bridge: RunningBridge, db: asyncpg.Connection
) -> None:
    async with bridge.connect() as bystander, bridge.connect() as ws:
        await subscribe(bystander, "posts")
        await ws.send('{"action": "ping", "pad": "' + "x" * (64 * 1024) + '"}')
        assert (await close_frame(ws))[0] == 1009
        await db.execute("INSERT INTO posts (title) VALUES ('still here')")
        assert (await recv(bystander))["data"]["title"] == "still here"


async def test_subscription_limit(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    names = [f"c{i}" for i in range(101)]
    await db.execute("; ".join(f"CREATE TABLE {n} (id int); SELECT pgbridge.publish('{n}')" for n in names))
    await wait_for(lambda: set(names) <= (bridge.bridge.publications or set()), what="the bridge to learn of them")
    async with bridge.connect() as ws:
        for name in names[:100]:
            await subscribe(ws, name)
        await send(ws, {"action": "subscribe", "collection": names[100]})
        assert await recv(ws) == {
            "error": "Max subscriptions reached (100)",
            "action": "subscribe",
            "collection": names[100],
        }
        await subscribe(ws, names[0], operations=["create"])  # replacing one is not a new one


async def closed_with(bridge: RunningBridge, url: str, **kwargs: object) -> tuple[int, str]:
    async with websockets.connect(url, **kwargs) as ws:  # type: ignore[arg-type]
        with contextlib.suppress(websockets.ConnectionClosed):  # the server may have closed already
            await ws.send('{"action": "ping"}')
        return await close_frame(ws)


def _unsigned(claims: dict[str, object]) -> str:
    return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tok", "reason"),
    [
        (None, "Missing token"),
        ("", "Missing token"),
        ("garbage", "Authentication failed"),
        (token(secret="another-secret-another-secret-12345"), "Authentication failed"),
        (_unsigned({"sub": "x", "exp": int(time.time()) + 600, "collections": "*"}), "Authentication failed"),
        (token(ttl=-10), "Token expired"),
        (jwt.encode({"sub": "no exp", "collections": "*"}, SECRET, algorithm="HS256"), "Authentication failed"),
        (token(nbf=int(time.time()) + 3600), "Authentication failed"),
    ],
    ids=["none", "empty", "garbage", "another secret", "unsigned", "expired", "no exp", "not yet valid"],
)
async def test_bad_tokens_close_with_1008(bridge: RunningBridge, tok: str | None, reason: str) -> None:
    assert await closed_with(bridge, bridge.url(tok)) == (1008, reason)


async def test_a_token_that_expires_while_connected_closes_the_connection(bridge: RunningBridge) -> None:
    async with bridge.connect(token(ttl=2)) as ws:
        await subscribe(ws, "posts")
        assert await close_frame(ws) == (1008, "Token expired")


async def test_no_message_is_acted_on_before_the_token_is_checked(
    bridge: RunningBridge, db: asyncpg.Connection
) -> None:
    async with websockets.connect(bridge.url(token(secret="wrong-secret-wrong-secret-wrong-123"))) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.send('{"action": "subscribe", "collection": "posts"}')
            await db.execute("INSERT INTO posts (title) VALUES ('secret news')")
            while True:
                message = await recv(ws)
                assert "data" not in message and "status" not in message
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_shutdown_closes_clients_with_1001(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await running.stop()  # what is tested
        assert await close_frame(ws) == (1001, "Server shutting down")


async def test_an_internal_error_closes_with_1011_and_the_server_stays_up(
    bridge: RunningBridge, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = protocol.parse_client_message

    def fails_on_a_bug(text: str | bytes) -> protocol.ClientMessage:
        if "bug" in str(text):
            raise RuntimeError("a bug in pgbridge")  # what an internal error is
        return real(text)

    monkeypatch.setattr(protocol, "parse_client_message", fails_on_a_bug)
    async with bridge.connect() as bystander, bridge.connect() as ws:
        await subscribe(bystander, "posts")
        await send(ws, {"action": "ping", "bug": True})
        assert await close_frame(ws) == (1011, "Internal error")
        await db.execute("INSERT INTO posts (title) VALUES ('still serving')")
        assert (await recv(bystander))["data"]["title"] == "still serving"
    async with bridge.connect() as ws:
        await subscribe(ws, "posts")


async def test_a_damaged_change_log_entry_is_skipped_and_logged(
    dsn: str, posts: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title) VALUES ('first')")
        first = await recv(ws)
    await running.stop()  # so that no listener reads the entry before it is damaged
    for title in ("one", "two", "three"):
        await db.execute("INSERT INTO posts (title) VALUES ($1)", title)
    # damaged: claims more rows than it holds (the listener has not read it: no bridge runs)
    await db.execute("UPDATE pgbridge.changes SET nrows = 5 WHERE body LIKE '%\"two\"%'")
    running = await start_bridge(dsn)
    async with running.connect() as ws:
        await subscribe(ws, "posts", since=first["id"])
        assert [e["data"]["title"] for e in await collect(ws, 2)] == ["one", "three"]
        await db.execute("INSERT INTO posts (title) VALUES ('live')")
        assert (await recv(ws))["data"]["title"] == "live"
    assert any("damaged change-log entry" in r.getMessage() for r in caplog.records)
