"""The most recent changes the listener delivered, kept in memory. No I/O.

A client that is a little behind (a burst, a slow network) catches up from here without a database
read; one that is further behind reads the change log. The window holds whole changes in position
order and is bounded by the bytes of their rows.
"""

from __future__ import annotations

import bisect
from collections import deque

from pgbridge.events import Change, Position


class History:
    """Changes in position order, dropping the oldest beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._changes: deque[Change] = deque()
        self._keys: deque[tuple[int, int]] = deque()
        self._bytes = 0
        self.base: tuple[int, int] | None = None
        """Everything after this ``(tick, id)`` up to the newest change is here; None until reset."""

    def reset(self, base: tuple[int, int]) -> None:
        """Forget everything: the next change appended follows ``base``."""
        self._changes.clear()
        self._keys.clear()
        self._bytes = 0
        self.base = base

    def append(self, change: Change) -> None:
        self._changes.append(change)
        self._keys.append((change.tick, change.change_id))
        self._bytes += _size(change)
        while self._bytes > self._max_bytes and len(self._changes) > 1:
            old = self._changes.popleft()
            self._keys.popleft()
            self._bytes -= _size(old)
            self.base = (old.tick, old.change_id)

    def covers(self, after: tuple[int, int]) -> bool:
        """Whether every change after ``after`` (up to the newest) is held here."""
        return self.base is not None and after >= self.base

    def after(self, after: tuple[int, int], limit: int) -> list[Change]:
        """Up to ``limit`` held changes positioned after ``after``; call only when :meth:`covers` it."""
        start = bisect.bisect_right(self._keys, after)
        return [self._changes[i] for i in range(start, min(start + limit, len(self._changes)))]

    def count(self, after: tuple[int, int], upto: Position, collection: str) -> int:
        """How many positions of ``collection`` held here lie after ``after`` and up to ``upto``."""
        last = upto[:2]
        found = 0
        for i in range(bisect.bisect_right(self._keys, after), len(self._changes)):
            key, change = self._keys[i], self._changes[i]
            if key > last:
                break
            if change.collection == collection:
                found += change.units if key < last else min(change.units, upto[2] + 1)
        return found


def _size(change: Change) -> int:
    return sum(map(len, change.rows)) + (sum(map(len, change.olds)) if change.olds else 0) + 200
