"""A benchmark client process: many WebSocket connections, each subscribed, counting what arrives.

``python -m tests.bench.client URL COUNT FIRST SUBSCRIBE`` opens COUNT connections (picows, so that the
client side costs little) and sends each the SUBSCRIBE message, where ``{i}`` stands for the
connection's number, starting at FIRST. It prints ``ready`` once all are subscribed, then, for every
line it reads on stdin, a JSON report: frames and bytes received per connection, when each had the reply
to its subscribe, and the receive time of each data event by row id, for rows whose id is in the sample
(every 1 in ``PGBRIDGE_SAMPLE`` rows) as connections in the sample receive them (every 1 in
``PGBRIDGE_SAMPLE_CONNECTIONS``; the others only count, which keeps the clients' CPU for receiving). The
data events it counts are the text frames that start with ``PGBRIDGE_COUNT`` (by default a change of
``posts``; ``{"type":"snap.snapshot"`` counts the rows of a snapshot of ``snap``).
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

SAMPLE = int(os.environ.get("PGBRIDGE_SAMPLE", "1"))
SAMPLE_CONNECTIONS = int(os.environ.get("PGBRIDGE_SAMPLE_CONNECTIONS", "1"))
COUNT = os.environ.get("PGBRIDGE_COUNT", '{"type":"posts.').encode()


class Counter(WSListener):
    def __init__(self, subscribe: bytes, received: dict[int, list[float]], sampled: bool) -> None:
        self.subscribe = subscribe
        self.sampled = sampled
        self.frames = 0
        self.bytes = 0
        self.confirmed = 0.0  # when the reply to the subscribe came
        self.subscribed = asyncio.get_running_loop().create_future()
        self.received = received

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send(WSMsgType.TEXT, self.subscribe)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        now = time.time()
        payload = frame.get_payload_as_bytes()
        if not self.subscribed.done():
            self.confirmed = now
            self.subscribed.set_result(None)
            return
        if not payload.startswith(COUNT):
            return  # a heartbeat, a pong, snapshot_end
        self.frames += 1
        self.bytes += len(payload)
        if SAMPLE and self.sampled:
            row = orjson.loads(payload)["data"]["id"]
            if row % SAMPLE == 0:
                self.received.setdefault(row, []).append(now)


async def main(url: str, count: int, first: int, subscribe: str) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    received: dict[int, list[float]] = {}
    clients: list[Counter] = []
    for start in range(0, count, 200):
        opened = await asyncio.gather(
            *(
                ws_connect(
                    lambda i=i: Counter(
                        subscribe.replace("{i}", str(i)).encode(), received, i % SAMPLE_CONNECTIONS == 0
                    ),
                    url,
                    max_frame_size=64 << 20,
                )
                for i in range(first + start, first + min(count, start + 200))
            )
        )
        clients += [listener for _, listener in opened if isinstance(listener, Counter)]
        await asyncio.gather(*(c.subscribed for c in clients[start:]))
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while command := await reader.readline():
        if command == b"count\n":
            sys.stdout.write(f"{sum(c.frames for c in clients)}\n")
        else:
            report = {"frames": [c.frames for c in clients], "bytes": sum(c.bytes for c in clients),
                      "received": received, "confirmed": [c.confirmed for c in clients]}  # fmt: skip
            sys.stdout.write(orjson.dumps(report, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
