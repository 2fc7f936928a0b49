"""Letting go of large things off the event loop.

Freeing a large tmpfs file (unlinking it, or closing the last descriptor of an unlinked one) frees its pages
in the system call: a 10^6-row batch's response (250 MB) took tens of milliseconds. Dropping the last
reference to a priced batch whose columns map such a file (an evicted quote-store segment) unmaps it and
frees its pages the same way (10-25 ms measured on the loop). Both are done on one background thread: the
system calls release the GIL, so the loop goes on meanwhile.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_RELEASER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="releaser")


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def unlink_later(path: Path) -> None:
    try:
        _RELEASER.submit(unlink, path)
    except RuntimeError:  # the interpreter is exiting
        unlink(path)


def close_later(fd: int) -> None:
    try:
        _RELEASER.submit(os.close, fd)
    except RuntimeError:  # the interpreter is exiting
        os.close(fd)


def _drop(held: list[Any]) -> None:
    held.clear()


def drop_later(held: list[Any]) -> None:
    """Let go of the objects in `held` (a list the caller no longer touches) on the releaser's thread: the
    last references go there, and so does whatever their deallocation costs."""
    try:
        _RELEASER.submit(_drop, held)
    except RuntimeError:  # the interpreter is exiting
        held.clear()


__all__ = ["close_later", "drop_later", "unlink", "unlink_later"]
