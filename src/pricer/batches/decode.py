"""Step 1 of a batch: the request body (rows or columns, JSON or msgpack) into columns and row errors.

The usual body decodes in one typed pass (msgspec Structs without per-field bounds, so that one bad value
does not send the whole batch down the slow path); a body with a malformed row (a string where a number
belongs, a number out of float range, an unknown field) is decoded again leniently, so that each bad row
gets its own error. Tickers are normalised once per distinct text, not once per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from operator import attrgetter
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from pricer.errors import FieldProblem, InvalidParameter
from pricer.pricing.core import Float64Array, Int64Array, to_scaled_int
from pricer.schemas import ClientId, RowError
from pricer.tickers import TICKER_RULE, normalize_ticker
from pricer.validation import JSON, MSGPACK, may_hide_places, problem_from, written_places

Int32Array = npt.NDArray[np.int32]

ROWS: Final = "rows"
COLUMNS: Final = "columns"
MAX_POSITION_VALUE: Final = 1_000_000_000
_FIELDS: Final = ("ticker", "position_value", "loan_days")
_VALID_PARAMS: Final = ["client_id", "positions", "columns"]


@dataclass(frozen=True, slots=True, eq=False)
class DecodedBatch:
    """A decoded batch as columns (no Python object per row); picklable, for a worker process.

    `ticker_index[i]` is row i's index into `tickers` (its normalised ticker), or -1 when row i has a
    validation error (that error is in `errors`, one per row, sorted by index). `cents` and `days` are 0
    in such rows. `count` is every decoded row, valid or not: what the positions bucket is charged."""

    form: str  # ROWS | COLUMNS: the response takes the request's form
    client_id: str
    count: int
    tickers: list[str]
    ticker_index: Int32Array
    cents: Int64Array
    days: Int64Array
    errors: list[RowError]

    @property
    def valid(self) -> int:
        return self.count - len(self.errors)


# ---- the typed pass: no bounds, so only a value of the wrong type fails it -------------------------------


class _Position(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    ticker: str
    position_value: float
    loan_days: float  # 30.0 and 3e1 are 30 (JSON Schema's integer); checked whole below


class _Columns(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    ticker: list[str]
    position_value: list[float]
    loan_days: list[float]


class _Request(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    client_id: ClientId
    positions: list[_Position] | msgspec.UnsetType = msgspec.UNSET
    columns: _Columns | msgspec.UnsetType = msgspec.UNSET


# ---- the lenient pass: any row shape, each bad row its own error ------------------------------------------


class _LenientColumns(msgspec.Struct, forbid_unknown_fields=True):
    ticker: list[Any]
    position_value: list[Any]
    loan_days: list[Any]


class _LenientRequest(msgspec.Struct, forbid_unknown_fields=True):
    client_id: ClientId
    positions: list[Any] | msgspec.UnsetType = msgspec.UNSET
    columns: _LenientColumns | msgspec.UnsetType = msgspec.UNSET


_TYPED_JSON = msgspec.json.Decoder(_Request)
_TYPED_MSGPACK = msgspec.msgpack.Decoder(_Request)
# float_hook: a JSON number beyond float range (1e999) reads as inf, a row error, not a failed body.
_LENIENT_JSON = msgspec.json.Decoder(_LenientRequest, float_hook=float)
_LENIENT_MSGPACK = msgspec.msgpack.Decoder(_LenientRequest)
_WRITTEN = msgspec.json.Decoder(float_hook=Decimal)


def decode_batch(body: bytes, media: str, *, max_batch_size: int) -> DecodedBatch:
    """The batch in `body` (media JSON or MSGPACK) as columns; InvalidParameter (400) for a problem of the
    whole request (malformed body, client_id, both or neither of positions and columns, unequal columns,
    too many rows). Row problems become row errors."""
    try:
        typed = (_TYPED_MSGPACK if media == MSGPACK else _TYPED_JSON).decode(body)
    except msgspec.ValidationError as error:
        return _decode_lenient(body, media, max_batch_size, problem_from(error, "body"))
    except msgspec.DecodeError as error:
        raise _malformed(media, error) from None
    if isinstance(typed.columns, _Columns):
        if not isinstance(typed.positions, msgspec.UnsetType):
            raise _both()
        columns = typed.columns
        _check_size(len(columns.ticker), max_batch_size)
        if not len(columns.ticker) == len(columns.position_value) == len(columns.loan_days):
            raise _unequal()
        return _finish(
            COLUMNS,
            typed.client_id,
            columns.ticker,
            np.asarray(columns.position_value, dtype=np.float64),
            np.asarray(columns.loan_days, dtype=np.float64),
            [],
            body if media == JSON else None,
        )
    if isinstance(typed.positions, msgspec.UnsetType):
        raise _neither()
    rows = typed.positions
    count = len(rows)
    _check_size(count, max_batch_size)
    return _finish(
        ROWS,
        typed.client_id,
        list(map(attrgetter("ticker"), rows)),
        np.fromiter(map(attrgetter("position_value"), rows), dtype=np.float64, count=count),
        np.fromiter(map(attrgetter("loan_days"), rows), dtype=np.float64, count=count),
        [],
        body if media == JSON else None,
    )


def _decode_lenient(
    body: bytes, media: str, max_batch_size: int, typed_problem: FieldProblem
) -> DecodedBatch:
    try:
        lenient = (_LENIENT_MSGPACK if media == MSGPACK else _LENIENT_JSON).decode(body)
    except msgspec.ValidationError as error:
        problem = problem_from(error, "body")
        raise InvalidParameter(
            f"Invalid request: {problem.field}: {problem.message}",
            problems=[problem],
            valid_params=_VALID_PARAMS,
        ) from None
    except msgspec.DecodeError as error:
        raise _malformed(media, error) from None
    except RecursionError:
        # A row nested deeper than the decoder's stack (a thousand levels): the typed pass named where.
        raise InvalidParameter.for_field(
            typed_problem.field, "nested too deeply (a row is an object of three scalars)"
        ) from None
    json_body = body if media == JSON else None
    if isinstance(lenient.columns, _LenientColumns):
        if not isinstance(lenient.positions, msgspec.UnsetType):
            raise _both()
        columns = lenient.columns
        count = len(columns.ticker)
        _check_size(count, max_batch_size)
        if not count == len(columns.position_value) == len(columns.loan_days):
            raise _unequal()
        tickers, values, days, errors = _lenient_columns(columns)
        return _finish(COLUMNS, lenient.client_id, tickers, values, days, errors, json_body)
    if isinstance(lenient.positions, msgspec.UnsetType):
        raise _neither()
    _check_size(len(lenient.positions), max_batch_size)
    tickers, values, days, errors = _lenient_rows(lenient.positions)
    return _finish(ROWS, lenient.client_id, tickers, values, days, errors, json_body)


def _number_problem(value: Any, name: str) -> str | None:
    """Why `value` cannot be the number `name` (None when it can be read as a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name}: expected a number" if name == "position_value" else _DAYS_RULE
    if isinstance(value, int) and abs(value) > 2**53:
        # float() would overflow past 1e308 (and lose the value well before): far out of range anyway.
        return _VALUE_RULE if name == "position_value" else _DAYS_RULE
    return None


