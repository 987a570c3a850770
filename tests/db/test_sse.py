"""Server-Sent Events: the same sessions as the WebSocket, over one HTTP response, read by an
independent parser of the event-stream format."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest

from pgbridge import changelog
from pgbridge.protocol import SSE_PATH, EventStreamParser, StreamEvent
from tests.conftest import Bridges
from tests.helpers import RunningBridge, token, wait_for


class Stream:
    """One event stream, read event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.parser = EventStreamParser()
        self.raw = b""
        self._pending: deque[StreamEvent] = deque()

    async def next(self, timeout: float = 10.0) -> StreamEvent:
        while not self._pending:
            chunk = await asyncio.wait_for(self.response.content.readany(), timeout)
            if not chunk:
                raise EOFError("the stream ended")
            self.raw += chunk
            self._pending.extend(self.parser.feed(chunk))
        return self._pending.popleft()

    async def changes(self, count: int, timeout: float = 20.0) -> list[StreamEvent]:
        found: list[StreamEvent] = []
        while len(found) < count:
            event = await self.next(timeout)
            if "." in event.event:
                found.append(event)
        return found

    async def comment(self, text: bytes, timeout: float = 5.0) -> None:
        """Read until the stream holds the comment line ``text``."""
        async with asyncio.timeout(timeout):
            while b"\n: " + text not in self.raw:
                chunk = await self.response.content.readany()
                self.raw += chunk
                self._pending.extend(self.parser.feed(chunk))

    async def until_quiet(self, quiet: float = 1.0) -> list[StreamEvent]:
        found: list[StreamEvent] = []
        while True:
            try:
                found.append(await self.next(quiet))
            except TimeoutError:
                return found


def _url(running: RunningBridge, query: str) -> str:
    return f"http://127.0.0.1:{running.port}{SSE_PATH}?{query}"


_streams: list[aiohttp.ClientResponse] = []  # what _open opened, closed by the http fixture


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client whose streams are all closed after the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as session:
        yield session
        while _streams:
            _streams.pop().close()


async def _open(http: aiohttp.ClientSession, url: str, **headers: str) -> Stream:
    response = await http.get(url, headers=headers)
    _streams.append(response)
    assert response.status == 200, await response.text()
    return Stream(response)


async def _notes(db: asyncpg.Connection, running: RunningBridge) -> None:
    await db.execute("CREATE TABLE notes (id bigserial PRIMARY KEY, body text); SELECT pgbridge.publish('notes')")
    await wait_for(lambda: "notes" in (running.bridge.publications or ()), what="the notes publication")


