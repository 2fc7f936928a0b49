"""The HTTP API's schema (DESIGN §2): msgspec Structs for every request, response and error.

Decoding checks types, required and unknown fields; value rules that need the decimal text (places) or
that batch rows check per row are applied by the endpoints with the same messages (see `validation`).
The OpenAPI document is generated from these Structs.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from pricer.models import BorrowStatus, FeeType, RateSource, Scope

ClientId = Annotated[
    str,
    Meta(pattern=r"^[A-Za-z0-9_-]{3,50}$", description="3 to 50 letters, digits, '_' or '-'"),
]
# The ticker's syntax for clients, as `normalize_ticker` applies it (the endpoints check it themselves, to
# answer with TICKER_RULE): surrounding whitespace is trimmed, and what is left is 1 to 10 characters, the
# separator included; each split of the 10 around a separator is spelt out (JSON Schema has no lookahead).
_ALNUM = "[A-Za-z0-9]"
TICKER_PATTERN = (
    r"^\s*("
    + "|".join([f"{_ALNUM}{{1,10}}", *(f"{_ALNUM}{{{n}}}[-. /]{_ALNUM}{{1,{9 - n}}}" for n in range(1, 9))])
    + r")\s*$"
)
# No min/max length of the text itself: the length rule applies once trimmed, and the pattern says it.
TickerText = Annotated[
    str,
    Meta(
        description="1-10 letters/digits with at most one class separator; BRK.B, BRK-B, BRK B mean BRK.B",
        extra_json_schema={"pattern": TICKER_PATTERN},
    ),
]


def decimals(places: int) -> dict[str, Any]:
    """The JSON Schema of "at most `places` decimals as written" (the endpoints check the text itself: a
    float's remainder is not exact, so msgspec's own multiple_of is not used)."""
    return {"multipleOf": float(f"1e-{places}")}


# Marks a `whole` field's schema; the OpenAPI document writes it as `"type": "integer"` (msgspec's own
# "number" would win over an extra "type").
WHOLE_NUMBER = "x-whole-number"


def whole(low: int, high: int, description: str = "") -> Any:
    """An integer field that also takes an integral number written with a fraction or exponent (30.0, 3e1),
    as JSON Schema's `integer` does; the endpoints turn it into an `int` (see `validation.whole_number`)."""
    return Meta(ge=low, le=high, description=description or None, extra_json_schema={WHOLE_NUMBER: True})


PositionValue = Annotated[
    float,
    Meta(ge=0.01, le=1_000_000_000, description="Dollars, at most 2 decimals", extra_json_schema=decimals(2)),
]
LoanDays = Annotated[float, whole(1, 365)]
Money = Annotated[float, Meta(description="Dollars with at most 2 decimals")]
Rate = Annotated[float, Meta(description="Annual fraction (0.05 = 5 %), at most 8 decimals")]
Percent4 = Annotated[float, Meta(ge=0, le=100, description="Percent, at most 4 decimals")]
DayCount = Literal[360, 365, 366]


# ---- quotes --------------------------------------------------------------------------------------


class QuoteRequest(msgspec.Struct, forbid_unknown_fields=True):
    ticker: TickerText
    position_value: PositionValue
    loan_days: LoanDays
    client_id: ClientId


class FeeScheduleView(msgspec.Struct):
    markup_percentage: float
    transaction_fee_type: FeeType
    transaction_amount: float
    day_count: int


class Breakdown(msgspec.Struct):
    borrow_cost: Money
    markup: Money
    transaction_fees: Money


class RateComponents(msgspec.Struct):
    base_rate: Rate
    volatility_index: float
    volatility_adjustment: float
    event_risk_factor: int
    event_adjustment: float
    min_rate: Rate
    borrow_status: BorrowStatus
    source: RateSource
    is_fallback: bool
    as_of: dt.datetime


class QuoteResponse(msgspec.Struct, kw_only=True):
    status: Literal["success"] = "success"
    quote_id: str
    ticker: str
    client_id: str
    position_value: Money
    loan_days: int
    fee_schedule: FeeScheduleView
    total_fee: Money
    breakdown: Breakdown
    borrow_rate_used: Rate
    rate: RateComponents
    calculated_at: dt.datetime


class BatchPosition(msgspec.Struct, forbid_unknown_fields=True):
    ticker: TickerText
    position_value: PositionValue
    loan_days: LoanDays


