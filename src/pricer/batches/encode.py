"""Step 3 of a batch: the priced record into the response body, in the request's form (rows or columns).

The envelope (status, client, fee schedule, rates, errors) is encoded by msgspec from its Struct; the
per-row part (`quotes` or `columns`) is made column-wise from the record's int64 arrays (`text` for JSON;
fixed-width msgpack numbers for msgpack) and spliced in, without a Python object per row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Final, Literal

import msgspec
import numpy as np

import pricer.batches.text as text
from pricer.batches.decode import COLUMNS, DecodedBatch
from pricer.endpoints.views import rate_components
from pricer.pricing.core import Int64Array
from pricer.quotes import PricedBatch
from pricer.schemas import FeeScheduleView, RateComponents, RowError

# Rows formatted at a time: the text matrices of a chunk stay a few tens of MB whatever the batch size.
CHUNK_ROWS: Final = 8192
# Where the per-row part goes in the envelope: 0xC1 is never used in msgpack and never written in JSON.
_MARK: Final = b"\xc1" * 16


class _RowsBody(msgspec.Struct, kw_only=True):
    """BatchResponse (schemas) with its `quotes` pre-encoded; same fields, same order."""

    status: Literal["success"] = "success"
    client_id: str
    fee_schedule: FeeScheduleView
    calculated_at: dt.datetime
    count: int
    priced: int
    quotes: msgspec.Raw
    errors: list[RowError]


class _ColumnsBody(msgspec.Struct, kw_only=True):
    """ColumnarBatchResponse (schemas) with its `columns` pre-encoded; same fields, same order."""

    status: Literal["success"] = "success"
    client_id: str
    fee_schedule: FeeScheduleView
    calculated_at: dt.datetime
    count: int
    priced: int
    batch_id: str
    columns: msgspec.Raw
    rates: dict[str, RateComponents]
    errors: list[RowError]


_JSON = msgspec.json.Encoder()
_MSGPACK = msgspec.msgpack.Encoder()
_MONEY_COLUMNS: Final = ("total_fee", "borrow_cost", "markup", "transaction_fees")


def encode_batch_response(
    decoded: DecodedBatch,
    batch: PricedBatch,
    errors: list[RowError],
    fee_schedule: FeeScheduleView,
    *,
    msgpack: bool,
) -> bytes:
    """The batch response body (DESIGN §2.1): `quotes` for a batch sent as rows, `columns` (with `batch_id`
    and the `rates` used) for one sent as columns; `errors` are every row error, sorted by index."""
    return b"".join(encode_batch_parts(decoded, batch, errors, fee_schedule, msgpack=msgpack))


def encode_batch_parts(
    decoded: DecodedBatch,
    batch: PricedBatch,
    errors: list[RowError],
    fee_schedule: FeeScheduleView,
    *,
    msgpack: bool,
) -> list[bytes]:
    """`encode_batch_response` as the consecutive parts of the body (a few MB each), so that a large body
    can be sent part by part without ever being joined: a 10^6-row JSON answer is 250 MB, joined 500."""
    encoder = _MSGPACK if msgpack else _JSON
    if decoded.form == COLUMNS:
        envelope: _RowsBody | _ColumnsBody = _ColumnsBody(
            client_id=batch.client_id,
            fee_schedule=fee_schedule,
            calculated_at=batch.calculated_at,
            count=decoded.count,
            priced=batch.size,
            batch_id=batch.batch_id,
            columns=msgspec.Raw(_MARK),
            rates={rate.ticker: rate_components(rate) for rate in batch.rates},
            errors=errors,
        )
        parts = _msgpack_columns(batch) if msgpack else _json_columns(batch)
    else:
        envelope = _RowsBody(
            client_id=batch.client_id,
            fee_schedule=fee_schedule,
            calculated_at=batch.calculated_at,
            count=decoded.count,
            priced=batch.size,
            quotes=msgspec.Raw(_MARK),
            errors=errors,
        )
        parts = _msgpack_quotes(batch) if msgpack else _json_quotes(batch)
    head, tail = encoder.encode(envelope).split(_MARK)
    return [head, *parts, tail]


def _chunks(count: int) -> Iterator[slice]:
    for start in range(0, count, CHUNK_ROWS):
        yield slice(start, min(start + CHUNK_ROWS, count))


# ---- JSON -------------------------------------------------------------------------------------------------


def _json_quotes(batch: PricedBatch) -> Iterator[bytes]:
    """The `quotes` array of a row-form response: BatchQuote objects' text, as msgspec writes them."""
    tickers = text.table([_JSON.encode(rate.ticker) for rate in batch.rates])
    rates = text.table([_JSON.encode(rate.rate) for rate in batch.rates])
    quote_id_head = b',"quote_id":"' + batch.batch_id.encode()
    yield b"["
    count = batch.size
    for rows in _chunks(count):
        size = rows.stop - rows.start
        which = batch.rate_index[rows]
        chunk = text.join_rows(
            (
                text.constant(b'{"index":', size),
                text.digits(batch.input_index[rows]),
                text.constant(quote_id_head, size),
                text.hex8(np.arange(rows.start, rows.stop, dtype=np.int64)),
                text.constant(b'","ticker":', size),
                tickers[which],
                text.constant(b',"position_value":', size),
                text.money(batch.position_cents[rows]),
                text.constant(b',"loan_days":', size),
                text.digits(batch.loan_days[rows]),
                text.constant(b',"total_fee":', size),
                text.money(batch.total_fee[rows]),
                text.constant(b',"breakdown":{"borrow_cost":', size),
                text.money(batch.borrow_cost[rows]),
                text.constant(b',"markup":', size),
                text.money(batch.markup[rows]),
                text.constant(b',"transaction_fees":', size),
                text.money(batch.transaction_fees[rows]),
                text.constant(b'},"borrow_rate_used":', size),
                rates[which],
                text.constant(b"},", size),
            )
        )
        yield chunk[:-1] if rows.stop == count else chunk
    yield b"]"


