"""The ticker's pages of changes, passed to the bridges that follow it, so that they do not each read
every tick's batch from the database.

The bridge that holds the ticker lease serves ``/relay`` on a port of its own and records its address and
a secret in the lease, which only bridges may read. A follower connects there and receives each page of
changes the ticker routes, as the ticker routes it (once durable). Each page says where it starts, and a
follower applies one only right after what it has; otherwise (it connected late, the ticker dropped it for
reading too slowly, another bridge took the ticks over) it reads from the database as it would without a
relay. The relay saves database work; it is never the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from pgbridge import frames
from pgbridge.auth import bearer_matches
from pgbridge.errors import ConfigError, DecodeError
from pgbridge.events import Change, make_change

log = logging.getLogger(__name__)

PATH = "/relay"
BUFFER_LIMIT = 8 * 2**20
"""Bytes a follower may leave unread before the ticker drops it (it then reads from the database)."""
VERSION = 1
"""The pages' format: bridges of releases that write another follow the ticks from the database."""


@dataclass(frozen=True, slots=True)
class Page:
    """Changes positioned after ``after`` up to ``reached``, of ticks up to ``newest`` (taken at ``taken``)."""

    after: tuple[int, int]
    reached: tuple[int, int]
    newest: int
    taken: datetime
    changes: list[Change]


def _body(change: Change) -> str:
    if change.olds is None:
        return b"\n".join(change.rows).decode()
    return b"\n".join(line for pair in zip(change.rows, change.olds, strict=True) for line in pair).decode()


def encode(page: Page) -> bytes:
    """A page as one message, the same for every follower."""
    return orjson.dumps(
        {
            "v": VERSION,
            "after": page.after,
            "reached": page.reached,
            "newest": page.newest,
            "taken": page.taken.isoformat(),
            "changes": [
                (c.tick, c.change_id, c.collection, c.kind, c.timestamp, len(c.rows), _body(c)) for c in page.changes
            ],
        }
    )


def decode(data: bytes) -> Page:
    """The page :func:`encode` made; :class:`~pgbridge.errors.DecodeError` if it is not one."""
    try:
        raw = orjson.loads(data)
        if raw["v"] != VERSION:
            raise DecodeError(f"a relay page of format {raw['v']!r}, where this bridge reads {VERSION}: the "
                              "bridges run different releases")  # fmt: skip
        after, reached = raw["after"], raw["reached"]
        return Page(
            (int(after[0]), int(after[1])),
            (int(reached[0]), int(reached[1])),
            int(raw["newest"]),
            datetime.fromisoformat(raw["taken"]),
            [make_change(*c) for c in raw["changes"]],
        )
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"not a relay page: {exc!r}") from None


class RelayServer:
    """The ticker's side: serves ``/relay`` to followers that know :attr:`secret` and writes each
    :meth:`publish`\\ ed page to all of them, encoded once. A follower that leaves :data:`BUFFER_LIMIT`
    unread is dropped rather than waited for."""

    def __init__(self, host: str, port: int, advertise: str | None = None) -> None:
        self._host, self._port = host, port
        self._advertise = advertise or (socket.gethostname() if host in ("", "0.0.0.0", "::") else host)
        self.secret = secrets.token_urlsafe(32)
        self.url: str | None = None
        """Where followers connect, once :meth:`start` has bound the port."""
        self._followers: dict[asyncio.Transport, web.WebSocketResponse] = {}
        self._runner: web.AppRunner | None = None
        self.dropped = 0
        """Followers dropped for reading too slowly."""

    @property
    def followers(self) -> int:
        return len(self._followers)

    @property
    def address(self) -> tuple[str, str] | None:
        """What the ticker records in its lease for followers: :attr:`url` and :attr:`secret`, once started."""
        return None if self.url is None else (self.url, self.secret)

    async def start(self) -> None:
        """Listen; :attr:`url` says where."""
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self._host, self._port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"cannot listen on {self._host}:{self._port} for the relay to other bridges: {exc.strerror or exc} "
                "(choose another --relay-port, or 0 for any free one)"
            ) from None
        port = self._runner.addresses[0][1]
        host = f"[{self._advertise}]" if ":" in self._advertise else self._advertise
        self.url = f"ws://{host}:{port}{PATH}"

    async def stop(self) -> None:
        self.drop_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def drop_all(self) -> None:
        """Disconnect every follower (this bridge stopped ticking: they find the new ticker's relay)."""
        for transport in list(self._followers):
            transport.abort()
        self._followers.clear()

    def publish(self, page: Page) -> None:
        if not self._followers:
            return
        frame = frames.binary_frame(encode(page))
        for transport, ws in list(self._followers.items()):
            if transport.is_closing() or ws.closed:  # leaving: its handler forgets it
                continue
            if transport.get_write_buffer_size() > BUFFER_LIMIT:
                del self._followers[transport]
                self.dropped += 1
                transport.abort()
            else:
                transport.write(frame)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not bearer_matches(request.headers.get("Authorization", ""), self.secret):
            return web.json_response(
                {"error": "This port is the relay between pgbridge bridges; clients connect to the bridge's --port"},
                status=403,
            )
        ws = web.WebSocketResponse(compress=False, max_msg_size=4096, heartbeat=5)
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            return ws
        self._followers[transport] = ws
        try:
            async for _msg in ws:  # followers send nothing; this notices when they leave
                pass
        finally:
            self._followers.pop(transport, None)
        return ws


class RelayLost(Exception):
    """The connection to the ticker's relay ended."""


class RelayLink:
    """The follower's side: one connection to the ticker's relay."""

    def __init__(
        self, address: tuple[str, str], ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession
    ) -> None:
        self.address = address
        """The relay's URL and secret, as the lease gave them."""
        self._ws = ws
        self._session = session
        self._next: asyncio.Future[aiohttp.WSMessage] | None = None  # outlives a wait that timed out

    @classmethod
    async def connect(cls, url: str, secret: str) -> RelayLink:
        """Connect to the relay at ``url``; raises OSError or aiohttp's errors."""
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(
                url,
                headers={"Authorization": f"Bearer {secret}"},
                max_msg_size=0,
                compress=0,
                heartbeat=5,
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0),  # a ticker that does not answer holds nobody up
            )
        except BaseException:
            await session.close()
            raise
        return cls((url, secret), ws, session)

    async def receive(self, within: float) -> Page | None:
        """The next page, or None if none came within ``within`` seconds; raises :class:`RelayLost`."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._ws.receive())
        if not self._next.done():
            done, _ = await asyncio.wait((self._next,), timeout=within)
            if not done:
                return None
        msg, self._next = self._next.result(), None
        if msg.type is not WSMsgType.BINARY:
            raise RelayLost(f"the relay closed ({msg.type.name})")
        try:
            return decode(msg.data)
        except DecodeError as exc:
            raise RelayLost(str(exc)) from None

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
        with contextlib.suppress(Exception):
            await self._ws.close()
        await self._session.close()
