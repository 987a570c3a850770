"""The listener's recent history in memory: counting and reading positions, and its byte budget."""

from __future__ import annotations

from pgbridge.events import MAX_ID, Change
from pgbridge.history import History


def test_history_counts_the_positions_of_one_collection() -> None:
    history = History(1 << 20)
    history.reset((1, MAX_ID))
    for tick, change_id, collection, rows in [(2, 5, "posts", 3), (2, 6, "notes", 2), (3, 4, "posts", 1)]:
        history.append(Change(tick, change_id, collection, "create", "", (b"{}",) * rows, None))
    history.append(Change(3, 7, "posts", "truncate", "", (), None))
    assert history.count((1, MAX_ID), (3, MAX_ID, 0), ("posts",)) == 3 + 1 + 1
    assert history.count((1, MAX_ID), (3, MAX_ID, 0), ("notes",)) == 2
    assert history.count((2, 5), (3, MAX_ID, 0), ("posts",)) == 2
    assert history.count((1, MAX_ID), (2, 5, 1), ("posts",)) == 2  # rows 0 and 1 of change 5, up to the head
    assert history.count((1, MAX_ID), (2, 6, 0), ("posts",)) == 3
    assert history.count((3, MAX_ID), (3, MAX_ID, 0), ("posts",)) == 0
    assert [c.change_id for c in history.after((2, 5), 10, ("posts",))] == [4, 7]
    assert [c.change_id for c in history.after((1, MAX_ID), 1, ("notes",))] == [6]
    assert (
        history.count((1, MAX_ID), (3, MAX_ID, 0), ("comments",)) == 0 and history.after((0, 0), 9, ("comments",)) == []
    )
    # several collections at once (an SSE stream's): in position order across them
    assert [c.change_id for c in history.after((1, MAX_ID), 10, ("notes", "posts"))] == [5, 6, 4, 7]
    assert [c.change_id for c in history.after((1, MAX_ID), 3, ("notes", "posts"))] == [5, 6, 4]
    assert history.count((1, MAX_ID), (3, MAX_ID, 0), ("notes", "posts")) == 5 + 2


def test_history_forgets_the_oldest_changes_beyond_its_budget() -> None:
    history = History(3 * (200 + 100))
    history.reset((0, MAX_ID))
    for change_id in range(1, 8):
        collection = "posts" if change_id % 2 else "notes"
        history.append(Change(1, change_id, collection, "create", "", (b"x" * 100,), None))
    assert history.base == (1, 4) and not history.covers((1, 3)) and history.covers((1, 4))
    assert [c.change_id for c in history.after((1, 4), 10, ("posts",))] == [5, 7]
    assert [c.change_id for c in history.after((1, 4), 10, ("notes",))] == [6]
    assert history.count((1, 4), (1, MAX_ID, 0), ("posts",)) == 2
