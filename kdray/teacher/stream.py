"""Many requests through a bounded window of futures: the streaming behind `TeacherPool.map`, apart from
the pool's routing so each reads on its own."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any

__all__ = ["stream"]


def stream(
    send: Callable[[Any], Future], items: Iterable[Any], *, window: int, ordered: bool = True
) -> Iterator[Any]:
    """`send(item)` for each of `items` (a lazy iterable is read as the window frees up), with at most
    `window` futures pending. Yields the results in input order, or `(index, result)` in completion order
    when not `ordered`; the first failure is raised, and what was not sent yet is cancelled."""
    pending: deque[tuple[int, Future]] = deque()
    try:
        for index, item in enumerate(items):
            while len(pending) >= window:
                yield from _take(pending, ordered, block=True)
            pending.append((index, send(item)))
            yield from _take(pending, ordered, block=False)
        while pending:
            yield from _take(pending, ordered, block=True)
    finally:
        for _, future in pending:  # the caller stopped early: drop what has not been sent yet
            future.cancel()


def _take(pending: deque[tuple[int, Future]], ordered: bool, block: bool) -> Iterator[Any]:
    """Yield what is ready (at least one item when `block`), respecting the order mode."""
    if ordered:
        while pending and (block or pending[0][1].done()):
            block = False
            yield pending.popleft()[1].result()
        return
    if block and pending:
        wait_futures([f for _, f in pending], return_when=FIRST_COMPLETED)
    for item in [p for p in pending if p[1].done()]:
        pending.remove(item)
        yield item[0], item[1].result()
