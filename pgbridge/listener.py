"""The listener: one dedicated PostgreSQL connection that LISTENs, and recovers what it missed.

It delivers every committed change exactly once and in commit order, across lost connections:
after reconnecting it LISTENs first, then replays from the change log everything positioned after
the last change it delivered, then continues with the notifications, skipping those the replay
already covered. Notifications are queued by the connection's callback and handled by one task, so
the connection keeps being read while a large change is fetched or clients are slow.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg

from pgbridge import changelog
from pgbridge.events import Change, DecodeError, decode_notification

log = logging.getLogger(__name__)

CHANNEL = "pgbridge"
PUBLICATIONS_CHANNEL = "pgbridge_publications"
_LAST = 2**63 - 1  # a change id after every real one


class ConnectionLost(Exception):
    """The listener's connection ended or stopped answering."""


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    dsn: str | None
    probe_interval: float = 5.0
    probe_timeout: float = 5.0
    connect_timeout: float = 10.0
    query_timeout: float = 30.0
    """Bounds every query on the connection, so that reconnecting cannot hang on a dead one."""
    backoff_max: float = 10.0
    verify: bool = False
    """Read every change back from the log instead of trusting notification payloads."""


class Listener:
    """Feeds every committed change to ``on_change``, and the set of published collections to
    ``on_publications``, for as long as :meth:`run` runs."""

    def __init__(
        self,
        settings: ListenerSettings,
        on_change: Callable[[Change], None],
        on_publications: Callable[[frozenset[str]], None],
    ) -> None:
        self._settings = settings
        self._on_change = on_change
        self._on_publications = on_publications
        self._lock = asyncio.Lock()  # one query at a time on the connection
        # The last change delivered: (seq, id); seq is None until looked up, id is _LAST before any.
        self._position: tuple[int | None, int] | None = None
        self.connected = False
        self.problem: str | None = "not connected yet"
        self.delivered = 0
        self._failures = 0

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with capped, jittered backoff."""
        last_logged = ("", 0.0)
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures += 1
                self.connected = False
                self.problem = _describe(exc)
                now = time.monotonic()
                if self.problem != last_logged[0] or now - last_logged[1] > 60:
                    log.warning("database connection unavailable: %s; reconnecting", self.problem)
                    last_logged = (self.problem, now)
            delay = random.uniform(0, min(self._settings.backoff_max, 0.1 * 2 ** min(self._failures, 10)))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        s = self._settings
        conn: asyncpg.Connection = await asyncpg.connect(
            s.dsn,
            timeout=s.connect_timeout,
            command_timeout=s.query_timeout,
            server_settings={"application_name": "pgbridge-listener"},
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        try:
            if self._position is None:
                # Everything committed after this point is delivered: read it before LISTEN so that
                # commits in between are replayed by the catch-up below.
                self._position = (await changelog.latest_seq(conn), _LAST)

            def enqueue(_c: object, _pid: int, channel: str, payload: str) -> None:
                queue.put_nowait((channel, payload))

            await conn.add_listener(CHANNEL, enqueue)
            await conn.add_listener(PUBLICATIONS_CHANNEL, enqueue)
            self._on_publications(await changelog.publications(conn))
            replayed = await self._catch_up(conn)
            log.info("listening for changes (%d replayed after connecting)", len(replayed))
            self.connected, self.problem, self._failures = True, None, 0
            await _first_failure(self._dispatch(conn, queue, replayed), self._probe(conn), _wait_lost(lost))
        finally:
            self.connected = False
            conn.terminate()

    async def _catch_up(self, conn: asyncpg.Connection) -> set[int]:
        assert self._position is not None
        seq, change_id = self._position
        if seq is None:
            seq = await changelog.seq_of(conn, change_id)
            if seq is None:
                log.error("change %d left the change log before the bridge reconnected: raise retention", change_id)
                seq, change_id = await changelog.latest_seq(conn), _LAST
        replayed: set[int] = set()
        while True:
            try:
                batch = await changelog.read_after(conn, seq, change_id)
            except changelog.Pruned:
                log.error("changes after transaction %d were pruned before delivery: raise retention", seq)
                seq, change_id = await changelog.latest_seq(conn), _LAST
                continue
            for seq, change in batch:
                change_id = change.change_id
                self._deliver(change, seq)
                replayed.add(change_id)
            if len(batch) < changelog.REPLAY_BATCH:
                return replayed

    async def _dispatch(
        self, conn: asyncpg.Connection, queue: asyncio.Queue[tuple[str, str]], replayed: set[int]
    ) -> None:
        while True:
            channel, payload = await queue.get()
            if channel == PUBLICATIONS_CHANNEL:
                async with self._lock:
                    self._on_publications(await changelog.publications(conn))
                continue
            try:
                item = decode_notification(payload)
            except DecodeError:
                log.exception("ignoring a notification that pgbridge's triggers did not write")
                continue
            if replayed:
                # The replay covered every commit up to its snapshot; notifications arrive in commit
                # order, so the first one it did not cover ends the overlap.
                if item.change_id in replayed:
                    continue
                replayed.clear()
            if not self._settings.verify and isinstance(item, Change):
                self._deliver(item, None)
                continue
            async with self._lock:
                found = await changelog.fetch_change(conn, item.change_id)
            if found is None:
                log.warning("ignoring a notification of change %d, which is not in the change log", item.change_id)
            elif self._settings.verify and not self._after_position(found[0], item.change_id):
                log.warning("ignoring a repeated notification of change %d", item.change_id)
            else:
                self._deliver(found[1], found[0])

    def _after_position(self, seq: int, change_id: int) -> bool:
        assert self._position is not None
        last_seq, last_id = self._position
        return last_seq is None or (seq, change_id) > (last_seq, last_id)

    def _deliver(self, change: Change, seq: int | None) -> None:
        self._position = (seq, change.change_id)
        self.delivered += 1
        try:
            self._on_change(change)
        except Exception:
            log.exception("routing change %d failed", change.change_id)

    async def _probe(self, conn: asyncpg.Connection) -> None:
        """Catch a connection that looks open but no longer answers (a half-open TCP connection)."""
        s = self._settings
        while True:
            await asyncio.sleep(s.probe_interval)
            async with self._lock:
                try:
                    await conn.fetchval("SELECT 1", timeout=s.probe_timeout)
                except TimeoutError:
                    raise ConnectionLost(f"no answer to a liveness probe within {s.probe_timeout:g}s") from None


async def _wait_lost(lost: asyncio.Event) -> None:
    await lost.wait()
    raise ConnectionLost("the server closed the connection")


async def _first_failure(*aws: Coroutine[Any, Any, None]) -> None:
    """Run coroutines together until one fails; cancel and await the others, then re-raise."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
        return f"{exc} (the pgbridge schema is missing: run `pgbridge migrate`)"
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
