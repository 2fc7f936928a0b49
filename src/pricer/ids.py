"""Random identifiers (request ids, quote batch ids) from the OS's CSPRNG, read in blocks.

`secrets.token_hex` makes one `getrandom` system call per id; on the single-quote path that is two
calls per request. Reading 4 KiB at a time keeps the same source and unpredictability for ~1/200 of
the calls.
"""

from __future__ import annotations

import os

_BLOCK_BYTES = 4096


class RandomHex:
    def __init__(self) -> None:
        self._block = b""
        self._offset = 0

    def __call__(self, nbytes: int) -> str:
        """`nbytes` random bytes as 2 * nbytes hex digits."""
        start = self._offset
        end = start + nbytes
        if end > len(self._block):
            # A fork (uvicorn workers) must not reuse its parent's unread bytes: os.register_at_fork
            # resets the block below.
            self._block = os.urandom(max(_BLOCK_BYTES, nbytes))
            start, end = 0, nbytes
        self._offset = end
        return self._block[start:end].hex()

    def reset(self) -> None:
        self._block = b""
        self._offset = 0


random_hex = RandomHex()
os.register_at_fork(after_in_child=random_hex.reset)