def _json_column(
    values: Int64Array, format_rows: Callable[[Int64Array], text.UInt8Matrix]
) -> Iterator[bytes]:
    count = values.shape[0]
    for rows in _chunks(count):
        chunk = text.join_column(format_rows(values[rows]))
        yield chunk if rows.stop == count else chunk + b","


def _json_columns(batch: PricedBatch) -> Iterator[bytes]:
    """The `columns` object of a columnar response."""
    yield b'{"index":['
    yield from _json_column(batch.input_index, text.digits)
    for name in _MONEY_COLUMNS:
        yield b'],"' + name.encode() + b'":['
        yield from _json_column(getattr(batch, name), text.money)
    yield b'],"borrow_rate_used":['
    rates = text.table([_JSON.encode(rate.rate) for rate in batch.rates])
    yield from _json_column(batch.rate_index, lambda which: rates[which])
    yield b"]}"


# ---- msgpack ----------------------------------------------------------------------------------------------


def _msgpack_array(type_byte: int, big_endian: np.ndarray[tuple[int], np.dtype[np.generic]]) -> bytes:
    """A msgpack array of fixed-width numbers: each an 8-byte big-endian payload after `type_byte`
    (0xd3 int64, 0xcb float64): valid msgpack, decoded as ints and floats by any reader."""
    count = big_endian.shape[0]
    items = np.empty((count, 9), dtype=np.uint8)
    items[:, 0] = type_byte
    items[:, 1:] = big_endian.view(np.uint8).reshape(count, 8)
    return b"\xdd" + count.to_bytes(4, "big") + items.tobytes()


def _msgpack_columns(batch: PricedBatch) -> Iterator[bytes]:
    yield b"\x86"
    yield _MSGPACK.encode("index")
    yield _msgpack_array(0xD3, batch.input_index.astype(">i8"))
    for name in _MONEY_COLUMNS:
        yield _MSGPACK.encode(name)
        yield _msgpack_array(0xCB, (getattr(batch, name) / 100).astype(">f8"))
    yield _MSGPACK.encode("borrow_rate_used")
    rates = np.array([rate.rate for rate in batch.rates], dtype=np.float64)
    yield _msgpack_array(0xCB, rates[batch.rate_index].astype(">f8"))


def _key(name: str) -> bytes:
    return _MSGPACK.encode(name)


def _be(values: np.ndarray[tuple[int], np.dtype[np.generic]], dtype: str) -> text.UInt8Matrix:
    """Each value's 8 big-endian bytes, one row per value."""
    return values.astype(dtype).view(np.uint8).reshape(values.shape[0], 8)


def _msgpack_quotes(batch: PricedBatch) -> Iterator[bytes]:
    """The `quotes` array of a row-form msgpack response: maps of BatchQuote's fields, numbers written
    fixed-width (int64 0xd3, float64 0xcb). The ticker is the one part of variable length: each row's
    bytes are kept by a mask (its ticker's, from a table of the batch's tickers)."""
    tickers = [_MSGPACK.encode(rate.ticker) for rate in batch.rates]
    ticker_bytes = text.table(tickers)
    width = ticker_bytes.shape[1]
    ticker_kept = np.array(
        [[place < len(ticker) for place in range(width)] for ticker in tickers] or [[True]]
    )
    rates = np.array([rate.rate for rate in batch.rates], dtype=np.float64)
    count = batch.size
    yield b"\xdd" + count.to_bytes(4, "big")
    quote_id_head = _key("quote_id") + b"\xd9\x20" + batch.batch_id.encode()
    for rows in _chunks(count):
        size = rows.stop - rows.start
        which = batch.rate_index[rows]
        before = (
            text.constant(b"\x88" + _key("index") + b"\xd3", size),
            _be(batch.input_index[rows], ">i8"),
            text.constant(quote_id_head, size),
            text.hex8(np.arange(rows.start, rows.stop, dtype=np.int64)),
            text.constant(_key("ticker"), size),
        )
        after = (
            text.constant(_key("position_value") + b"\xcb", size),
            _be(batch.position_cents[rows] / 100, ">f8"),
            text.constant(_key("loan_days") + b"\xd3", size),
            _be(batch.loan_days[rows], ">i8"),
            text.constant(_key("total_fee") + b"\xcb", size),
            _be(batch.total_fee[rows] / 100, ">f8"),
            text.constant(_key("breakdown") + b"\x83" + _key("borrow_cost") + b"\xcb", size),
            _be(batch.borrow_cost[rows] / 100, ">f8"),
            text.constant(_key("markup") + b"\xcb", size),
            _be(batch.markup[rows] / 100, ">f8"),
            text.constant(_key("transaction_fees") + b"\xcb", size),
            _be(batch.transaction_fees[rows] / 100, ">f8"),
            text.constant(_key("borrow_rate_used") + b"\xcb", size),
            _be(rates[which], ">f8"),
        )
        matrix = np.concatenate((*before, ticker_bytes[which], *after), axis=1)
        start = sum(block.shape[1] for block in before)
        kept = np.ones(matrix.shape, dtype=bool)
        kept[:, start : start + width] = ticker_kept[which]
        yield matrix[kept].tobytes()