_VALUE_RULE: Final = "position_value: expected a number from 0.01 to 1,000,000,000"
_PLACES_RULE: Final = "position_value: expected a number at most 2 decimals"
_DAYS_RULE: Final = "loan_days: expected an integer from 1 to 365"


def _lenient_rows(positions: list[Any]) -> tuple[list[Any], Float64Array, Float64Array, list[RowError]]:
    count = len(positions)
    tickers: list[Any] = [None] * count
    values = np.full(count, np.nan)
    days = np.full(count, np.nan)
    errors: list[RowError] = []
    for index, row in enumerate(positions):
        problem = _row_problem(row)
        if problem is not None:
            errors.append(_invalid(index, problem[1], problem[0]))
            continue
        tickers[index] = row["ticker"]
        values[index] = row["position_value"]
        days[index] = row["loan_days"]
    return tickers, values, days, errors


def _row_problem(row: Any) -> tuple[str, str] | None:
    """(field, message) of a row of the wrong shape or types; None when its values can be checked."""
    if not isinstance(row, dict):
        return "position", "expected an object with ticker, position_value, loan_days"
    unknown = sorted(str(name) for name in set(row) - set(_FIELDS))
    if unknown:
        return unknown[0], f"unknown field `{unknown[0]}`"
    for name in _FIELDS:
        if name not in row:
            return name, f"missing required field `{name}`"
    if not isinstance(row["ticker"], str):
        return "ticker", "ticker: expected a string"
    for name in ("position_value", "loan_days"):
        message = _number_problem(row[name], name)
        if message is not None:
            return name, message
    return None


