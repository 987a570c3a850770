"""The fan-out baseline: a minimal aiohttp server writing pre-encoded frames to every socket.

``python -m tests.bench.baseline PORT`` accepts WebSocket connections at the bridge's path, confirms any
subscribe message, and on ``POST /blast?n=N`` writes N data events (the same frames to every socket,
built once), pausing only while a socket's buffer is over 1 MiB: what a bridge's fan-out would cost
with nothing else to do.
"""

from __future__ import annotations

import asyncio
import sys

import orjson
from aiohttp import web

from pgbridge import frames

SOCKETS: list[asyncio.Transport] = []


async def realtime(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    async for msg in ws:
        if msg.type == web.WSMsgType.TEXT:
            await ws.send_str('{"status":"subscribed","type":"subscribed","collection":"posts"}')
            SOCKETS.append(transport)
    if transport in SOCKETS:
        SOCKETS.remove(transport)
    return ws


async def blast(request: web.Request) -> web.Response:
    n = int(request.query["n"])
    transports = list(SOCKETS)
    for i in range(1, n + 1):
        row = {"id": i, "title": "hello world", "created_at": "2026-01-01T00:00:00.000000+00:00"}
        event = {"type": "posts.create", "timestamp": "2026-01-01T00:00:00.000Z", "id": f"{i}.0", "data": row}
        frame = frames.text_frame(orjson.dumps(event))
        for transport in transports:
            transport.write(frame)
        while any(t.get_write_buffer_size() > 1 << 20 for t in transports):  # noqa: ASYNC110 (polls sockets)
            await asyncio.sleep(0.001)
    return web.Response(text="sent")


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/api/v1/realtime/ws", realtime)
    app.router.add_post("/blast", blast)
    app.router.add_get("/healthz", healthz)
    import uvloop

    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main(int(sys.argv[1]))
