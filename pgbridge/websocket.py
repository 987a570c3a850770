"""The WebSocket endpoint, ``GET /api/v1/realtime/ws``: the SnackBase realtime protocol over RFC 6455.

A small transport around a :class:`~pgbridge.session.Session`: it upgrades the request, reads the
client's frames into the session, and turns the session's messages into text frames, once per message
for all WebSocket clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import WSMsgType, web

from pgbridge import frames, protocol
from pgbridge.errors import AuthError
from pgbridge.hub import Bridge
from pgbridge.logs import OncePer
from pgbridge.protocol import Close, Message
from pgbridge.session import Session
from pgbridge.stream import BRIDGE, Stream

log = logging.getLogger(__name__)

_left_log = OncePer(60)


def encode(message: Message) -> bytes:
    """A message as a WebSocket text frame: the same bytes for every client (server frames are not masked)."""
    return frames.text_frame(message.json)


class WebSocketTransport(Stream):
    """A session's messages as WebSocket text frames."""

    __slots__ = ("_close_timeout", "_ws")
    name = "websocket"
    unidirectional = False

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, limit: int, close_timeout: float) -> None:
        super().__init__(request, limit)
        self._ws = ws
        self._close_timeout = close_timeout

    def write(self, messages: Sequence[Message]) -> int:
        if len(messages) == 1:
            frame = messages[0].encoded(encode)
            self._transport.write(frame)
            return len(frame)
        chunks = [m.encoded(encode) for m in messages]
        self._transport.writelines(chunks)
        return sum(map(len, chunks))

    def ping(self) -> None:
        if not self._transport.is_closing():
            self._transport.write(frames.PING)

    async def close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            self._transport.abort()


def _offered_protocols(request: web.Request) -> list[str]:
    return [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]


async def handle(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/realtime/ws``: the SnackBase realtime protocol."""
    bridge = request.app[BRIDGE]
    if bridge.full():
        return web.json_response(
            {"error": "The server is at its connection limit; try again later"},
            status=503,
            headers={"Retry-After": "5"},
        )
    token = request.query.get("token")
    offered = _offered_protocols(request)
    conflict = False
    if "bearer" in offered:
        given = next((p for p in offered if p != "bearer"), None)
        conflict = token is not None and given is not None and given != token
        token = token or given
    elif offered:
        # Not a protocol we speak; dropping the header keeps aiohttp from logging it (it may be a token).
        request = request.clone(headers={k: v for k, v in request.headers.items() if k != "Sec-WebSocket-Protocol"})
    s = bridge.settings
    ws = web.WebSocketResponse(
        protocols=("bearer",) if "bearer" in offered else (),
        max_msg_size=s.max_frame,
        compress=False,
        timeout=s.close_timeout,
        autoping=False,  # pings are sent by one task for all sessions, and answered in serve()
    )
    bridge.handshakes += 1
    try:
        await ws.prepare(request)
    except ConnectionError:
        if _left_log():
            log.debug("a client left during its WebSocket upgrade (reported once a minute)")
        # Not the half-prepared WebSocket, which aiohttp would try to close with a traceback each time:
        # a response it fails to write to a closed connection, and drops quietly.
        return web.Response(status=400)
    finally:
        bridge.handshakes -= 1
    _require_masking(request, ws)
    try:
        if conflict:
            bridge.closed["Conflicting tokens"] += 1
            raise AuthError("Conflicting tokens: the query and the subprotocol carry different ones")
        grant = bridge.admit(token)
    except AuthError as exc:
        await ws.close(code=Close.POLICY, message=exc.reason.encode())
        return ws
    transport = WebSocketTransport(request, ws, s.outbound_limit, s.close_timeout)
    await serve(Session(bridge, transport, grant, request.remote), ws, transport)
    return ws


async def serve(session: Session, ws: web.WebSocketResponse, transport: WebSocketTransport) -> None:
    """Read the client's frames into its session until either side closes."""
    session.start()
    try:
        async for msg in ws:
            if session.closing:
                break
            session.heard(time.monotonic())
            if msg.type is WSMsgType.PONG:
                continue
            await transport.drained()  # read no more requests while the client does not take its replies
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.TEXT:
                try:
                    await session.receive(msg.data)
                except Exception:
                    log.exception("%s: internal error", session.id, extra=session.fields())
                    session.close_soon(Close.INTERNAL_ERROR, protocol.INTERNAL_ERROR)
            elif msg.type is WSMsgType.BINARY:
                session.send(protocol.error("Binary frames are not supported"))
    finally:
        session.end(ws.close_code)


def _require_masking(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Close with 1002 on a client frame that is not masked (RFC 6455, section 5.1).

    aiohttp's reader accepts such frames, so the bytes are checked on their way to it.
    """
    handler = request.protocol
    parser: Any = getattr(handler, "_payload_parser", None)
    if parser is not None:
        handler._payload_parser = _MaskGuard(parser, ws, request.app[BRIDGE])


class _MaskGuard:
    """Stands between a connection's bytes and aiohttp's WebSocket parser (one per connection: small)."""

    __slots__ = ("_bridge", "_check", "_parser", "_ws")

    def __init__(self, parser: Any, ws: web.WebSocketResponse, bridge: Bridge) -> None:
        self._parser, self._ws, self._bridge = parser, ws, bridge
        self._check = frames.MaskCheck()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._check.feed(data):
            return self._parser.feed_data(data)  # type: ignore[no-any-return]
        if not self._ws.closed:
            self._bridge.spawn(self._refuse(), "pgbridge-refuse-unmasked")
        return False, b""

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    async def _refuse(self) -> None:
        await self._ws.close(code=Close.PROTOCOL_ERROR, message=b"Client frames must be masked")
