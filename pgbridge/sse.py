"""Server-Sent Events, ``GET /api/v1/realtime/subscribe``: the same sessions, one way, over plain HTTP.

For clients that cannot or would rather not use WebSockets: the browser's ``EventSource``, ``curl -N``,
proxies that pass only HTTP. The query says what to subscribe to; the stream then carries each message
as an event (``id:`` its position, ``event:`` its type, ``data:`` the JSON a WebSocket would carry),
each encoded once for all SSE streams. Positions are global, so the ``Last-Event-ID`` an
``EventSource`` sends by itself when it reconnects resumes every collection of the stream exactly:
the stream's subscriptions fall behind and catch up together, so that it stays in position order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11
from multidict import MultiMapping

from pgbridge import protocol
from pgbridge.errors import AuthError, ProtocolError
from pgbridge.events import parse_event_id
from pgbridge.protocol import Close, Message
from pgbridge.session import Session
from pgbridge.stream import BRIDGE, Stream

log = logging.getLogger(__name__)

_TOO_MANY = "Too many connections for this token"


def encode(message: Message) -> bytes:
    """A message as an SSE event (a heartbeat as a comment line)."""
    if message.event == "heartbeat":
        timestamp: str = orjson.loads(message.json)["timestamp"]
        return b": heartbeat " + timestamp.encode() + b"\n\n"
    head = b"id: " + message.id.encode() + b"\n" if message.id is not None else b""
    return b"".join((head, b"event: ", message.event.encode(), b"\ndata: ", message.json, b"\n\n"))


class _Hangup:
    """Stands where aiohttp feeds a connection's further bytes (as it does for WebSocket frames): a
    client of an event stream sends none, and aiohttp reports the connection's end here."""

    __slots__ = ("_gone",)

    def __init__(self, gone: asyncio.Event) -> None:
        self._gone = gone

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        return False, b""

    def feed_eof(self) -> None:
        self._gone.set()


