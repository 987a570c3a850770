"""Catching up: feeding subscriptions from the change log until they reach the live stream.

A subscription that asks for ``since``, follows a snapshot, or whose client fell too far behind to
take live messages, is fed the positions it has not had yet: from the listener's recent history in
memory when that reaches back far enough, else from the change log, at the pace the client's socket
drains. Once it has every row up to the one the listener routed last, it rejoins live delivery at once
(no ``await`` in between), so the next row it gets live is the next row. The client sees one stream,
in order, with no gap and no duplicate.

A feed may carry several subscriptions of one session (an SSE stream, whose one ``Last-Event-ID``
resumes all its collections): they are fed together, in position order across their collections.

Feeds take :class:`Turns` on the event loop, one at a time and for a millisecond each, so that however
many clients catch up at once, the loop still reads the database and the live clients between two turns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol

from pgbridge import protocol
from pgbridge.changelog import PAGE
from pgbridge.errors import DatabaseUnavailable, Pruned
from pgbridge.events import MAX_ID, Change, Position
from pgbridge.history import History
from pgbridge.listener import Listener
from pgbridge.logs import OncePer
from pgbridge.router import Router, Subscription

log = logging.getLogger(__name__)
_failing_log = OncePer(60)  # one line a minute for each reason, whichever feeds it stops
_TURN = 0.001  # seconds a feed may hold the event loop before it gives the next feed its turn


class Sink(Protocol):
    id: str
    """Names the client in logs and health."""
    closing: bool

    def send(self, message: protocol.Message) -> None:
        """Queue a message now, whatever the client's backlog."""

    def backlogged(self) -> bool:
        """Whether :meth:`send_paced` would first wait for the client to take what waits for it."""

    async def send_paced(self, messages: Sequence[protocol.Message]) -> None:
        """Send ``messages``, first waiting while the client's socket has too much unsent data."""


class LogReader(Protocol):
    """The change log as catching-up subscriptions read it."""

    async def read(
        self, after: tuple[int, int], upto: int, collections: tuple[str, ...]
    ) -> tuple[list[Change], tuple[int, int]]:
        """As :func:`pgbridge.changelog.read`; raises :class:`DatabaseUnavailable`."""

    async def count(self, after: tuple[int, int], upto: tuple[int, int], collections: tuple[str, ...]) -> int:
        """As :func:`pgbridge.changelog.count`; raises :class:`DatabaseUnavailable`."""


class Turns:
    """The feeds' share of the event loop: one feed at a time holds the turn, for at most ``turn`` seconds
    of work, then the next waiting feed has it (first come, first served).

    Each feed yielding on its own would not do: the loop runs every ready task in one pass, so a hundred
    feeds that each work 5 ms between yields keep the listener and the live clients waiting half a second.
    With turns, they wait one turn. A feed gives its turn up before it waits for anything else (its
    client's socket, the listener), so a slow client never holds the others back.
    """

    def __init__(self, turn: float = _TURN) -> None:
        self.turn = turn
        self._holder: object | None = None
        self._since = 0.0
        self._waiting: deque[tuple[object, asyncio.Future[None]]] = deque()
        self._handing = False  # a hand-off to the first waiting feed is scheduled

    async def take(self, feed: object) -> None:
        """Return with ``feed`` holding the turn: at once if it holds it and its time is not up, else after
        every feed that asked before it had its turn, and never in the pass of the loop where the turn was
        last given up."""
        loop = asyncio.get_running_loop()
        if self._holder is feed:
            if loop.time() - self._since < self.turn:
                return
            self.give(feed)
        waiter = loop.create_future()
        self._waiting.append((feed, waiter))
        if self._holder is None and not self._handing:
            self._handing = True
            loop.call_soon(self._hand_on)
        try:
            await waiter
        except asyncio.CancelledError:
            if self._holder is feed:  # handed the turn as it was cancelled: pass it on
                self.give(feed)
            elif (feed, waiter) in self._waiting:  # else a hand-off passed it over already
                self._waiting.remove((feed, waiter))
            raise

    def give(self, feed: object) -> None:
        """``feed`` gives its turn up (nothing if it does not hold it): the longest waiting feed has it next."""
        if self._holder is feed:
            self._holder = None
            self._hand_on()

    def _hand_on(self) -> None:
        self._handing = False
        if self._holder is not None:
            return
        while self._waiting:
            feed, waiter = self._waiting.popleft()
            if not waiter.done():
                self._holder, self._since = feed, asyncio.get_running_loop().time()
                waiter.set_result(None)  # it runs on the loop's next pass, after the loop polled for I/O
                return


