"""Catching-up feeds take turns on the event loop: however many there are, one works per pass of the loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from pgbridge.feed import Turns


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_one_feed_works_per_pass_of_the_loop() -> None:
    turns = Turns(turn=0.002)
    worked: list[int] = []  # which feed did each piece of work, with -1 for each pass of the loop

    async def feed(n: int) -> None:
        while True:
            await turns.take(n)
            busy(0.0005)
            worked.append(n)

    enough = asyncio.Event()

    async def passes() -> None:
        for _ in range(200):
            worked.append(-1)
            await asyncio.sleep(0)
        enough.set()

    tasks = [asyncio.create_task(feed(n)) for n in range(20)] + [asyncio.create_task(passes())]
    await enough.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    per_pass: list[set[int]] = [set()]
    for n in worked:
        if n == -1:
            per_pass.append(set())
        else:
            per_pass[-1].add(n)
    assert max(len(feeds) for feeds in per_pass[:-1]) == 1  # the last ran on after the passes were counted
    # first come, first served: the feeds had their turns in the order they asked, round after round
    turns_taken = [n for i, n in enumerate(worked) if n >= 0 and n not in per_pass_of(worked, i)]
    assert turns_taken[:60] == list(range(20)) * 3


def per_pass_of(worked: list[int], i: int) -> set[int]:
    """The feeds that worked earlier in the pass of the loop where ``worked[i]`` was done."""
    start = i
    while start > 0 and worked[start - 1] != -1:
        start -= 1
    return set(worked[start:i])


async def test_a_feed_that_gives_its_turn_up_lets_the_next_go_at_once() -> None:
    turns = Turns(turn=60.0)
    await turns.take("slow client")
    second = asyncio.create_task(turns.take("other"))
    await asyncio.sleep(0)
    assert not second.done()  # the turn is held
    turns.give("slow client")  # before it waits for its socket
    await asyncio.wait_for(second, 1)
    turns.give("nobody")  # giving a turn one does not hold changes nothing
    third = asyncio.create_task(turns.take("third"))
    await asyncio.sleep(0.01)
    assert not third.done()
    turns.give("other")
    await asyncio.wait_for(third, 1)


async def test_a_feed_cancelled_as_it_is_handed_the_turn_passes_it_on() -> None:
    turns = Turns(turn=60.0)
    await turns.take("a")
    b = asyncio.create_task(turns.take("b"))
    c = asyncio.create_task(turns.take("c"))
    await asyncio.sleep(0)
    turns.give("a")  # b has the turn, but is cancelled before it runs
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    await asyncio.wait_for(c, 1)
    # and a waiter cancelled in line leaves the line
    d = asyncio.create_task(turns.take("d"))
    e = asyncio.create_task(turns.take("e"))
    await asyncio.sleep(0)
    d.cancel()
    with pytest.raises(asyncio.CancelledError):
        await d
    turns.give("c")
    await asyncio.wait_for(e, 1)
