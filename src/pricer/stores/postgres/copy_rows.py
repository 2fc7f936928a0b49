"""The audit trail's rows as PostgreSQL binary COPY data: the `quote_rows` tuple layout (a NumPy
structured dtype and its template), money as fixed-width NUMERICs (`_money_digits`), the tuples of single
quotes and of whole batches (`_single_rows`, `_binary_rows`) and the COPY stream (`_row_stream`); a single
quote comes as its QuoteColumns (`single_row_values`), a batch as its PricedBatch."""

from __future__ import annotations

import itertools
import operator
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import numpy as np

from pricer.quotes import PricedBatch, QuoteColumns

_ROW_COLUMNS: Final = (
    "quote_id",
    "input_index",
    "rate_id",
    "loan_days",
    "position_value",
    "borrow_cost",
    "markup",
    "transaction_fees",
    "total_fee",
)
# quote_rows' money columns and the PricedBatch columns (cents) they hold.
_MONEY_COLUMNS: Final = (
    ("position_value", "position_cents"),
    ("borrow_cost", "borrow_cost"),
    ("markup", "markup"),
    ("transaction_fees", "transaction_fees"),
    ("total_fee", "total_fee"),
)

# PostgreSQL's binary COPY format (https://www.postgresql.org/docs/current/sql-copy.html): a signature,
# flags and header-extension length, then per tuple an int16 field count and, per field, an int32 length
# followed by the value (big-endian), and an int16 -1 trailer. A NUMERIC value is int16 ndigits, weight,
# sign and display scale, then ndigits base-10000 digits, most significant first; leading and trailing
# zero digits are allowed. Money is sent as 4 integer digits and 1 fractional one (cents * 100): up to
# 10^16 - 1 units, beyond what the columns accept (the server rejects a value over their precision).
_COPY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER: Final = b"\xff\xff"
_MONEY_DIGITS: Final = 5
_MONEY_LIMIT_CENTS: Final = 10 ** (4 * (_MONEY_DIGITS - 1)) * 100
_NUMERIC_NEGATIVE: Final = 0x4000


def _field(name: str, dtype: Any) -> list[tuple[Any, ...]]:
    return [(f"{name}_length", ">i4"), (name, dtype)]


# A NUMERIC money field of a tuple: its length, then the value's header and digits.
_MONEY_DTYPE: Final = np.dtype(
    [
        ("length", ">i4"),
        ("ndigits", ">i2"),
        ("weight", ">i2"),
        ("sign", ">u2"),
        ("dscale", ">i2"),
        ("digits", ">i2", (_MONEY_DIGITS,)),
    ]
)
_ROW_DTYPE: Final = np.dtype(
    [
        ("fields", ">i2"),
        *_field("quote_id", "V16"),
        *_field("input_index", ">i8"),
        *_field("rate_id", "V16"),
        *_field("loan_days", ">i4"),
        # The money columns are the tuple's last fields, one after the other: one sub-array holds them.
        ("money", _MONEY_DTYPE, (len(_MONEY_COLUMNS),)),
    ]
)


def _row_template() -> np.ndarray[Any, Any]:
    """One tuple with every field that is the same in all tuples filled in."""
    template = np.zeros(1, dtype=_ROW_DTYPE)
    template["fields"] = len(_ROW_COLUMNS)
    template["quote_id_length"] = 16
    template["input_index_length"] = 8
    template["rate_id_length"] = 16
    template["loan_days_length"] = 4
    money = template["money"]
    money["length"] = 8 + 2 * _MONEY_DIGITS
    money["ndigits"] = _MONEY_DIGITS
    money["weight"] = _MONEY_DIGITS - 2
    money["dscale"] = 2
    return template.view(np.uint8)


_ROW_TEMPLATE: Final = _row_template()