def _lenient_columns(
    columns: _LenientColumns,
) -> tuple[list[Any], Float64Array, Float64Array, list[RowError]]:
    count = len(columns.ticker)
    tickers: list[Any] = list(columns.ticker)
    values = np.full(count, np.nan)
    days = np.full(count, np.nan)
    errors: list[RowError] = []
    for index, (ticker, value, day) in enumerate(
        zip(columns.ticker, columns.position_value, columns.loan_days, strict=True)
    ):
        if not isinstance(ticker, str):
            errors.append(_invalid(index, "ticker: expected a string", "ticker"))
            tickers[index] = None
            continue
        value_problem = _number_problem(value, "position_value")
        days_problem = _number_problem(day, "loan_days")
        if value_problem is not None or days_problem is not None:
            field = "position_value" if value_problem is not None else "loan_days"
            errors.append(_invalid(index, value_problem or days_problem or "", field))
            tickers[index] = None
            continue
        values[index] = value
        days[index] = day
    return tickers, values, days, errors


# ---- the value rules, column-wise -------------------------------------------------------------------------


def _finish(
    form: str,
    client_id: str,
    tickers_raw: Sequence[Any],
    values: Float64Array,
    days_float: Float64Array,
    errors: list[RowError],
    json_body: bytes | None,
) -> DecodedBatch:
    """The value rules of every row not already in error, first rule broken first: decimals as written,
    ticker, position value, loan days."""
    count = len(tickers_raw)
    bad = np.zeros(count, dtype=bool)
    for error in errors:
        bad[error.index] = True
    if json_body is not None and may_hide_places(json_body):
        for index in _hidden_places_rows(json_body, form, count):
            if not bad[index]:
                errors.append(_invalid(index, _PLACES_RULE, "position_value"))
                bad[index] = True

    tickers, ticker_index = _normalise(tickers_raw)
    for index in np.flatnonzero((ticker_index < 0) & ~bad).tolist():
        errors.append(_invalid(index, f"ticker: expected {TICKER_RULE}", "ticker"))
    bad |= ticker_index < 0

    finite_values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    cents, exact = to_scaled_int(finite_values, 2)
    in_range = np.isfinite(values) & (values >= 0.01) & (values <= MAX_POSITION_VALUE)
    for index in np.flatnonzero(~bad & ~(in_range & exact)).tolist():
        errors.append(_invalid(index, _VALUE_RULE if not in_range[index] else _PLACES_RULE, "position_value"))
    bad |= ~(in_range & exact)

    days_ok = np.isfinite(days_float) & (days_float >= 1) & (days_float <= 365)
    days_ok &= days_float == np.floor(np.where(days_ok, days_float, 0.0))
    for index in np.flatnonzero(~bad & ~days_ok).tolist():
        errors.append(_invalid(index, _DAYS_RULE, "loan_days"))
    bad |= ~days_ok

    days = np.where(bad, 0, np.where(days_ok, days_float, 0.0)).astype(np.int64)
    cents[bad] = 0
    ticker_index[bad] = -1
    tickers, ticker_index = _used_only(tickers, ticker_index)
    errors.sort(key=attrgetter("index"))
    return DecodedBatch(
        form=form,
        client_id=client_id,
        count=count,
        tickers=tickers,
        ticker_index=ticker_index,
        cents=cents,
        days=days,
        errors=errors,
    )


