"""PgBouncer in front of PostgreSQL: the pool through transaction mode, the listener never.

Debian's ``pgbouncer`` runs with the configuration ``docs/deployment.md`` shows (its ``ini pgbouncer``
block), on a port of its own in front of the test database. PgBouncer refuses to run as root: under
root it runs as the user that owns the test cluster's socket directory, which can reach the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import pwd
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
import websockets

from pgbridge.listener import LEASE
from tests.helpers import (
    Cluster,
    assert_silent,
    collect,
    free_port,
    health,
    http_get,
    metric,
    recv,
    subscribe,
    token,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges, Processes

ROOT = Path(__file__).resolve().parents[2]
PGBOUNCER = shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
INSTALL = "make system-packages (or: apt-get install pgbouncer)"

# Under CI a missing pgbouncer fails each test (the fixture says how to install it); elsewhere they skip.
pytestmark = pytest.mark.skipif(
    PGBOUNCER is None and not os.environ.get("CI"), reason=f"pgbouncer is not installed: {INSTALL}"
)

REFUSED = "the listener's connection receives no notifications"
WHAT_TO_DO = "point --listen-dsn (PGBRIDGE_LISTEN_DSN) at PostgreSQL directly, or at a session-mode pool"


def documented_ini() -> str:
    """The one ``ini pgbouncer`` block of docs/deployment.md."""
    found = re.findall(r"^```ini pgbouncer\n(.*?)^```", (ROOT / "docs" / "deployment.md").read_text(), re.M | re.S)
    assert len(found) == 1, "docs/deployment.md needs exactly one ```ini pgbouncer block"
    return str(found[0])


def local_ini(text: str, *, socket_dir: str, pg_port: int, database: str, port: int, userlist: Path) -> str:
    """The documented configuration, in front of the test database on a port of its own."""
    replacements = {
        "host=db.internal port=5432": f"host={socket_dir} port={pg_port}",
        "dbname=app": f"dbname={database}",
        "listen_port = 6432": f"listen_port = {port}",
        "auth_type = scram-sha-256": "auth_type = trust",
        "/etc/pgbouncer/userlist.txt": str(userlist),
    }
    for documented, local in replacements.items():
        assert documented in text, f"the documented pgbouncer.ini no longer has {documented!r}"
        text = text.replace(documented, local)
    # No Unix socket of its own (the tests connect over TCP); the log goes to stderr.
    return text + "unix_socket_dir =\n"


class PgBouncer:
    """PgBouncer with the documented configuration in front of one test database."""

    def __init__(self, cluster: Cluster, database: str, pg_port: int, workdir: Path) -> None:
        assert PGBOUNCER is not None, f"pgbouncer is missing: {INSTALL}"
        socket_dir = parse_qs(urlsplit(cluster.base_dsn).query)["host"][0]
        self.port = free_port()
        self.user = pwd.getpwuid(Path(socket_dir).stat().st_uid).pw_name
        userlist = workdir / "userlist.txt"
        userlist.write_text('"postgres" ""\n')
        self.ini = workdir / "pgbouncer.ini"
        self.ini.write_text(
            local_ini(documented_ini(), socket_dir=socket_dir, pg_port=pg_port, database=database, port=self.port,
                      userlist=userlist)
        )  # fmt: skip
        for path in (workdir, userlist, self.ini):
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.log = workdir / "pgbouncer.log"
        self.proc: asyncio.subprocess.Process | None = None

    def dsn(self, alias: str = "app") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{alias}"

    async def start(self) -> None:
        # PgBouncer refuses to run as root: -u names the user it switches to.
        as_user = ["-u", self.user] if os.geteuid() == 0 else []
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(PGBOUNCER), *as_user, str(self.ini), stdout=log, stderr=log
            )

        async def answers() -> bool:
            assert self.proc is not None and self.proc.returncode is None, self.log.read_text()
            try:
                conn = await asyncpg.connect(self.dsn(), statement_cache_size=0, timeout=2)
            except (OSError, asyncpg.PostgresError):
                return False
            await conn.close()
            return True

        await wait_for(answers, what="pgbouncer to answer")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None


@contextlib.asynccontextmanager
async def running_pgbouncer(cluster: Cluster, dsn: str, *, strict: bool = False) -> AsyncIterator[PgBouncer]:
    """PgBouncer in front of the database of ``dsn``; ``strict``: without ``ignore_startup_parameters``."""
    conn = await asyncpg.connect(dsn)
    try:
        pg_port = int(await conn.fetchval("SHOW port"))
    finally:
        await conn.close()
    with tempfile.TemporaryDirectory(prefix="pgbridge-pgbouncer-") as workdir:
        bouncer = PgBouncer(cluster, urlsplit(dsn).path.lstrip("/"), pg_port, Path(workdir))
        if strict:
            text = bouncer.ini.read_text()
            assert "\nignore_startup_parameters =" in text
            bouncer.ini.write_text(text.replace("\nignore_startup_parameters =", "\n; ignore_startup_parameters ="))
        await bouncer.start()
        try:
            yield bouncer
        finally:
            await bouncer.kill()


@pytest.fixture
async def pgbouncer(cluster: Cluster, dsn: str) -> AsyncIterator[PgBouncer]:
    async with running_pgbouncer(cluster, dsn) as bouncer:
        yield bouncer


async def routed(port: int, at_least: int) -> bool:
    """Whether the bridge on ``port`` has routed ``at_least`` row changes since it started."""
    return bool((await health(port))["changes_delivered"] >= at_least)


async def insert(db: asyncpg.Connection, *titles: str) -> None:
    for title in titles:
        await db.execute("INSERT INTO posts (title) VALUES ($1)", title)


async def until_snapshot_end(ws: Any) -> list[dict[str, Any]]:
    rows = []
    while (message := await recv(ws)).get("type") != "snapshot_end":
        assert message.get("type") == "posts.snapshot", message
        rows.append(message)
    return rows


def output(process: Any) -> str:
    """What a bridge process printed, once it has exited."""
    out: bytes = process.proc.stdout.read() if process.proc.stdout else b""
    return out.decode(errors="replace")


async def pgbridge(*args: str, dsn: str) -> tuple[int, str]:
    """Run a ``pgbridge`` command with ``dsn`` as its database; its exit status and what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGBRIDGE_", "PG")) and k != "DATABASE_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgbridge", *args, env={**env, "DATABASE_URL": dsn},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def exited(process: Any, timeout: float = 60) -> int:
    code: int = await asyncio.wait_for(asyncio.to_thread(process.proc.wait), timeout)
    return code