def _money_digits(cents: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(sign, base-10000 digits) of amounts in cents (any shape; the digits along a last axis more), as
    NUMERICs with 2 decimals."""
    magnitude = np.abs(cents)
    if magnitude.size and int(magnitude.max()) >= _MONEY_LIMIT_CENTS:
        raise ValueError(
            f"an amount of {int(magnitude.max()) / 100:.2f} is beyond what the audit trail holds"
        )
    digits = np.empty((*cents.shape, _MONEY_DIGITS), dtype=np.int64)
    digits[..., -1] = magnitude % 100 * 100
    whole = magnitude // 100
    for place in range(_MONEY_DIGITS - 2, -1, -1):
        digits[..., place] = whole % 10_000
        whole //= 10_000
    return np.where(cents < 0, _NUMERIC_NEGATIVE, 0), digits


def _check_batch(batch: PricedBatch) -> None:
    shape = batch.position_cents.shape
    if (
        not (
            batch.rate_index.shape
            == batch.input_index.shape
            == batch.loan_days.shape
            == batch.borrow_cost.shape
            == batch.markup.shape
            == batch.transaction_fees.shape
            == batch.total_fee.shape
            == shape
        )
        or len(shape) != 1
    ):
        raise ValueError(f"batch {batch.batch_id}: its columns differ in length")


# The PricedBatch columns a `quote_rows` tuple is built from, besides its ids.
_ROW_SOURCES: Final = (
    "rate_index",
    "input_index",
    "loan_days",
    *(attribute for _, attribute in _MONEY_COLUMNS),
)


_POSITION_CENTS: Final = operator.attrgetter("position_cents")
_ROW_SOURCE_GETTERS: Final = tuple((name, operator.attrgetter(name)) for name in _ROW_SOURCES)


def _joined_columns(batches: Sequence[PricedBatch]) -> tuple[list[int], dict[str, np.ndarray[Any, Any]]]:
    """(rows per batch, each source column of all batches end to end). Raises ValueError naming the first
    batch whose columns are not one-dimensional and of one length."""
    sizes = list(map(len, map(_POSITION_CENTS, batches)))
    joined: dict[str, np.ndarray[Any, Any]] = {}
    try:
        for attribute, column_of in _ROW_SOURCE_GETTERS:
            arrays = list(map(column_of, batches))
            if list(map(len, arrays)) != sizes:
                raise ValueError
            joined[attribute] = np.concatenate(arrays)
            if joined[attribute].ndim != 1:
                raise ValueError
    except (ValueError, TypeError):
        for batch in batches:
            _check_batch(batch)
        raise  # not reached: some batch fails its check
    return sizes, joined


def _tuples(
    quote_ids: np.ndarray[Any, Any],
    rate_ids: np.ndarray[Any, Any],
    input_index: np.ndarray[Any, Any],
    loan_days: np.ndarray[Any, Any],
    money_cents: np.ndarray[Any, Any],
) -> np.ndarray[Any, Any]:
    """Binary COPY tuples of `quote_rows` (without the framing) from their columns: 16-byte ids (uint8,
    one row each), integers, and money in cents, one column per `_MONEY_COLUMNS`."""
    total = quote_ids.shape[0]
    # The template's bytes repeated (a structured assignment of the template to every element costs
    # ~0.3 µs a row).
    tuples = np.tile(_ROW_TEMPLATE, total).view(_ROW_DTYPE)
    tuples["quote_id"] = quote_ids.view("V16").reshape(total)
    tuples["rate_id"] = rate_ids
    tuples["input_index"] = input_index
    tuples["loan_days"] = loan_days
    money = tuples["money"]  # a view: (rows, money columns)
    money["sign"], money["digits"] = _money_digits(money_cents)
    return tuples


def _batch_id_bytes(batch_ids: Sequence[str]) -> np.ndarray[Any, Any]:
    """The 12 bytes of each 24-hex-digit batch id, one row each."""
    return np.frombuffer(bytes.fromhex("".join(batch_ids)), dtype=np.uint8).reshape(len(batch_ids), 12)


def is_single_quote(columns: QuoteColumns) -> bool:
    """A consistent one-row batch priced at its one rate: written as a single quote (anything else is
    written, or refused, as a batch)."""
    return (
        len(columns.rates) == 1
        and columns.rate_index == [0]
        and len(columns.input_index)
        == len(columns.position_cents)
        == len(columns.loan_days)
        == len(columns.borrow_cost)
        == len(columns.markup)
        == len(columns.transaction_fees)
        == len(columns.total_fee)
        == 1
        and all(type(value) is int for value in single_row_values(columns))  # not a column of 2 dimensions
    )


# A single quote's row values, in this order: `single_row_values`.
SINGLE_ROW_VALUES: Final = (
    "rate_index",
    "input_index",
    "loan_days",
    *(attribute for _, attribute in _MONEY_COLUMNS),
)


def single_row_values(columns: QuoteColumns) -> list[int]:
    """The row of a single quote (`is_single_quote`) as SINGLE_ROW_VALUES."""
    return [
        columns.rate_index[0],
        columns.input_index[0],
        columns.loan_days[0],
        columns.position_cents[0],
        columns.borrow_cost[0],
        columns.markup[0],
        columns.transaction_fees[0],
        columns.total_fee[0],
    ]


def _single_rows(quotes: Sequence[QuoteColumns], rate_ids: bytes) -> np.ndarray[Any, Any]:
    """The tuples of single quotes (`is_single_quote`: row 0 of their batch); `rate_ids` holds each one's
    rate id."""
    # SINGLE_ROW_VALUES' order, one row each (from one flat sequence: NumPy converts nested sequences row
    # by row).
    table = np.fromiter(
        itertools.chain.from_iterable(map(single_row_values, quotes)),
        dtype=np.int64,
        count=len(quotes) * len(SINGLE_ROW_VALUES),
    ).reshape(len(quotes), len(SINGLE_ROW_VALUES))
    quote_ids = np.zeros((len(quotes), 16), dtype=np.uint8)
    quote_ids[:, :12] = _batch_id_bytes([quote.batch_id for quote in quotes])
    return _tuples(
        quote_ids,
        np.frombuffer(rate_ids, dtype="V16"),
        table[:, 1],
        table[:, 2],
        table[:, 3:],  # position, borrow cost, markup, transaction fees, total: _MONEY_COLUMNS' order
    )


def _binary_rows(
    batches: Sequence[PricedBatch], rate_ids: bytes, rate_counts: Sequence[int]
) -> np.ndarray[Any, Any]:
    """Every row of the batches, in order, as binary COPY tuples of `quote_rows`, built column-wise in
    one structured array (a part of a write is a slice of it). `rate_ids` are the 16-byte ids of each
    batch's rates, end to end, and `rate_counts` how many each batch has. Raises ValueError (naming the
    batch) if a batch's columns differ in length or a row's rate index is outside its batch's rates."""
    sizes, columns = _joined_columns(batches)
    total = sum(sizes)
    rate_index = columns["rate_index"]
    counts = np.array(rate_counts, dtype=np.int64)
    bad = np.flatnonzero((rate_index < 0) | (rate_index >= np.repeat(counts, sizes)))
    if bad.size:
        which = int(np.searchsorted(np.cumsum(sizes), int(bad[0]), side="right"))
        raise ValueError(f"batch {batches[which].batch_id}: a rate_index points outside its rates")
    first_rate = np.cumsum(counts) - counts
    first_row = np.cumsum(sizes) - sizes
    # quote_id = the batch's 12 bytes || the row's index in its batch (4 bytes, big-endian).
    quote_ids = np.zeros((total, 16), dtype=np.uint8)
    quote_ids[:, :12] = np.repeat(_batch_id_bytes([batch.batch_id for batch in batches]), sizes, axis=0)
    row_index = (np.arange(total, dtype=np.int64) - np.repeat(first_row, sizes)).astype(">u4")
    quote_ids[:, 12:] = row_index.view(np.uint8).reshape(total, 4)
    rate_rows = rate_index + np.repeat(first_rate, sizes)
    return _tuples(
        quote_ids,
        np.frombuffer(rate_ids, dtype="V16")[rate_rows],
        columns["input_index"],
        columns["loan_days"],
        np.stack([columns[attribute] for _, attribute in _MONEY_COLUMNS], axis=1),
    )


# The COPY data of a large write goes in chunks of this size: joined whole, 10^6 rows (about 100 MB) held
# the event loop for a quarter of a second.
COPY_CHUNK_BYTES: Final = 4 << 20


async def _row_stream(rows: np.ndarray[Any, Any]) -> AsyncIterator[bytes]:
    """A binary COPY's data of `rows` (from `_binary_rows`), for `copy_to_table(source=...)`: one chunk,
    as asyncpg sends each chunk on its own (a send costs tens of microseconds, a copy of the bytes less),
    unless it is larger than COPY_CHUNK_BYTES."""
    if rows.nbytes <= COPY_CHUNK_BYTES:
        yield b"".join((_COPY_SIGNATURE, rows.data, _COPY_TRAILER))
        return
    yield _COPY_SIGNATURE
    data = rows.reshape(-1).view(np.uint8)
    for start in range(0, data.shape[0], COPY_CHUNK_BYTES):
        yield data[start : start + COPY_CHUNK_BYTES].tobytes()
    yield _COPY_TRAILER
