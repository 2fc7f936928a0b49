"""Domain records kept by the stores. Immutable; a write replaces a record whole."""

from __future__ import annotations

import datetime as dt
import enum

import msgspec


class FeeType(enum.StrEnum):
    FLAT = "FLAT"
    PERCENTAGE = "PERCENTAGE"


class BorrowStatus(enum.StrEnum):
    EASY = "EASY"
    MEDIUM = "MEDIUM"
    HARD = "HARD"


class RateSource(enum.StrEnum):
    LENDER_API = "lender_api"
    AVAILABILITY_FILE = "availability_file"
    FALLBACK = "fallback"


class Scope(enum.StrEnum):
    QUOTE = "quote"
    RATES = "rates"
    ADMIN = "admin"
    AUDIT = "audit"


class Client(msgspec.Struct, frozen=True, kw_only=True):
    """A broker's client and its fee schedule.

    `rate_limit_per_minute` / `burst` are None when the client has no limits of its own, so that the
    settings' defaults (read at start-up) apply to it.
    """

    client_id: str
    markup_percentage: float
    transaction_fee_type: FeeType
    transaction_amount: float
    day_count: int = 365
    active: bool = True
    rate_limit_per_minute: int | None = None
    burst: int | None = None
    updated_at: dt.datetime | None = None


class Stock(msgspec.Struct, frozen=True, kw_only=True):
    ticker: str
    min_borrow_rate: float = 0.0
    borrow_status: BorrowStatus | None = None
    updated_at: dt.datetime | None = None


class AvailabilityEntry(msgspec.Struct, frozen=True, array_like=True):
    """One row of an availability file.

    `fee_rate` is the annual borrow fee as a fraction (the file's FEERATE / 100), None for `NA`;
    `available` is the number of shares (`>10000000` reads as 10,000,000), None for `NA`.
    `rebate_rate` is kept as the file states it, in percent.
    """

    ticker: str
    fee_rate: float | None
    available: int | None
    rebate_rate: float | None = None
    name: str = ""
    currency: str = "USD"


class AvailabilitySnapshot(msgspec.Struct, frozen=True):
    """A whole availability file: `as_of` is its `#BOF` instant in UTC."""

    as_of: dt.datetime
    entries: dict[str, AvailabilityEntry]
    loaded_at: dt.datetime


class VolatilityReading(msgspec.Struct, frozen=True):
    value: float
    as_of: dt.datetime
    source: str = "admin"


class LenderRate(msgspec.Struct, frozen=True, array_like=True):
    """What the lender API answered for a ticker, as fetched at `fetched_at` (DESIGN §3.1).

    `rate` is the annual fee as a fraction, None when the lender answered that it does not know the
    ticker (404); `status` is the lender's borrow status (None with no rate)."""

    ticker: str
    rate: float | None
    status: BorrowStatus | None
    fetched_at: dt.datetime


class MarketEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event that raises a ticker's borrow risk.

    `risk_factor` 0-10; None for an earnings report loaded from a calendar, whose risk follows the
    days left to the report at quote time (DESIGN §3).
    """

    date: dt.date
    type: str = "earnings"
    risk_factor: int | None = None


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    client_id: str
    secret_hash: bytes
    scopes: frozenset[Scope]
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None = None