@pytest.mark.parametrize("listener", ["direct", "session pool"])
async def test_serve_with_its_pool_through_transaction_mode(
    listener: str, dsn: str, db: asyncpg.Connection, posts: str, pgbouncer: PgBouncer, bridge_process: Processes
) -> None:
    """``--dsn`` through PgBouncer in transaction mode and the listener direct (or through the session-mode
    pool): the bridge starts, delivers live, sends a snapshot, and catches a client up with ``since``; then
    all of it again after a restart. (Before, the start-up check failed with asyncpg's prepared-statement
    error, and with the check fixed the pool's snapshot did.)"""
    listen_dsn = dsn if listener == "direct" else pgbouncer.dsn("app_listener")
    env = {"PGBRIDGE_LISTEN_DSN": listen_dsn, "PGBRIDGE_HISTORY_BYTES": "1"}  # catching up reads the log
    await insert(db, "before")
    # What another asyncpg program (or an earlier bridge) leaves on the pooler's server connection: statements
    # named as asyncpg names a process's prepared statements. A pool that named its own would collide.
    other = await asyncpg.connect(pgbouncer.dsn(), statement_cache_size=0)
    try:
        for n in range(1, 500):
            await other.execute(f"PREPARE __asyncpg_stmt_{n:x}__ AS SELECT 1")
    finally:
        await other.close()
    for run in ("first", "restarted"):
        code, printed = await pgbridge("status", dsn=pgbouncer.dsn())  # as an operator checks first
        assert code == 0 and "schema version" in printed, printed
        bridge = bridge_process(pgbouncer.dsn(), env=env)
        try:
            await bridge.ready()
        except AssertionError:
            bridge.proc.kill()
            raise AssertionError(f"the bridge did not start:\n{output(bridge)}") from None
        async with websockets.connect(bridge.url(token())) as live:
            await subscribe(live, "posts")
            await insert(db, f"{run} live")
            while (event := await recv(live))["data"]["title"] == "before":
                pass  # committed before the bridge started, and not yet in a tick then: it comes live
            assert (event["type"], event["data"]["title"]) == ("posts.create", f"{run} live")
            since = event["id"]
        async with websockets.connect(bridge.url(token())) as reader:
            await subscribe(reader, "posts", snapshot=True)
            titles = {row["data"]["title"] for row in await until_snapshot_end(reader)}
            assert {"before", f"{run} live"} <= titles
        after = [f"{run} after {n}" for n in range(3)]  # more than the history holds: read from the log
        delivered = (await health(bridge.port))["changes_delivered"]
        await insert(db, *after)
        # Routed before the client asks, so that it catches up from the change log:
        await wait_for(functools.partial(routed, bridge.port, delivered + 3), what="the bridge to route the rows")
        async with websockets.connect(bridge.url(token())) as resumed:
            await subscribe(resumed, "posts", since=since)
            assert [e["data"]["title"] for e in await collect(resumed, 3)] == after
        body = await health(bridge.port)
        assert body["status"] == "ok", body
        assert body["catch_up_reads"] >= 1 and body["catch_up_read_failures"] == 0, body
        bridge.proc.terminate()
        assert await exited(bridge) == 0, output(bridge)


