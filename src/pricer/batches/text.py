"""JSON number text for whole columns at once: the bytes msgspec would write for each value, made with NumPy.

A column of n values becomes an (n, width) matrix of ASCII codes where unused places hold NUL; rows of a
record are matrices side by side, and the text is the matrix's bytes with the NULs removed (JSON text
never holds a raw NUL). No Python object is made per value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from pricer.pricing.core import Int64Array

UInt8Matrix = npt.NDArray[np.uint8]

# Widest non-negative integer written: a fee of a 10^9-dollar position at 1,000 % for 366 days is below
# 10^13 cents, an index below 10^7; 19 digits hold every int64.
INT_WIDTH: Final = 19
MONEY_DOLLAR_WIDTH: Final = 13
_ZERO: Final = ord("0")
_HEX: Final = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_SHIFTS: Final = np.arange(28, -1, -4, dtype=np.int64)


def _cents_fraction_table() -> UInt8Matrix:
    """The text after the dollars of `cents / 100` as msgspec writes it (shortest repr): `.0`, `.5`, `.05`."""
    table = np.zeros((100, 3), dtype=np.uint8)
    for cents in range(100):
        text = repr(cents / 100)[1:].encode()  # "0.05" -> ".05", "0.5" -> ".5", "0.0" -> ".0"
        table[cents, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return table


_FRACTION: Final = _cents_fraction_table()


def digits(values: Int64Array, width: int = INT_WIDTH) -> UInt8Matrix:
    """Decimal digits of non-negative integers, right-aligned in `width` places, leading places NUL."""
    count = values.shape[0]
    out = np.zeros((count, width), dtype=np.uint8)
    remaining = values.astype(np.int64, copy=True)
    for place in range(width - 1, -1, -1):
        out[:, place] = remaining % 10
        remaining //= 10
        if place < width - 1 and not remaining.any():
            # Every value fits in the places written so far: the rest stay NUL.
            out[:, place:] += _ZERO
            started = np.logical_or.accumulate(out[:, place:] != _ZERO, axis=1)
            started[:, -1] = True
            out[:, place:][~started] = 0
            return out
    out += _ZERO
    started = np.logical_or.accumulate(out != _ZERO, axis=1)
    started[:, -1] = True
    out[~started] = 0
    return out


def money(cents: Int64Array) -> UInt8Matrix:
    """`cents / 100` as msgspec writes that float (410.96, 25.0, 0.5), for non-negative cents below 10^15."""
    whole = digits(cents // 100, MONEY_DOLLAR_WIDTH)
    return np.concatenate((whole, _FRACTION[cents % 100]), axis=1)


def hex8(values: Int64Array) -> UInt8Matrix:
    """Eight lower-case hex digits of each value below 2^32 (a quote id's row part)."""
    nibbles = (values[:, None] >> _HEX_SHIFTS) & 15
    out: UInt8Matrix = _HEX[nibbles]
    return out


def table(texts: Sequence[bytes]) -> UInt8Matrix:
    """Byte strings as the rows of a NUL-padded matrix, to be picked per row by index."""
    width = max((len(text) for text in texts), default=1) or 1
    out = np.zeros((max(len(texts), 1), width), dtype=np.uint8)
    for row, text in enumerate(texts):
        out[row, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return out


def constant(text: bytes, count: int) -> UInt8Matrix:
    """`text` in each of `count` rows (a broadcast view: no copy)."""
    return np.broadcast_to(np.frombuffer(text, dtype=np.uint8), (count, len(text)))


def join_rows(blocks: Sequence[UInt8Matrix]) -> bytes:
    """The text of records laid out side by side in `blocks`, NULs dropped."""
    if not blocks or blocks[0].shape[0] == 0:
        return b""
    return np.concatenate(blocks, axis=1).tobytes().replace(b"\x00", b"")


def join_column(block: UInt8Matrix) -> bytes:
    """A JSON array's inside (`1,2,3`) from a matrix of texts, one per row."""
    text = join_rows((block, constant(b",", block.shape[0])))
    return text[:-1]