class Feed:
    """Feeds ``subs``, which are not live, the rows after ``done``; then makes them live.

    ``done`` may be ahead of the listener (a client resuming from a row another replica delivered):
    the feed then waits for the listener to get there.
    """

    def __init__(
        self,
        subs: Iterable[Subscription],
        sink: Sink,
        router: Router,
        listener: Listener,
        history: History,
        reader: LogReader,
        turns: Turns,
        done: Position,
        first: Change | None = None,
    ) -> None:
        self.subs = {sub.collection: sub for sub in subs}
        self.collections = tuple(sorted(self.subs))
        self._sink, self._router, self._listener, self._history, self._reader = sink, router, listener, history, reader
        self._turns = turns
        self.done = done
        """Every row up to this position is delivered (or was not for these subscriptions)."""
        self._queue: deque[Change] = deque()
        # Read the change log after this (tick, id): done's change is next, unless done is all of its tick.
        self._after = done[:2] if done[1] == MAX_ID else (done[0], done[1] - 1)
        if first is not None:
            self._queue.append(first)
            self._after = (first.tick, first.change_id)
        self.reads = 0
        self.at: str | None = first.timestamp if first is not None else None
        """The database time of the change being fed: how far behind the client is."""
        # Positions of the collections up to ``done``, counted as the listener's ``routed`` counts them;
        # None until counted (a client resuming from ``since``).
        self._passed: int | None = self._routed() if first is not None else None

    @property
    def client(self) -> str:
        return self._sink.id

    @property
    def lag(self) -> int | None:
        """How many positions of the collections the listener has routed that the client has yet to pass."""
        if self._passed is None:
            return None
        return max(0, self._routed() - self._passed)

    def _routed(self) -> int:
        routed = self._listener.routed
        return sum(routed[c] for c in self.collections)

    async def run(self) -> None:
        """Feed until caught up, and return with the subscriptions live."""
        try:
            await self._run()
        finally:
            self._turns.give(self)

    async def _run(self) -> None:
        listener, turns = self._listener, self._turns
        delay = 0.1
        while not self._sink.closing:
            head = listener.head
            if self.done > head:
                turns.give(self)
                await listener.advanced()
                continue
            if self._queue:
                if not await self._send_queued():  # the next row is beyond the head
                    if self._join():
                        return
                    turns.give(self)
                    await listener.advanced()
                continue
            if self._after >= head[:2]:
                if self._join():
                    return
                turns.give(self)
                await listener.advanced()
                continue
            try:
                if self._passed is None:
                    turns.give(self)
                    await self._count(head)
                if self._history.covers(self._after):
                    self._fetch(head)
                else:
                    turns.give(self)
                    await self._read(head)
            except Pruned:
                self._join(held=False)
                for collection in self.collections:
                    self._sink.send(protocol.resync_required(collection))
                return
            except DatabaseUnavailable as exc:
                if _failing_log(str(exc)):
                    log.warning("a read of the change log for a client catching up failed: %s; retrying, the "
                                "client waits meanwhile (reported once a minute)", exc,
                                extra={"client": self.client})  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            delay = 0.1

    def _join(self, *, held: bool = True) -> bool:
        """Rejoin the live stream after the listener's head; call only with nothing up to it left to send.

        False, and nothing done, while the router holds these subscriptions off live routing (their subject
        went over the routing budget for the change being routed): feeding goes on meanwhile."""
        if held and any(self._router.holds(sub) for sub in self.subs.values()):
            return False
        self.done = self._listener.head
        self._queue.clear()
        for sub in self.subs.values():
            self._router.attach(sub)
        return True

    async def _count(self, head: Position) -> None:
        """Count the positions from ``done`` to ``head``: from memory where the history holds them, the
        rest with one query over the same entries the reads will take."""
        routed, base = self._routed(), self._history.base
        if base is None:  # the listener has not started yet
            return
        pending = self._history.count(max(self._after, base), head, self.collections)
        if self._after < base:
            pending += await self._reader.count(self._after, base, self.collections)
        # The rows of done's own change up to done were delivered before (none when done is a whole tick).
        self._passed = routed - pending + (0 if self.done[1] == MAX_ID else self.done[2] + 1)

    def _fetch(self, head: Position) -> None:
        changes = self._history.after(self._after, PAGE, self.collections)
        self._queue.extend(changes)
        self._after = (changes[-1].tick, changes[-1].change_id) if len(changes) == PAGE else (head[0], head[1])

    async def _read(self, head: Position) -> None:
        changes, reached = await self._reader.read(self._after, head[0], self.collections)
        self.reads += 1
        self._queue.extend(changes)
        # A read that found nothing new has looked at every tick up to the head's.
        self._after = reached if reached > self._after else (head[0], MAX_ID)

    async def _send_queued(self) -> bool:
        """Send queued rows up to the listener's head; False when the next row is beyond it.

        Rows are sent in the feed's turns (:class:`Turns`), which live routing goes before: other clients'
        live messages go out meanwhile, however fast this client reads (a deferred subject's filters can
        take long to evaluate)."""
        turns, listener, sink = self._turns, self._listener, self._sink
        while self._queue:
            change = self._queue[0]
            sub = self.subs[change.collection]
            self.at = change.timestamp
            for row in range(change.units):
                position = change.position(row)
                if position <= self.done:
                    continue
                if position > listener.head:
                    return False
                await turns.take(self)
                while listener.routing:
                    turns.give(self)
                    await listener.quiet()
                    await turns.take(self)
                if sink.closing:
                    return True
                message = self._router.message_for(sub, change, row)
                if message is not None:
                    if sink.backlogged():
                        turns.give(self)
                    await sink.send_paced((message,))
                    if sink.closing:
                        return True
                self.done = position
                if self._passed is not None:
                    self._passed += 1
            self._queue.popleft()
        return True