def _normalise(tickers_raw: Sequence[Any]) -> tuple[list[str], Int32Array]:
    """Distinct normalised tickers, and each row's index into them (-1: not a ticker); each distinct text
    is normalised once (a 10^6-row book names a few thousand tickers)."""
    # Every loop over the rows runs in C (map): a generator here costs more than the decode. One dict
    # operation per row (each row's text is an object of its own, hashed once): every text is keyed by the
    # first row that has it, and each row gets that row's number.
    count = len(tickers_raw)
    slot: dict[Any, int] = {}
    raw_index = np.fromiter(map(slot.setdefault, tickers_raw, range(count)), dtype=np.int64, count=count)
    tickers: list[str] = []
    where: dict[str, int] = {}
    remap = np.full(count, -1, dtype=np.int32)
    for raw, position in slot.items():
        ticker = normalize_ticker(raw) if isinstance(raw, str) else None
        if ticker is not None:
            found = where.get(ticker)
            if found is None:
                found = where[ticker] = len(tickers)
                tickers.append(ticker)
            remap[position] = found
    return tickers, remap[raw_index] if len(slot) else np.zeros(0, dtype=np.int32)


def _used_only(tickers: list[str], ticker_index: Int32Array) -> tuple[list[str], Int32Array]:
    """The tickers of valid rows only (market data is asked for those), each row's index remapped."""
    used = np.bincount(ticker_index[ticker_index >= 0], minlength=len(tickers)) > 0
    if used.all():
        return tickers, ticker_index
    remap = np.full(len(tickers) + 1, -1, dtype=np.int32)  # the last slot: -1 stays -1
    kept = np.flatnonzero(used)
    remap[kept] = np.arange(kept.shape[0], dtype=np.int32)
    return [tickers[position] for position in kept.tolist()], remap[ticker_index]


def _hidden_places_rows(body: bytes, form: str, count: int) -> list[int]:
    """Rows whose position_value is written with more than 2 decimals that its float hides
    (100.00999999999999999 reads as 100.01): the body read again with its numbers exact."""
    try:
        written = _WRITTEN.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return []
    if form == COLUMNS:
        columns = written.get("columns")
        values = columns.get("position_value") if isinstance(columns, dict) else None
    else:
        positions = written.get("positions")
        values = [row.get("position_value") if isinstance(row, dict) else None for row in positions or ()]
    if not isinstance(values, list):
        return []
    return [index for index, value in enumerate(values[:count]) if written_places(value) > 2]


def _invalid(index: int, message: str, field: str) -> RowError:
    return RowError(index=index, error_code="INVALID_PARAMETER", error=message, field=field)


def _check_size(count: int, max_batch_size: int) -> None:
    if count > max_batch_size:
        raise InvalidParameter.for_field(
            "positions", f"at most {max_batch_size} positions per batch (got {count})"
        )


def _malformed(media: str, error: Exception) -> InvalidParameter:
    kind = "JSON" if media == JSON else "msgpack"
    return InvalidParameter(
        f"Malformed {kind} body: {error}",
        problems=[FieldProblem("body", "body", f"malformed {kind}: {error}")],
        valid_params=_VALID_PARAMS,
    )


def _both() -> InvalidParameter:
    return InvalidParameter.for_field(
        "columns", "give either positions (rows) or columns, not both", valid_params=_VALID_PARAMS
    )


def _neither() -> InvalidParameter:
    return InvalidParameter.for_field(
        "positions", "missing required field `positions` (or `columns`)", valid_params=_VALID_PARAMS
    )


def _unequal() -> InvalidParameter:
    return InvalidParameter.for_field(
        "columns",
        "ticker, position_value and loan_days must have the same length",
        valid_params=_VALID_PARAMS,
    )