class SSETransport(Stream):
    """A session's messages as SSE events, in the chunks of an HTTP/1.1 response (or bare, for 1.0)."""

    __slots__ = ("_chunked", "_close_timeout", "_done", "_gone")
    name = "sse"
    unidirectional = True

    def __init__(self, request: web.Request, limit: int, close_timeout: float) -> None:
        super().__init__(request, limit)
        self._chunked = request.version >= HttpVersion11
        self._close_timeout = close_timeout
        self._done = asyncio.Event()  # the server ended the stream
        self._gone = asyncio.Event()  # the connection is closed
        request.protocol._payload_parser = _Hangup(self._gone)

    def begin(self, retry: float) -> None:
        """Start the stream: how long an ``EventSource`` waits before it reconnects."""
        self._send([b"retry: %d\n\n" % round(retry * 1000)])

    def write(self, messages: Sequence[Message]) -> int:
        return self._send([m.encoded(encode) for m in messages])

    def _send(self, chunks: list[bytes]) -> int:
        size = sum(map(len, chunks))
        if self._chunked:  # aiohttp framed the response as chunked; its end is aiohttp's write_eof
            head = b"%x\r\n" % size
            chunks = [head, *chunks, b"\r\n"]
            size += len(head) + 2
        self._transport.writelines(chunks)
        return size

    def ping(self) -> None:
        """An event stream has no pings: its clients cannot answer."""

    async def close(self, code: int, reason: str) -> None:
        if not self._transport.is_closing():
            self.write([protocol.closing(code, reason)])
        self._done.set()
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._gone.wait()
        except TimeoutError:
            self._transport.abort()

    async def ended(self) -> None:
        """Return when the server ends the stream or the client leaves."""
        done, gone = asyncio.ensure_future(self._done.wait()), asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait((done, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            gone.cancel()


def cors_headers(request: web.Request, allowed: Sequence[str]) -> dict[str, str]:
    """What lets a page of another origin read the response (tokens are not cookies: no credentials)."""
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    origin = request.headers.get("Origin")
    if origin is not None and origin in allowed:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {"Vary": "Origin"}


async def preflight(request: web.Request) -> web.Response:
    """``OPTIONS``: what a page of another origin asks before it sends ``Authorization`` itself."""
    headers = cors_headers(request, request.app[BRIDGE].settings.cors_origins)
    if "Access-Control-Allow-Origin" in headers:
        headers.update({"Access-Control-Allow-Methods": "GET", "Access-Control-Max-Age": "600",
                        "Access-Control-Allow-Headers": "Authorization, Last-Event-ID, Cache-Control"})  # fmt: skip
    return web.Response(status=204, headers=headers)


def _refuse(status: int, text: str, headers: Mapping[str, str], **more: str) -> web.Response:
    return web.json_response({"error": text}, status=status, headers={**headers, **more})


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("token")


def requests(query: MultiMapping[str], last_event_id: str | None, max_collections: int) -> list[protocol.Subscribe]:
    """The subscriptions a stream's query asks for; raise :class:`ProtocolError` saying what is wrong.

    ``Last-Event-ID`` (sent by an ``EventSource`` when it reconnects) wins over ``since``, and over
    ``snapshot``: a client that has an id has had its snapshot. One that is not an id subscribes live,
    and :func:`handle` says ``resync_required``: an ``EventSource`` answered 400 would never reconnect.
    """
    names = query.getall("collection", [])
    if not names or any(not name for name in names):
        raise ProtocolError("Missing collection: add ?collection=<name> (repeat it for several)")
    if len(set(names)) != len(names):
        raise ProtocolError("Each collection may be named once")
    if len(names) > max_collections:
        raise ProtocolError(f"Max subscriptions reached ({max_collections})")
    single = {key: query[key] for key in ("filter", "snapshot", "limit") if key in query}
    if single and len(names) > 1:
        raise ProtocolError(f"{', '.join(sorted(single))} need exactly one collection")
    operations = query["operations"].split(",") if "operations" in query else None
    flt = None
    if "filter" in query:
        try:
            flt = orjson.loads(query["filter"])
        except orjson.JSONDecodeError:
            raise ProtocolError("Invalid filter: not JSON") from None
    snapshot = query.get("snapshot")
    if snapshot not in (None, "true", "false"):
        raise ProtocolError("Invalid snapshot: must be true or false")
    limit: int | None = None
    if "limit" in query:
        if not query["limit"].isdigit():
            raise ProtocolError("Invalid limit: a positive integer, only with snapshot")
        limit = int(query["limit"])
    since = last_event_id or query.get("since")
    resume = bool(last_event_id)
    if resume:
        try:
            parse_event_id(last_event_id)
        except ValueError:
            since = None  # not an id this server gave: the client must resync (see handle)
    return [
        protocol.subscription(
            name,
            operations=operations,
            filter=flt,
            since=since,
            snapshot=snapshot == "true" and not resume,
            limit=None if resume else limit,
        )
        for name in names
    ]


async def handle(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/realtime/subscribe?collection=…``: an event stream of those collections."""
    bridge = request.app[BRIDGE]
    s = bridge.settings
    cors = cors_headers(request, s.cors_origins)
    if bridge.full():
        return _refuse(503, "The server is at its connection limit; try again later", cors, **{"Retry-After": "5"})
    try:
        grant = bridge.admit(_token(request))
    except AuthError as exc:
        if exc.reason == _TOO_MANY:
            return _refuse(429, exc.reason, cors, **{"Retry-After": "5"})
        return _refuse(401, exc.reason, cors, **{"WWW-Authenticate": "Bearer"})
    transport = SSETransport(request, s.outbound_limit, s.close_timeout)
    session = Session(bridge, transport, grant, request.remote, ordered=True)
    try:
        wanted = requests(request.query, request.headers.get("Last-Event-ID"), s.max_subscriptions)
        session.check(wanted)
    except ProtocolError as exc:
        status = 403 if exc.forbidden else 503 if bridge.publications is None else 400
        return _refuse(status, exc.text, cors)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                 "X-Accel-Buffering": "no", **cors},
    )  # fmt: skip
    response.force_close()  # the stream ends the connection: nothing else may follow on it
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()
    await response.prepare(request)
    transport.begin(s.sse_retry)
    session.start()
    try:
        try:
            session.subscribe(wanted)
        except ProtocolError as exc:  # the publications changed while the response started
            await session.close(Close.POLICY, exc.text)
        if request.headers.get("Last-Event-ID") and wanted[0].since is None:
            for asked in wanted:
                session.send(protocol.resync_required(asked.collection))
        await transport.ended()
    finally:
        session.end()
    return response
