"""An awaitable given a deadline, and given up at it without waiting for it to end.

`asyncio.timeout` cancels what it wraps and then waits for it to finish: a database driver's query on a
connection to a hung server (SIGSTOP, a partition: nothing answered, nothing refused) handles the
cancellation by resetting the connection before the pool takes it back, which waits for that same server.
Here the attempt runs as its own task: at the deadline it is cancelled and left to end when it can, and
the caller goes on at once (its result, or error, is then dropped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """The result of `awaitable` if it ends within `seconds`; else TimeoutError at the deadline."""
    attempt = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait((attempt,), timeout=seconds)
    except asyncio.CancelledError:
        _abandon(attempt)
        raise
    if attempt.done():
        return attempt.result()
    _abandon(attempt)
    raise TimeoutError(f"no answer within {seconds} s")


# Abandoned attempts, held until they end: the loop keeps only weak references to tasks.
_abandoned: set[asyncio.Future[Any]] = set()


def _abandon(attempt: asyncio.Future[Any]) -> None:
    attempt.cancel()
    if not attempt.done():
        _abandoned.add(attempt)
    attempt.add_done_callback(_retrieved)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """The abandoned attempt's error is nobody's: retrieved so that asyncio does not log it."""
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()