async def test_a_stream_carries_confirmations_with_positions_and_changes_as_events(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    running = await start_bridge(dsn, heartbeat=0.3)
    await _notes(db, running)
    stream = await _open(http, _url(running, f"collection=posts&collection=notes&token={token()}"))
    headers = stream.response.headers
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8" and headers["Cache-Control"] == "no-cache"
    assert headers["Access-Control-Allow-Origin"] == "*"
    first, second = await stream.next(), await stream.next()
    assert stream.parser.retry == 2000
    assert (first.event, second.event) == ("subscribed", "subscribed")
    assert [orjson.loads(e.data)["collection"] for e in (first, second)] == ["posts", "notes"]
    assert first.id == second.id == orjson.loads(first.data)["id"]  # the starting position, as id:
    await db.execute("INSERT INTO posts (title, secret) VALUES ('p', 'hidden'); INSERT INTO notes (body) VALUES ('n')")
    post, note = await stream.changes(2)
    assert (post.event, note.event) == ("posts.create", "notes.create")
    body = orjson.loads(post.data)
    assert body["type"] == "posts.create" and body["data"]["title"] == "p" and "secret" not in body["data"]
    assert post.id == body["id"] and orjson.loads(note.data)["id"] == note.id
    await stream.comment(b"heartbeat 20")  # heartbeats are comments: EventSource ignores them
    assert not stream._pending
    stream.response.close()
    await wait_for(lambda: not running.bridge.sessions, what="the stream's session to end with its connection")


async def test_last_event_id_resumes_every_collection_exactly_and_in_order(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    running = await start_bridge(dsn)
    await _notes(db, running)
    url = _url(running, f"collection=posts&collection=notes&token={token()}")
    stream = await _open(http, url)
    await stream.next()
    await stream.next()
    for i in range(3):
        await db.execute("INSERT INTO posts (title) VALUES ($1)", f"a{i}")
        await db.execute("INSERT INTO notes (body) VALUES ($1)", f"a{i}")
    seen = await stream.changes(6)
    stream.response.close()
    for i in range(4):
        await db.execute("INSERT INTO notes (body) VALUES ($1)", f"b{i}")
        await db.execute("INSERT INTO posts (title) VALUES ($1)", f"b{i}")
    resumed = await _open(http, url, **{"Last-Event-ID": seen[3].id or ""})
    rest = await resumed.changes(2 + 8)
    ids = [e.id for e in seen[:4] + rest]
    keys = [tuple(int(x) for x in (i or "").split(".")) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # one stream, in position order
    texts = [orjson.loads(e.data)["data"].get("title") or orjson.loads(e.data)["data"]["body"] for e in rest]
    assert texts == ["a2", "a2"] + [t for i in range(4) for t in (f"b{i}", f"b{i}")]
    assert await resumed.until_quiet(0.5) == []
    # `since` in the query does the same; Last-Event-ID, which EventSource sends itself, wins over it
    resumed.response.close()
    both = await _open(http, url + f"&since={seen[0].id}", **{"Last-Event-ID": seen[5].id or ""})
    assert [e.id for e in await both.changes(8)] == [e.id for e in rest[2:]]


@pytest.mark.parametrize("last_event_id", ["not-an-id", "1.1000", "999999999.0"])
async def test_a_bad_or_unknown_last_event_id_gets_resync_required(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession,
    last_event_id: str,
) -> None:  # fmt: skip
    running = await start_bridge(dsn)
    stream = await _open(http, _url(running, f"collection=posts&token={token()}"), **{"Last-Event-ID": last_event_id})
    assert (await stream.next()).event == "subscribed"
    resync = await stream.next()
    assert resync.event == "resync_required"
    assert orjson.loads(resync.data) == {"type": "resync_required", "collection": "posts"}
    await db.execute("INSERT INTO posts (title) VALUES ('live')")
    assert orjson.loads((await stream.changes(1))[0].data)["data"]["title"] == "live"


async def test_a_pruned_last_event_id_gets_resync_required(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    running = await start_bridge(dsn)
    stream = await _open(http, _url(running, f"collection=posts&token={token()}"))
    await stream.next()
    received = []
    for i in range(4):  # each in a tick of its own
        await db.execute("INSERT INTO posts (title) VALUES ($1)", f"r{i}")
        received += await stream.changes(1)
    stream.response.close()
    assert await changelog.prune(db, max_age=3600, max_transactions=2) == 2  # r0 and r1 go
    await running.stop()
    fresh = await start_bridge(dsn)  # whose memory holds none of it
    url = _url(fresh, f"collection=posts&token={token()}")
    stream = await _open(http, url, **{"Last-Event-ID": received[0].id or ""})
    assert [(await stream.next()).event, (await stream.next()).event] == ["subscribed", "resync_required"]
    stream = await _open(http, url, **{"Last-Event-ID": received[2].id or ""})  # still held: resumed
    assert (await stream.next()).event == "subscribed"
    assert [e.id for e in await stream.changes(1)] == [received[3].id]


@pytest.mark.parametrize(
    ("query", "headers", "status", "error"),
    [
        ("collection=posts", {}, 401, "Missing token"),
        ("collection=posts&token=nonsense", {}, 401, "Authentication failed"),
        ("collection=posts", {"Authorization": "Bearer nonsense"}, 401, "Authentication failed"),
        ("collection=posts&token={expired}", {}, 401, "Token expired"),
        ("collection=secrets&token={tok}", {}, 403,
         "Collection 'secrets' is not published or not allowed for this token"),
        ("collection=posts&operations=create,delete&token={deletes}", {}, 403,
         "This token may not receive create on 'posts'"),
        ("token={tok}", {}, 400, "Missing collection: add ?collection=<name> (repeat it for several)"),
        ("collection=posts&collection=posts&token={tok}", {}, 400, "Each collection may be named once"),
        ("collection=posts&filter={{oops&token={tok}", {}, 400, "Invalid filter: not JSON"),
        ("collection=posts&filter={{\"n\":{{\"like\":1}}}}&token={tok}", {}, 400,
         "Invalid filter: unknown operator 'like' on n (use one of eq, neq, lt, lte, gt, gte, in)"),
        ("collection=posts&collection=notes&snapshot=true&token={tok}", {}, 400,
         "snapshot need exactly one collection"),
        ("collection=posts&snapshot=true&since=1.2.0&token={tok}", {}, 400,
         "since and snapshot cannot be combined: a snapshot starts from the table's rows, since from an event"),
        ("collection=posts&operations=create,explode&token={tok}", {}, 400,
         "Unknown operation: 'explode' (expected create, update or delete)"),
        ("collection=posts&since=12&token={tok}", {}, 400,
         'Invalid since: expected the "id" of an event, such as "12.3456.0"'),
        ("collection=posts&snapshot=maybe&token={tok}", {}, 400, "Invalid snapshot: must be true or false"),
    ],
)  # fmt: skip
async def test_streams_are_refused_with_a_status_and_a_reason(
    bridge: RunningBridge, http: aiohttp.ClientSession, query: str, headers: dict[str, str], status: int, error: str
) -> None:
    query = query.format(tok=token(), expired=token(ttl=-10), deletes=token(collections={"posts": ["delete"]}))
    async with http.get(_url(bridge, query), headers=headers) as response:
        assert (response.status, await response.json()) == (status, {"error": error})
        assert response.headers["Access-Control-Allow-Origin"] == "*"  # a page of another origin can read why
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert not bridge.bridge.sessions


async def test_expiry_and_shutdown_end_a_stream_with_a_close_event(
    dsn: str, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    running = await start_bridge(dsn)
    expiring = await _open(http, _url(running, f"collection=posts&token={token(ttl=1)}"))
    staying = await _open(http, _url(running, f"collection=posts&token={token()}"))
    assert (await expiring.next()).event == "subscribed" and (await staying.next()).event == "subscribed"
    closing = await expiring.next(timeout=5)
    assert (closing.event, orjson.loads(closing.data)) == ("close", {"code": 1008, "reason": "Token expired"})
    with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
        await expiring.next()
    await running.stop()
    closing = await staying.next()
    assert (closing.event, orjson.loads(closing.data)) == ("close", {"code": 1001, "reason": "Server shutting down"})


async def test_a_slow_stream_reader_is_caught_up_from_the_change_log(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    running = await start_bridge(dsn, outbound_limit=32 * 1024, history_bytes=64 * 1024)
    await _notes(db, running)
    stream = await _open(http, _url(running, f"collection=posts&collection=notes&token={token()}"))
    await stream.next()
    await stream.next()
    stream.response.content._low_water = stream.response.content._high_water = 1024  # read little at a time
    caught_up = False

    async def watch() -> None:
        nonlocal caught_up
        while not caught_up:
            caught_up = bool(running.bridge.feeds)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    await db.execute(
        "INSERT INTO posts (title) SELECT repeat('p', 500) || g FROM generate_series(1, 1500) g;"
        "INSERT INTO notes (body) SELECT 'n' || g FROM generate_series(1, 500) g"
    )
    for i in range(200):
        await db.execute("INSERT INTO posts (title) VALUES ($1)", f"each {i}")
        await db.execute("INSERT INTO notes (body) VALUES ($1)", f"each {i}")
    events = await stream.changes(1500 + 500 + 400, timeout=60)
    caught_up = True
    await watcher
    keys = [tuple(int(x) for x in (e.id or "").split(".")) for e in events]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert running.bridge.catchup_reads > 0  # past the history window, from the change log
    assert running.bridge.closed["Slow consumer"] == 0


async def test_a_stream_can_start_with_a_snapshot(
    dsn: str, db: asyncpg.Connection, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    await db.execute(
        "INSERT INTO posts (title, author_id, secret) SELECT 't' || g, g % 3, 'no' FROM generate_series(1, 30) g"
    )
    running = await start_bridge(dsn)
    query = f'collection=posts&snapshot=true&filter={{"author_id":1}}&token={token()}'
    stream = await _open(http, _url(running, query))
    subscribed = await stream.next()
    assert subscribed.event == "subscribed" and subscribed.id is None  # a snapshot has no position yet
    rows = [await stream.next() for _ in range(10)]
    assert {e.event for e in rows} == {"posts.snapshot"} and all(e.id is None for e in rows)
    assert all(orjson.loads(e.data)["data"]["author_id"] == 1 and "secret" not in e.data for e in rows)
    end = await stream.next()
    assert end.event == "snapshot_end" and end.id == orjson.loads(end.data)["id"]
    await db.execute("INSERT INTO posts (title, author_id) VALUES ('after', 1)")
    [after] = await stream.changes(1)
    assert orjson.loads(after.data)["data"]["title"] == "after"
    stream.response.close()
    # reconnecting with an id: the snapshot is not sent again, the stream resumes after that id
    resumed = await _open(http, _url(running, query), **{"Last-Event-ID": end.id or ""})
    assert (await resumed.next()).event == "subscribed"
    assert [e.id for e in await resumed.changes(1)] == [after.id]


async def test_only_listed_origins_may_read_streams_when_origins_are_set(
    dsn: str, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    running = await start_bridge(dsn, cors_origins=("https://app.example",))
    url = _url(running, f"collection=posts&token={token()}")
    async with http.get(url, headers={"Origin": "https://app.example"}) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert response.headers["Vary"] == "Origin"
    async with http.get(url, headers={"Origin": "https://evil.example"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    preflight_headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
                         "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    async with http.options(url, headers=preflight_headers) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Headers"] == "Authorization, Last-Event-ID, Cache-Control"


async def test_streams_count_against_the_connection_limits(
    dsn: str, posts: str, start_bridge: Bridges, http: aiohttp.ClientSession
) -> None:
    running = await start_bridge(dsn, max_connections=1, max_connections_per_subject=1)
    first = await _open(http, _url(running, f"collection=posts&token={token()}"))
    await first.next()
    async with http.get(_url(running, f"collection=posts&token={token()}")) as response:
        assert (response.status, response.headers["Retry-After"]) == (503, "5")
    first.response.close()
    await wait_for(lambda: not running.bridge.sessions, what="the first stream to end")
    second = await _open(http, _url(running, f"collection=posts&token={token()}"))
    await second.next()
    running.bridge.max_connections = 2
    async with http.get(_url(running, f"collection=posts&token={token()}")) as response:
        assert (response.status, await response.json()) == (429, {"error": "Too many connections for this token"})
