"""WebSocket frames (RFC 6455) that pgbridge writes itself. No I/O.

A server frame is not masked, so the frame for a message is the same bytes for every client: the
router builds it once per event and each connection writes those bytes as they are.
"""

from __future__ import annotations

import struct

_TEXT = 0x81  # FIN + text opcode
_BINARY = 0x82  # FIN + binary opcode

PING = bytes((0x89, 0))
"""A ping with no payload."""


def text_frame(payload: bytes) -> bytes:
    """The complete frame carrying ``payload`` as one text message."""
    return _frame(_TEXT, payload)


def binary_frame(payload: bytes) -> bytes:
    """The complete frame carrying ``payload`` as one binary message."""
    return _frame(_BINARY, payload)


def _frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def payload(frame: bytes) -> bytes:
    """The message a frame built by :func:`text_frame` carries."""
    n = frame[1]
    return frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:]


class MaskCheck:
    """Follows the frame headers of a client's byte stream and reports the first unmasked frame.

    RFC 6455 section 5.1: a client masks every frame, and a server closes the connection (1002) on one
    that is not masked. It reads only headers; payloads are skipped, not copied.
    """

    __slots__ = ("_header", "_skip")

    def __init__(self) -> None:
        self._header = b""
        self._skip = 0

    def feed(self, data: bytes) -> bool:
        """Account for ``data``; False once an unmasked frame has been seen."""
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = 2
            header = self._header + data[pos : pos + 14 - len(self._header)]
            if len(header) >= 2:
                if not header[1] & 0x80:
                    return False
                size = header[1] & 0x7F
                need = 2 + (2 if size == 126 else 8 if size == 127 else 0) + 4
            if len(header) < need:
                self._header = header
                return True
            used = need - len(self._header)
            self._header = b""
            pos += used
            size = header[1] & 0x7F
            if size == 126:
                size = struct.unpack_from("!H", header, 2)[0]
            elif size == 127:
                size = struct.unpack_from("!Q", header, 2)[0]
            self._skip = size
        return True
