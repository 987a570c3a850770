"""A client's connection under aiohttp, as both transports write to it: bytes buffered, pacing, abort.

Transports write to the socket's asyncio transport directly, in one ``writelines`` per batch, rather
than through aiohttp's writers, which await per write. Writing is paced by asyncio's flow control:
catching up writes only while less than half of ``--outbound-limit`` waits, live messages may use it
all (see :meth:`pgbridge.session.Session.offer`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiohttp import web

from pgbridge.hub import Bridge

BRIDGE = web.AppKey("bridge", Bridge)
"""The application's :class:`~pgbridge.hub.Bridge`."""


class Stream:
    """The asyncio transport under an aiohttp request, with its flow control."""

    __slots__ = ("_protocol", "_transport", "buffered", "is_closing")

    def __init__(self, request: web.BaseRequest, limit: int) -> None:
        transport = request.transport
        assert transport is not None
        self._transport: asyncio.Transport = transport  # uvloop's is not a subclass of asyncio's
        self._protocol = request.protocol
        transport.set_write_buffer_limits(high=limit // 2, low=limit // 8)
        self.buffered: Callable[[], int] = transport.get_write_buffer_size
        """Bytes written and not yet taken by the operating system (a method, bound once: it is hot)."""
        self.is_closing: Callable[[], bool] = transport.is_closing

    def paused(self) -> bool:
        """Whether asyncio's flow control has paused writing to this client (see the buffer limits)."""
        return bool(self._protocol.writing_paused)

    async def drained(self) -> None:
        """Wait while asyncio's flow control has paused writing to this client."""
        if self.paused():
            # how aiohttp's own writers wait for a socket; a connection that is gone lets writes drop
            with contextlib.suppress(ConnectionError):
                await self._protocol._drain_helper()

    def abort(self) -> None:
        self._transport.abort()
