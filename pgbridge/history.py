"""The most recent changes the listener delivered, kept in memory. No I/O.

A client that is a little behind (a burst, a slow network) catches up from here without a database
read; one that is further behind reads the change log. The window holds whole changes in position
order and is bounded by the bytes of their rows. Each collection's changes are also indexed on their
own, with a running count of their positions, so that finding where a client is, and how far it has
to go, costs a bisection however many changes of other collections lie in between.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from typing import NamedTuple

from pgbridge.events import Change, Position


class _Entry(NamedTuple):
    key: tuple[int, int]
    before: int
    """Positions of the collection held before this change (a running count: only differences matter)."""
    change: Change


def _key(entry: _Entry) -> tuple[int, int]:
    return entry.key


class History:
    """Changes in position order, dropping the oldest beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._changes: deque[tuple[Change, int]] = deque()  # with the bytes each one counts for
        self._collections: dict[str, deque[_Entry]] = {}
        self._bytes = 0
        self.base: tuple[int, int] | None = None
        """Everything after this ``(tick, id)`` up to the newest change is here; None until reset."""

    def reset(self, base: tuple[int, int]) -> None:
        """Forget everything: the next change appended follows ``base``."""
        self._changes.clear()
        self._collections.clear()
        self._bytes = 0
        self.base = base

    def append(self, change: Change) -> None:
        entries = self._collections.setdefault(change.collection, deque())
        before = entries[-1].before + entries[-1].change.units if entries else 0
        entries.append(_Entry((change.tick, change.change_id), before, change))
        size = _size(change)
        self._changes.append((change, size))
        self._bytes += size
        while self._bytes > self._max_bytes and len(self._changes) > 1:
            old, size = self._changes.popleft()
            entries = self._collections[old.collection]
            entries.popleft()  # the oldest of its collection too
            if not entries:
                del self._collections[old.collection]
            self._bytes -= size
            self.base = (old.tick, old.change_id)

    def covers(self, after: tuple[int, int]) -> bool:
        """Whether every change after ``after`` (up to the newest) is held here."""
        return self.base is not None and after >= self.base

    def after(self, after: tuple[int, int], limit: int, collections: tuple[str, ...]) -> list[Change]:
        """Up to ``limit`` held changes of ``collections`` positioned after ``after``, in order; call only
        when :meth:`covers` it."""
        found: list[list[Change]] = []
        for collection in collections:
            entries = self._collections.get(collection, ())
            start = bisect.bisect_right(entries, after, key=_key)
            found.append([entries[i].change for i in range(start, min(start + limit, len(entries)))])
        if len(found) == 1:
            return found[0]
        return list(itertools.islice(heapq.merge(*found, key=_position), limit))

    def count(self, after: tuple[int, int], upto: Position, collections: tuple[str, ...]) -> int:
        """How many positions of ``collections`` held here lie after ``after`` and up to ``upto``."""
        return sum(self._count(after, upto, collection) for collection in collections)

    def _count(self, after: tuple[int, int], upto: Position, collection: str) -> int:
        entries = self._collections.get(collection, ())
        last = upto[:2]
        start = bisect.bisect_right(entries, after, key=_key)
        end = bisect.bisect_right(entries, last, key=_key)
        if end <= start:
            return 0
        final = entries[end - 1]
        held = final.change.units if final.key < last else min(final.change.units, upto[2] + 1)
        return final.before + held - entries[start].before


def _position(change: Change) -> tuple[int, int]:
    return (change.tick, change.change_id)


def _size(change: Change) -> int:
    return sum(map(len, change.rows)) + (sum(map(len, change.olds)) if change.olds else 0) + 200