async def test_the_commands_work_through_transaction_mode(
    db: asyncpg.Connection, posts: str, pgbouncer: PgBouncer
) -> None:
    """publish, unpublish and status through the transaction-mode pool, each twice: the second run would
    find the first one's prepared statements on the server connection, were they named."""
    await db.execute("CREATE TABLE notes (id bigserial PRIMARY KEY, body text)")
    for _ in range(2):
        code, printed = await pgbridge("publish", "notes", "--exclude", "body", dsn=pgbouncer.dsn())
        assert (code, printed) == (0, "published notes as collection 'notes'\n"), printed
        code, printed = await pgbridge("status", "--url", f"http://127.0.0.1:{free_port()}", dsn=pgbouncer.dsn())
        assert code == 0 and "notes: public.notes, hides body" in printed, printed
        code, printed = await pgbridge("unpublish", "notes", dsn=pgbouncer.dsn())
        assert (code, printed) == (0, "unpublished notes (collection 'notes')\n"), printed
    assert await db.fetchval("SELECT count(*) FROM pgbridge.publications") == 1  # posts


@pytest.mark.parametrize("main", ["through the pooler", "direct"])
async def test_a_listener_through_transaction_mode_is_refused_at_start(
    main: str, dsn: str, posts: str, pgbouncer: PgBouncer, bridge_process: Processes
) -> None:
    """The listener's DSN through the transaction-mode pool, given or taken from ``--dsn``: serve exits
    with status 2, saying what to do."""
    if main == "direct":
        bridge = bridge_process(dsn, env={"PGBRIDGE_LISTEN_DSN": pgbouncer.dsn(), "PGBRIDGE_PROBE_TIMEOUT": "1"})
    else:
        bridge = bridge_process(pgbouncer.dsn(), env={"PGBRIDGE_PROBE_TIMEOUT": "1"})
    code = await exited(bridge)
    printed = output(bridge)
    assert code == 2, printed
    assert f"pgbridge: error: {REFUSED}: a NOTIFY on a new channel did not arrive within 1s" in printed, printed
    assert WHAT_TO_DO in printed, printed
    assert "Traceback" not in printed, printed


