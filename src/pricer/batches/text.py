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

_HEX: Final = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_SHIFTS: Final = np.arange(28, -1, -4, dtype=np.int64)


def _group_table(*, lead: bool, last: bool) -> npt.NDArray[np.uint32]:
    """Each number below 10^4 as four ASCII digits, viewed as one uint32 (so that a gather moves four
    digits at once); `lead`: its leading zeros NUL (the group that starts a number), `last`: 0 is "0"."""
    out = np.zeros((10_000, 4), dtype=np.uint8)
    for number in range(10_000):
        written = f"{number:04d}".encode()
        if lead:
            shown = str(number).encode() if number or last else b""
            written = b"\x00" * (4 - len(shown)) + shown
        out[number] = np.frombuffer(written, dtype=np.uint8)
    return out.view(np.uint32).ravel()


_INNER: Final = _group_table(lead=False, last=False)
_LEADING: Final = _group_table(lead=True, last=False)
_ONLY: Final = _group_table(lead=True, last=True)


def _cents_fraction_table() -> npt.NDArray[np.uint32]:
    """The text after the dollars of `cents / 100` as msgspec writes it (shortest repr): `.0`, `.5`, `.05`."""
    table = np.zeros((100, 4), dtype=np.uint8)
    for cents in range(100):
        written = repr(cents / 100)[1:].encode()  # "0.05" -> ".05", "0.5" -> ".5", "0.0" -> ".0"
        table[cents, : len(written)] = np.frombuffer(written, dtype=np.uint8)
    return table.view(np.uint32).ravel()


_FRACTION: Final = _cents_fraction_table()


def digits(values: Int64Array) -> UInt8Matrix:
    """Decimal digits of non-negative integers, right-aligned, leading places NUL; as many places (a
    multiple of 4) as the largest value needs."""
    count = values.shape[0]
    top = int(values.max()) if count else 0
    groups = max(1, (len(str(top)) + 3) // 4)
    out = np.empty((count, groups), dtype=np.uint32)
    remaining = values
    for group in range(groups - 1, -1, -1):  # the last four digits first
        remaining, low = np.divmod(remaining, 10_000)
        starts = remaining == 0  # no digit above: this group starts the number (or is above it, all NUL)
        table = _ONLY if group == groups - 1 else _LEADING
        out[:, group] = np.where(starts, table[low], _INNER[low])
    return out.view(np.uint8)


def money(cents: Int64Array) -> UInt8Matrix:
    """`cents / 100` as msgspec writes that float (410.96, 25.0, 0.5), for non-negative cents below 10^15."""
    dollars, fraction = np.divmod(cents, 100)
    return np.concatenate((digits(dollars), _FRACTION[fraction][:, None].view(np.uint8)), axis=1)


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
    return np.concatenate(blocks, axis=1).tobytes().translate(None, b"\x00")


def join_column(block: UInt8Matrix) -> bytes:
    """A JSON array's inside (`1,2,3`) from a matrix of texts, one per row."""
    text = join_rows((block, constant(b",", block.shape[0])))
    return text[:-1]