class BatchQuery(msgspec.Struct, forbid_unknown_fields=True):
    """The batch's query string: `atomic=true` refuses the whole batch when any row is invalid."""

    atomic: bool = False


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    client_id: ClientId
    positions: list[BatchPosition]


class PositionColumns(msgspec.Struct, forbid_unknown_fields=True):
    """The positions of a columnar batch: row i is (ticker[i], position_value[i], loan_days[i])."""

    ticker: list[TickerText]
    position_value: list[PositionValue]
    loan_days: list[LoanDays]


class ColumnarBatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A batch as columns (equal lengths): for large batches, answered as columns too."""

    client_id: ClientId
    columns: PositionColumns


class BatchQuote(msgspec.Struct):
    index: int
    quote_id: str
    ticker: str
    position_value: Money
    loan_days: int
    total_fee: Money
    breakdown: Breakdown
    borrow_rate_used: Rate


class RowError(msgspec.Struct):
    index: int
    error_code: str
    error: str
    field: str | None = None


class BatchResponse(msgspec.Struct, kw_only=True):
    status: Literal["success"] = "success"
    client_id: str
    fee_schedule: FeeScheduleView
    calculated_at: dt.datetime
    count: int
    priced: int
    quotes: list[BatchQuote]
    errors: list[RowError]


class PricedColumns(msgspec.Struct):
    """The priced rows of a columnar batch: entry j of every column is the quote with id
    `batch_id + format(j, "08x")`, priced from request row `index[j]`."""

    index: list[int]
    total_fee: list[Money]
    borrow_cost: list[Money]
    markup: list[Money]
    transaction_fees: list[Money]
    borrow_rate_used: list[Rate]


class ColumnarBatchResponse(msgspec.Struct, kw_only=True):
    """The answer to a columnar batch; `rates` holds the components of each (normalised) ticker's rate."""

    status: Literal["success"] = "success"
    client_id: str
    fee_schedule: FeeScheduleView
    calculated_at: dt.datetime
    count: int
    priced: int
    batch_id: str
    columns: PricedColumns
    rates: dict[str, RateComponents]
    errors: list[RowError]


# ---- rates ---------------------------------------------------------------------------------------


class RateResponse(msgspec.Struct, kw_only=True):
    status: Literal["success"] = "success"
    ticker: str
    current_rate: Rate
    base_rate: Rate
    volatility_index: float
    volatility_adjustment: float
    event_risk_factor: int
    event_adjustment: float
    min_rate: Rate
    borrow_status: BorrowStatus
    available_shares: int | None
    source: RateSource
    is_fallback: bool
    last_updated: dt.datetime


class RateListError(msgspec.Struct):
    ticker: str
    error_code: str
    error: str


class RatesQuery(msgspec.Struct, forbid_unknown_fields=True):
    tickers: Annotated[
        str,
        Meta(
            pattern=r"[^,\s]",
            description="Comma-separated tickers (up to 1,000); an invalid or unknown one is in `errors`",
        ),
    ]


class RateListResponse(msgspec.Struct, kw_only=True):
    status: Literal["success"] = "success"
    rates: list[RateResponse]
    errors: list[RateListError]


# ---- auth ----------------------------------------------------------------------------------------


class TokenResponse(msgspec.Struct):
    access_token: str
    expires_in: int
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme's name, not a secret


# ---- admin ---------------------------------------------------------------------------------------


class ClientBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    markup_percentage: Annotated[Percent4, Meta(extra_json_schema=decimals(4))]
    transaction_fee_type: FeeType
    transaction_amount: Annotated[
        float,
        Meta(
            ge=0,
            le=1_000_000_000,
            description="FLAT: dollars (2 decimals); PERCENTAGE: 0-100 (4 decimals)",
            extra_json_schema=decimals(4),
        ),
    ]
    day_count: DayCount = 365
    active: bool = True
    rate_limit_per_minute: Annotated[float, whole(1, 10_000_000)] | None = None
    burst: Annotated[float, whole(1, 10_000_000)] | None = None


class ClientView(msgspec.Struct):
    client_id: str
    markup_percentage: float
    transaction_fee_type: FeeType
    transaction_amount: float
    day_count: int
    active: bool
    rate_limit_per_minute: int
    burst: int
    updated_at: dt.datetime | None


class StockBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    min_borrow_rate: Annotated[
        float,
        Meta(ge=0, le=10, description="Annual fraction, at most 8 decimals", extra_json_schema=decimals(8)),
    ]
    borrow_status: BorrowStatus | None = None


class StockView(msgspec.Struct):
    ticker: str
    min_borrow_rate: float
    borrow_status: BorrowStatus | None
    updated_at: dt.datetime | None


class AvailabilityUploadResponse(msgspec.Struct, kw_only=True):
    status: Literal["success"] = "success"
    rows: int
    as_of: dt.datetime
    in_force: bool


class VolatilityBody(msgspec.Struct, forbid_unknown_fields=True):
    value: Annotated[
        float,
        Meta(
            ge=0,
            le=200,
            description="Market volatility index, at most 4 decimals",
            extra_json_schema=decimals(4),
        ),
    ]


class VolatilityView(msgspec.Struct, kw_only=True):
    status: Literal["success"] = "success"
    value: float
    as_of: dt.datetime
    source: str


# PostgreSQL's text cannot hold NUL: the endpoints refuse it (400) in every mode, so it is never stored.
NO_NUL = r"^[^\x00]*$"


class EventBody(msgspec.Struct, forbid_unknown_fields=True):
    date: dt.date
    type: Annotated[str, Meta(min_length=1, max_length=40, extra_json_schema={"pattern": NO_NUL})] = (
        "earnings"
    )
    risk_factor: Annotated[float, whole(0, 10)] | None = None


class EventsBody(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[EventBody], Meta(max_length=1000)]


class EventView(msgspec.Struct):
    date: dt.date
    type: str
    risk_factor: int | None


class EventsView(msgspec.Struct, kw_only=True):
    status: Literal["success"] = "success"
    ticker: str
    events: list[EventView]


class KeyBody(msgspec.Struct, forbid_unknown_fields=True):
    client_id: ClientId
    scopes: Annotated[list[Scope], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [Scope.QUOTE, Scope.RATES]
    )
    expires_in_days: Annotated[float, whole(1, 3650)] = 90


class IssuedKey(msgspec.Struct):
    key_id: str
    api_key: str
    client_id: str
    scopes: list[Scope]
    expires_at: dt.datetime


class LoadResult(msgspec.Struct, kw_only=True):
    """A market-data file loaded: `rows` is the number of data rows read (the header aside), as for the
    availability upload; `detail` what the file yielded."""

    status: Literal["success"] = "success"
    kind: str
    rows: int
    detail: dict[str, Any]


def utc_text(moment: dt.datetime) -> str:
    """An aware datetime as ISO 8601 in UTC ending in `Z`, as msgspec writes the schemas' datetimes: text
    built by hand (a `detail` value, a log field) must not read `+00:00` where the rest reads `Z`."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def vix_load_result(value: float, as_of: dt.datetime, rows: int) -> LoadResult:
    """What a VIX history load answers, from the admin endpoint and from `pricer load` alike."""
    return LoadResult(kind="vix", rows=rows, detail={"value": value, "as_of": utc_text(as_of)})


def earnings_load_result(rows: int, tickers: int, skipped_symbols: int) -> LoadResult:
    """What an earnings calendar load answers, from the admin endpoint and from `pricer load` alike."""
    return LoadResult(
        kind="earnings", rows=rows, detail={"tickers": tickers, "skipped_symbols": skipped_symbols}
    )


# ---- health and errors ---------------------------------------------------------------------------


class Health(msgspec.Struct):
    status: str
    version: str


class DependencyHealth(msgspec.Struct, omit_defaults=True):
    """One dependency's health; `reason` says in a sentence why it is not healthy (never a host or secret)."""

    status: Literal["healthy", "degraded", "unhealthy"]
    latency_ms: float
    detail: dict[str, Any] | None = None
    reason: str | None = None


class DetailedHealth(msgspec.Struct):
    status: Literal["healthy", "degraded", "unhealthy"]
    version: str
    dependencies: dict[str, DependencyHealth]


class ValidationProblem(msgspec.Struct):
    field: str
    location: str
    message: str


class ErrorBody(msgspec.Struct, kw_only=True):
    status: Literal["error"] = "error"
    error: str
    error_code: str
    details: dict[str, Any] | None
    request_id: str
    validation_errors: list[ValidationProblem] | msgspec.UnsetType = msgspec.UNSET
    valid_params: list[str] | msgspec.UnsetType = msgspec.UNSET