async def test_the_listener_refuses_transaction_mode_when_it_connects(
    dsn: str, posts: str, pgbouncer: PgBouncer, start_bridge: Bridges, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener checks each connection it makes (the start-up check cannot, when the database was down
    then): it never counts as connected, and says why, in its problem and its log."""
    caplog.set_level(logging.WARNING, "pgbridge.listener")
    running = await start_bridge(pgbouncer.dsn(), wait=False, probe_timeout=1.0)
    listener = running.bridge.listener
    await wait_for(lambda: REFUSED in (listener.problem or ""), what="the listener to refuse its connection")
    assert not listener.connected
    assert WHAT_TO_DO in (listener.problem or "")
    assert any(REFUSED in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    status, _ = await http_get(running.port, "/healthz")
    assert status == 503


async def test_a_session_pool_that_refuses_the_listeners_settings_says_what_to_do(
    cluster: Cluster, dsn: str, posts: str, start_bridge: Bridges
) -> None:
    """Without ignore_startup_parameters, PgBouncer refuses the listener's connection: its problem (in the
    log, once a minute) names the line to add."""
    async with running_pgbouncer(cluster, dsn, strict=True) as bouncer:
        running = await start_bridge(dsn, listen_dsn=bouncer.dsn("app_listener"), wait=False)
        listener = running.bridge.listener
        await wait_for(lambda: "unsupported startup parameter" in (listener.problem or ""), what="the refusal")
        assert "ignore_startup_parameters = synchronous_commit, default_transaction_isolation" in (
            listener.problem or ""
        )
        await running.stop()


async def test_catch_up_reads_that_keep_failing_are_reported(
    dsn: str, db: asyncpg.Connection, posts: str, pgbouncer: PgBouncer, start_bridge: Bridges,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The pooler goes away while a client catches up: the read is retried (the client gets everything
    once it is back), logged at WARNING once, counted in /metrics, and /healthz says degraded and why."""
    caplog.set_level(logging.WARNING, "pgbridge.feed")
    running = await start_bridge(pgbouncer.dsn(), listen_dsn=dsn, history_bytes=1)
    async with running.connect() as live:
        await subscribe(live, "posts")
        await insert(db, "one", "two", "three")
        first, *rest = await collect(live, 3)
    await pgbouncer.kill()
    async with running.connect() as resumed:
        await subscribe(resumed, "posts", since=first["id"])
        await wait_for(lambda: running.bridge.catchup_failures >= 3, what="three failed catch-up reads")

        status, text = await http_get(running.port, "/healthz")
        body = json.loads(text)
        assert status == 200 and body["status"] == "degraded", body
        assert body["catch_up_read_failures"] >= 3, body
        assert body["catch_up_read_error"].startswith("ConnectionRefusedError"), body
        assert str(pgbouncer.port) not in text, body  # /healthz names no database host (the log does)
        status, text = await http_get(running.port, "/metrics")
        assert status == 200
        assert metric(text, "pgbridge_catch_up_read_failures_total") >= 3
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        refused = [m for m in said if "catching up failed: cannot reach PostgreSQL" in m and str(pgbouncer.port) in m]
        assert len(refused) == 1, said  # three failures or more, one line

        await pgbouncer.start()
        events = await collect(resumed, 2)
        assert [e["id"] for e in events] == [e["id"] for e in rest]
    body = await health(running.port)
    assert body["catch_up_read_failures"] >= 3 and body["catch_up_reads"] >= 1, body


@pytest.mark.parametrize("relay", ["relayed", "no relay"])
async def test_a_follow_only_bridge_serves_through_transaction_mode_alone(
    relay: str, dsn: str, db: asyncpg.Connection, posts: str, pgbouncer: PgBouncer, start_bridge: Bridges
) -> None:
    """A bridge whose every connection goes through the transaction-mode pool: with ``--follow-only`` it
    follows the bridge that ticks (through its relay, or reading the ticks the ticker announces), and its
    clients get every change once, in order; it never takes the ticks, even once the ticker is gone."""
    ticker = await start_bridge(dsn, relay_port=0 if relay == "relayed" else -1)
    await wait_for(lambda: ticker.bridge.listener.ticking, what="the ticker")
    follower = await start_bridge(pgbouncer.dsn(), follow_only=True)
    listener = follower.bridge.listener
    if relay == "relayed":
        await wait_for(lambda: listener.link is not None, what="the follower on the relay")
    async with follower.connect() as ws:
        await subscribe(ws, "posts")
        titles = [f"t{i}" for i in range(20)]
        await insert(db, *titles)
        assert [e["data"]["title"] for e in await collect(ws, 20)] == titles
        assert (listener.relayed_pages > 0) is (relay == "relayed") and listener.ticks_taken == 0
        await ticker.stop()
        await insert(db, "unseen")
        await assert_silent(ws, 2 * LEASE)  # released: a bridge that could tick would have taken over by now
        assert not listener.ticking and (await health(follower.port))["ticker"] is False
        ticker = await start_bridge(dsn)  # a ticker again: what committed meanwhile comes
        assert (await collect(ws, 1))[0]["data"]["title"] == "unseen"
