"""A benchmark client process for Server-Sent Events: many streams, each counting what arrives.

``python -m tests.bench.sse_client PORT PATH COUNT`` opens COUNT streams of ``GET PATH`` on
127.0.0.1:PORT, each a bare HTTP/1.1 request on a socket of its own, so that the client side costs little
(the counterpart of ``tests/bench/client.py``'s picows): it counts the data events in the bytes as they
come (``event: posts.`` lines), without decoding the chunks or the JSON. It prints ``ready`` once every
stream has had its ``subscribed`` event, then, for every ``count`` line it reads on stdin, the number of
data events all streams have received.
"""

from __future__ import annotations

import asyncio
import itertools
import resource
import sys
from typing import cast

EVENT = b"\nevent: posts."
SUBSCRIBED = b"\nevent: subscribed\n"


class Stream(asyncio.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.events = 0
        self.tail = b""
        self.head = b""  # what came before the subscribed event
        self.subscribed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.request)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        chunk = self.tail + data
        if not self.subscribed.done():
            self.head += data
            if len(self.head) >= 12 and not self.head.startswith(b"HTTP/1.1 200"):
                self.subscribed.set_exception(RuntimeError(f"refused: {self.head[:300]!r}"))
                return
            if SUBSCRIBED in self.head:
                self.subscribed.set_result(None)
        self.events += chunk.count(EVENT)
        self.tail = chunk[-(len(EVENT) - 1) :]  # too short to hold a whole marker: none is counted twice

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError(f"the stream ended before it was subscribed: {exc}"))


async def main(port: int, path: str, count: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    streams: list[Stream] = []
    for start in range(0, count, 200):
        connecting = (loop.create_connection(lambda: Stream(request), "127.0.0.1", port) for _ in range(200))
        opened = await asyncio.gather(*itertools.islice(connecting, count - start))
        batch = [protocol for _, protocol in opened]
        await asyncio.gather(*(s.subscribed for s in batch))
        streams += batch
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        sys.stdout.write(f"{sum(s.events for s in streams)}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
