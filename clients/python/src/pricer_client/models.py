"""The engine's responses as msgspec Structs (DESIGN §2), money and rates as `decimal.Decimal`.

msgspec decodes a JSON number into a `Decimal` from the number's own text, so 5.01 stays `Decimal("5.01")`;
a msgpack float becomes the `Decimal` of its shortest round-trip text (what the engine checks, too). Unknown
fields are ignored, so that a newer engine adding a field does not break an older client.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Literal

import msgspec

BorrowStatus = Literal["EASY", "MEDIUM", "HARD"]
FeeType = Literal["FLAT", "PERCENTAGE"]
Scope = Literal["quote", "rates", "admin", "audit"]

# ---- quotes --------------------------------------------------------------------------------------


class Position(msgspec.Struct, frozen=True):
    """One row of a batch request. `position_value` in dollars, at most two decimals."""

    ticker: str
    position_value: Decimal | int
    loan_days: int


class FeeSchedule(msgspec.Struct, frozen=True):
    markup_percentage: Decimal
    transaction_fee_type: FeeType
    transaction_amount: Decimal
    day_count: int


class Breakdown(msgspec.Struct, frozen=True):
    borrow_cost: Decimal
    markup: Decimal
    transaction_fees: Decimal


class RateComponents(msgspec.Struct, frozen=True):
    base_rate: Decimal
    volatility_index: Decimal
    volatility_adjustment: Decimal
    event_risk_factor: int
    event_adjustment: Decimal
    min_rate: Decimal
    borrow_status: BorrowStatus
    source: str
    is_fallback: bool
    as_of: dt.datetime


class Quote(msgspec.Struct, frozen=True, kw_only=True):
    """One locate-fee quote (`quote`, `get_quote`)."""

    quote_id: str
    ticker: str
    client_id: str
    position_value: Decimal
    loan_days: int
    fee_schedule: FeeSchedule
    total_fee: Decimal
    breakdown: Breakdown
    borrow_rate_used: Decimal
    rate: RateComponents
    calculated_at: dt.datetime


class BatchQuote(msgspec.Struct, frozen=True, kw_only=True):
    """One priced row of a batch; `index` is its position in the request."""

    index: int
    quote_id: str
    ticker: str
    position_value: Decimal
    loan_days: int
    total_fee: Decimal
    breakdown: Breakdown
    borrow_rate_used: Decimal


class RowError(msgspec.Struct, frozen=True):
    """A batch row that was not priced (bad values, unknown ticker)."""

    index: int
    error_code: str
    error: str
    field: str | None = None


class BatchResult(msgspec.Struct, frozen=True, kw_only=True):
    """A batch's answer as rows; `columns()` gives the same figures column by column."""

    client_id: str
    fee_schedule: FeeSchedule
    calculated_at: dt.datetime
    count: int
    priced: int
    quotes: list[BatchQuote]
    errors: list[RowError]

    def columns(self) -> QuoteColumns:
        from pricer_client.columns import quote_columns

        return quote_columns(self.quotes)


class QuoteColumns(msgspec.Struct, frozen=True, kw_only=True):
    """The priced rows of a batch column by column (equal lengths, input order)."""

    index: list[int]
    quote_id: list[str]
    ticker: list[str]
    position_value: list[Decimal]
    loan_days: list[int]
    total_fee: list[Decimal]
    borrow_cost: list[Decimal]
    markup: list[Decimal]
    transaction_fees: list[Decimal]
    borrow_rate_used: list[Decimal]

    def __len__(self) -> int:
        return len(self.index)

    def to_numpy(self) -> dict[str, Any]:
        """NumPy arrays (needs the `numpy` extra): money as int64 cents (exact), rates as float64,
        `index`/`loan_days` int64, `ticker`/`quote_id` as object arrays."""
        from pricer_client.columns import columns_to_numpy

        return columns_to_numpy(self)


# ---- rates ---------------------------------------------------------------------------------------


class Rate(msgspec.Struct, frozen=True, kw_only=True):
    """A ticker's current borrow rate with its components."""

    ticker: str
    current_rate: Decimal
    base_rate: Decimal
    volatility_index: Decimal
    volatility_adjustment: Decimal
    event_risk_factor: int
    event_adjustment: Decimal
    min_rate: Decimal
    borrow_status: BorrowStatus
    available_shares: int | None
    source: str
    is_fallback: bool
    last_updated: dt.datetime


class RateError(msgspec.Struct, frozen=True):
    ticker: str
    error_code: str
    error: str


class RateList(msgspec.Struct, frozen=True):
    """`rates(tickers)`: the known tickers' rates, and the unknown ones in `errors`."""

    rates: list[Rate]
    errors: list[RateError]


# ---- auth, health --------------------------------------------------------------------------------


class Token(msgspec.Struct, frozen=True):
    access_token: str
    expires_in: int
    token_type: str = "bearer"  # noqa: S105 - the scheme's name, not a secret


class Health(msgspec.Struct, frozen=True):
    status: str
    version: str


# ---- admin ---------------------------------------------------------------------------------------


class ClientRecord(msgspec.Struct, frozen=True):
    client_id: str
    markup_percentage: Decimal
    transaction_fee_type: FeeType
    transaction_amount: Decimal
    day_count: int
    active: bool
    rate_limit_per_minute: int
    burst: int
    updated_at: dt.datetime | None


class StockRecord(msgspec.Struct, frozen=True):
    ticker: str
    min_borrow_rate: Decimal
    borrow_status: BorrowStatus | None
    updated_at: dt.datetime | None


class AvailabilityUpload(msgspec.Struct, frozen=True, kw_only=True):
    rows: int
    as_of: dt.datetime
    in_force: bool


class Volatility(msgspec.Struct, frozen=True, kw_only=True):
    value: Decimal
    as_of: dt.datetime
    source: str


class Event(msgspec.Struct, frozen=True):
    date: dt.date
    type: str = "earnings"
    risk_factor: int | None = None


class Events(msgspec.Struct, frozen=True, kw_only=True):
    ticker: str
    events: list[Event]


class IssuedKey(msgspec.Struct, frozen=True):
    """A new API key; `api_key` is the whole key, shown only here."""

    key_id: str
    api_key: str
    client_id: str
    scopes: list[str]
    expires_at: dt.datetime


class LoadResult(msgspec.Struct, frozen=True, kw_only=True):
    """A VIX history or earnings calendar upload: rows read and what the file yielded."""

    kind: str
    rows: int
    detail: dict[str, Any]
