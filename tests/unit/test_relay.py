"""The relay's pages: what the ticker encodes once is what every follower decodes, and nothing else is."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pgbridge.errors import DecodeError
from pgbridge.events import make_change
from pgbridge.relay import Page, decode, encode

TS = "2026-12-01T10:00:00.000001Z"


def test_a_page_of_every_kind_of_change_survives_the_relay() -> None:
    changes = [
        make_change(7, 1, "posts", "create", TS, 2, '{"id":1,"t":"a\\nb"}\n{"id":2,"t":"é"}'),
        make_change(7, 2, "posts", "update", TS, 2, '{"id":1,"v":2}\n{"id":1,"v":1}\n{"id":2,"v":2}\n{"id":2,"v":1}'),
        make_change(8, 3, "public.notes", "delete", TS, 1, '{"id":9}'),
        make_change(8, 4, "posts", "truncate", TS, 0, ""),
    ]
    page = Page((6, 2**63 - 1), (8, 4), 9, datetime(2026, 12, 1, 10, tzinfo=UTC), changes)
    back = decode(encode(page))
    assert back == page
    assert back.changes[1].olds == (b'{"id":1,"v":1}', b'{"id":2,"v":1}')  # old rows stay paired with new ones


def test_an_empty_page_moves_a_follower_on() -> None:
    page = Page((3, 5), (4, 2**63 - 1), 4, datetime(2026, 12, 1, tzinfo=UTC), [])
    assert decode(encode(page)) == page


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"v": 1, "after": [1], "reached": [1, 2], "newest": 1, "taken": "2026-12-01T00:00:00+00:00", "changes": []}',
        b'{"v": 1, "after": [1, 2], "reached": [1, 2], "newest": "x", "taken": "2026-12-01T00:00:00+00:00", '
        b'"changes": []}',
        b'{"v": 1, "after": [1, 2], "reached": [1, 2], "newest": 1, "taken": "yesterday", "changes": []}',
        b'{"v": 1, "after": [1, 2], "reached": [1, 2], "newest": 1, "taken": "2026-12-01T00:00:00+00:00", '
        b'"changes": [[1, 2, "posts", "explode", "t", 1, "{}"]]}',
        b'{"v": 1, "after": [1, 2], "reached": [1, 2], "newest": 1, "taken": "2026-12-01T00:00:00+00:00", '
        b'"changes": [[1, 2, "posts", "create", "t", 2, "{}"]]}',
        b'{"v": 1, "after": [1, 2], "reached": [1, 2], "newest": 1, "taken": "2026-12-01T00:00:00+00:00", '
        b'"changes": [[1, 2, "posts", "create", "t", 1, 17]]}',
    ],
)
def test_what_is_not_a_page_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_a_page_of_another_release_is_refused_saying_so() -> None:
    page = Page((3, 5), (4, 2**63 - 1), 4, datetime(2026, 12, 1, tzinfo=UTC), [])
    other = encode(page).replace(b'"v":1', b'"v":2')
    assert other != encode(page)
    with pytest.raises(DecodeError, match="format 2, where this bridge reads 1: the bridges run different releases"):
        decode(other)
