"""What each API call sends and how its answer is read, without any I/O (shared by the sync and async
clients): a `Call` is the request's method, path, body and the decoder of a 2xx body.

Bodies are encoded with Decimals as JSON numbers (the engine rejects strings), msgpack for batches of at
least `msgpack_threshold` rows. Batches are sent in the row form, which every engine serves; DESIGN's
columnar wire form would be one more `BatchWire` here and one more decoder, the callers unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, TypeVar
from urllib.parse import quote as quote_path

import msgspec

from pricer_client import models

T = TypeVar("T")

JSON = "application/json"
MSGPACK = "application/msgpack"
TEXT = "text/plain; charset=utf-8"
# Below this many rows JSON is as quick to produce and easier to read in a proxy's log.
DEFAULT_MSGPACK_THRESHOLD = 1000

_json = msgspec.json.Encoder(decimal_format="number")
# msgpack has no decimal type: a Decimal goes as the float whose shortest text is that Decimal (exact for
# money with two decimals below 10^13), which is how the engine reads msgpack numbers.
_msgpack = msgspec.msgpack.Encoder(decimal_format="number")


class BatchWire(enum.Enum):
    """The batch request's form on the wire."""

    ROWS_JSON = "rows-json"
    ROWS_MSGPACK = "rows-msgpack"


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and the reading of its 2xx answer."""

    method: str
    path: str
    decode: Callable[[bytes, str], T]  # (body, content type) -> result
    params: Mapping[str, str] | None = None
    content: bytes | None = None
    content_type: str | None = None
    accept: str = JSON
    # Safe to send again when the connection broke before an answer (it changes nothing on the engine).
    idempotent: bool = False
    authenticated: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)


def _json_decoder(type_: type[T]) -> Callable[[bytes, str], T]:
    decoder = msgspec.json.Decoder(type_)
    return lambda body, _content_type: decoder.decode(body)


def _json_or_msgpack_decoder(type_: type[T]) -> Callable[[bytes, str], T]:
    json_decoder = msgspec.json.Decoder(type_)
    msgpack_decoder = msgspec.msgpack.Decoder(type_)

    def decode(body: bytes, content_type: str) -> T:
        if content_type.partition(";")[0].strip().lower() == MSGPACK:
            return msgpack_decoder.decode(body)
        return json_decoder.decode(body)

    return decode


def _no_body(_body: bytes, _content_type: str) -> None:
    return None


_QUOTE = _json_decoder(models.Quote)
_BATCH = _json_or_msgpack_decoder(models.BatchResult)
_RATE = _json_decoder(models.Rate)
_RATES = _json_decoder(models.RateList)
_TOKEN = _json_decoder(models.Token)
_HEALTH = _json_decoder(models.Health)


def _segment(value: str) -> str:
    """A path parameter, percent-encoded whole (a ticker may hold `/` or a space)."""
    return quote_path(value, safe="")


# ---- quotes and rates ----------------------------------------------------------------------------


def quote(
    ticker: str, position_value: Decimal | int | str, loan_days: int, client_id: str
) -> Call[models.Quote]:
    body = {
        "ticker": ticker,
        "position_value": _money(position_value),
        "loan_days": loan_days,
        "client_id": client_id,
    }
    return Call("POST", "/api/v1/calculate-locate", _QUOTE, content=_json.encode(body), content_type=JSON)


def get_quote(quote_id: str) -> Call[models.Quote]:
    return Call("GET", f"/api/v1/quotes/{_segment(quote_id)}", _QUOTE, idempotent=True)


def rate(ticker: str) -> Call[models.Rate]:
    return Call("GET", f"/api/v1/rates/{_segment(ticker)}", _RATE, idempotent=True)


def rates(tickers: Iterable[str]) -> Call[models.RateList]:
    return Call("GET", "/api/v1/rates", _RATES, params={"tickers": ",".join(tickers)}, idempotent=True)


def token() -> Call[models.Token]:
    return Call("POST", "/api/v1/auth/token", _TOKEN)


def health() -> Call[models.Health]:
    return Call("GET", "/health", _HEALTH, idempotent=True, authenticated=False)


PositionLike = models.Position | tuple[str, Decimal | int | str, int] | Mapping[str, Any]
ColumnsLike = Mapping[str, Sequence[Any]]


def batch(
    client_id: str,
    positions: Sequence[PositionLike] | ColumnsLike,
    *,
    atomic: bool = False,
    msgpack_threshold: int = DEFAULT_MSGPACK_THRESHOLD,
) -> Call[models.BatchResult]:
    """`positions` as rows (`Position`, `(ticker, value, days)` or mappings) or as columns (a mapping of
    `ticker`, `position_value`, `loan_days` to equal-length sequences or NumPy arrays)."""
    rows = _columns_to_rows(positions) if isinstance(positions, Mapping) else [_row(p) for p in positions]
    wire = BatchWire.ROWS_MSGPACK if len(rows) >= msgpack_threshold else BatchWire.ROWS_JSON
    body = {"client_id": client_id, "positions": rows}
    params = {"atomic": "true"} if atomic else None
    if wire is BatchWire.ROWS_MSGPACK:
        content, media = _msgpack.encode(body), MSGPACK
    else:
        content, media = _json.encode(body), JSON
    return Call(
        "POST",
        "/api/v1/calculate-locate/batch",
        _BATCH,
        params=params,
        content=content,
        content_type=media,
        accept=media,
    )


def _money(value: Decimal | int | str | float) -> Decimal | int:
    """A dollar amount as the engine reads it: an int or a Decimal (a float is taken by its shortest text,
    so 5.01 means 5.01; a string is parsed as a Decimal)."""
    if isinstance(value, bool):
        raise TypeError("a money amount must be a Decimal, an int or a decimal string, not a bool")
    if isinstance(value, int | Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


def _row(position: PositionLike) -> dict[str, Any]:
    value: Decimal | int | str
    if isinstance(position, models.Position):
        ticker, value, days = position.ticker, position.position_value, position.loan_days
    elif isinstance(position, tuple):
        ticker, value, days = position
    else:
        return {
            "ticker": position["ticker"],
            "position_value": _money(position["position_value"]),
            "loan_days": position["loan_days"],
        }
    return {"ticker": ticker, "position_value": _money(value), "loan_days": days}


def _as_list(column: Any) -> list[Any]:
    # NumPy arrays become Python scalars (`tolist`), which the encoders know.
    tolist = getattr(column, "tolist", None)
    return list(tolist() if callable(tolist) else column)


def _columns_to_rows(columns: ColumnsLike) -> list[dict[str, Any]]:
    missing = {"ticker", "position_value", "loan_days"} - set(columns)
    if missing:
        raise ValueError(f"columns need ticker, position_value and loan_days (missing {sorted(missing)})")
    tickers = _as_list(columns["ticker"])
    values = _as_list(columns["position_value"])
    days = _as_list(columns["loan_days"])
    if not len(tickers) == len(values) == len(days):
        raise ValueError(f"columns of unequal lengths: {len(tickers)}, {len(values)}, {len(days)}")
    return [
        {"ticker": t, "position_value": _money(v), "loan_days": d}
        for t, v, d in zip(tickers, values, days, strict=True)
    ]


# ---- admin ---------------------------------------------------------------------------------------


def _put(path: str, body: Mapping[str, Any], type_: type[T]) -> Call[T]:
    # A PUT replaces the record: sending it twice leaves the same record, so it may be resent.
    content = _json.encode({k: v for k, v in body.items() if v is not None})
    return Call("PUT", path, _json_decoder(type_), content=content, content_type=JSON, idempotent=True)


def put_client(
    client_id: str,
    *,
    markup_percentage: Decimal | int | str,
    transaction_fee_type: str,
    transaction_amount: Decimal | int | str,
    day_count: int | None = None,
    active: bool | None = None,
    rate_limit_per_minute: int | None = None,
    burst: int | None = None,
) -> Call[models.ClientRecord]:
    body = {
        "markup_percentage": _money(markup_percentage),
        "transaction_fee_type": transaction_fee_type,
        "transaction_amount": _money(transaction_amount),
        "day_count": day_count,
        "active": active,
        "rate_limit_per_minute": rate_limit_per_minute,
        "burst": burst,
    }
    return _put(f"/api/v1/admin/clients/{_segment(client_id)}", body, models.ClientRecord)


def put_stock(
    ticker: str, *, min_borrow_rate: Decimal | int | str, borrow_status: str | None = None
) -> Call[models.StockRecord]:
    body = {"min_borrow_rate": _money(min_borrow_rate), "borrow_status": borrow_status}
    return _put(f"/api/v1/admin/stocks/{_segment(ticker)}", body, models.StockRecord)


def put_volatility(value: Decimal | int | str) -> Call[models.Volatility]:
    return _put("/api/v1/admin/volatility", {"value": _money(value)}, models.Volatility)


def put_events(ticker: str, events: Sequence[models.Event]) -> Call[models.Events]:
    body = {"events": [msgspec.structs.asdict(event) for event in events]}
    return _put(f"/api/v1/admin/events/{_segment(ticker)}", body, models.Events)


def _upload(path: str, text: str | bytes, type_: type[T]) -> Call[T]:
    content = text.encode() if isinstance(text, str) else text
    return Call("POST", path, _json_decoder(type_), content=content, content_type=TEXT)


def upload_availability(text: str | bytes) -> Call[models.AvailabilityUpload]:
    return _upload("/api/v1/admin/availability", text, models.AvailabilityUpload)


def upload_vix(text: str | bytes) -> Call[models.LoadResult]:
    return _upload("/api/v1/admin/vix-history", text, models.LoadResult)


def upload_earnings(text: str | bytes) -> Call[models.LoadResult]:
    return _upload("/api/v1/admin/earnings-calendar", text, models.LoadResult)


def issue_key(
    client_id: str, *, scopes: Sequence[str] | None = None, expires_in_days: int | None = None
) -> Call[models.IssuedKey]:
    body = {
        "client_id": client_id,
        "scopes": list(scopes) if scopes is not None else None,
        "expires_in_days": expires_in_days,
    }
    content = _json.encode({k: v for k, v in body.items() if v is not None})
    return Call(
        "POST", "/api/v1/admin/keys", _json_decoder(models.IssuedKey), content=content, content_type=JSON
    )


def revoke_key(key_id: str) -> Call[None]:
    return Call("DELETE", f"/api/v1/admin/keys/{_segment(key_id)}", _no_body, idempotent=True)
