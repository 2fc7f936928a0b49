"""What the simulated providers answer from: the newest IBKR availability file's FEERATE (the lender), the
VIX history's last close (the volatility index) and the earnings calendar (the event calendar), read from a
data directory with the engine's own parsers (`pricer.marketdata.loaders`), then changed at run time
through the control API.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import msgspec

from pricer.errors import DataFileError
from pricer.marketdata.loaders import parse_availability, parse_earnings, parse_vix
from pricer.tickers import normalize_ticker

__all__ = [
    "EventItem",
    "LenderRate",
    "ProviderData",
    "VolatilityValue",
    "derive_status",
    "load_provider_data",
]

# DESIGN §3: the status a base rate implies (EASY <= 1 %, MEDIUM <= 10 %, HARD above).
EASY_MAX_RATE = 0.01
MEDIUM_MAX_RATE = 0.10

IBKR_PATTERN = "ibkr_*.txt"
VIX_FILE = "VIX_History.csv"
EARNINGS_PATTERN = "*earnings*.csv"


class LenderRate(msgspec.Struct, frozen=True):
    """The lender's answer for one ticker (`GET /api/borrows/{ticker}`)."""

    rate: float
    status: str


class VolatilityValue(msgspec.Struct, frozen=True):
    """The volatility index's answer (`GET /api/market/vix`); `timestamp` is ISO-8601 with a `Z`."""

    value: float
    timestamp: str


class EventItem(msgspec.Struct, frozen=True, omit_defaults=True):
    """One event of the calendar's answer; `risk_factor` is left out when the calendar has none."""

    type: str
    date: str
    risk_factor: int | None = None


class ProviderData(msgspec.Struct):
    """The three providers' current values; the control API changes them in place."""

    lender: dict[str, LenderRate]
    volatility: VolatilityValue
    events: dict[str, list[EventItem]]


def derive_status(rate: float) -> str:
    if rate <= EASY_MAX_RATE:
        return "EASY"
    if rate <= MEDIUM_MAX_RATE:
        return "MEDIUM"
    return "HARD"


def iso_z(moment: dt.datetime) -> str:
    """`2026-07-31T00:00:00Z`: UTC, whole seconds, the `Z` suffix the providers use."""
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def lookup_ticker(text: str) -> str | None:
    """A ticker as the data is keyed (DESIGN §2.1 normalisation), None for text that is not one."""
    return normalize_ticker(text)


def _warn(message: str) -> None:
    print(f"simulator: {message}", file=sys.stderr)


def _bof_text(path: Path) -> str:
    """The first line (`#BOF|YYYY.MM.DD|HH:MM:SS`): it sorts as the time it states (unreadable: "")."""
    try:
        with path.open("rb") as file:
            return file.readline(64).decode("latin-1").strip()
    except OSError:
        return ""


def _lender_rates(data_dir: Path) -> dict[str, LenderRate]:
    """Every ticker of the newest availability file (by its `#BOF` time) with a FEERATE; `NA` rows are left
    out (a lender without a rate for a ticker does not know it: 404).

    Only the newest file is parsed (the others are ordered by their first line alone): a start-up of the
    simulator, which tests do often, then parses one 17,000-row file rather than every one. A damaged
    file is skipped for the next newest."""
    loaded_at = dt.datetime.now(dt.UTC)
    for path in sorted(data_dir.glob(IBKR_PATTERN), key=_bof_text, reverse=True):
        try:
            snapshot = parse_availability(path.read_bytes(), loaded_at=loaded_at)
        except (OSError, DataFileError) as error:
            _warn(f"{path.name} skipped: {error}")
            continue
        return {
            ticker: LenderRate(rate=entry.fee_rate, status=derive_status(entry.fee_rate))
            for ticker, entry in snapshot.entries.items()
            if entry.fee_rate is not None
        }
    _warn(f"no usable IBKR availability file ({IBKR_PATTERN}) in {data_dir}: the lender knows no ticker")
    return {}


def _volatility(data_dir: Path) -> VolatilityValue:
    path = data_dir / VIX_FILE
    try:
        reading = parse_vix(path.read_bytes())
    except (OSError, DataFileError) as error:
        _warn(f"no usable VIX history ({path}: {error}): the index answers 20.0 as of now")
        return VolatilityValue(value=20.0, timestamp=iso_z(dt.datetime.now(dt.UTC)))
    return VolatilityValue(value=reading.value, timestamp=iso_z(reading.as_of))


def _events(data_dir: Path) -> dict[str, list[EventItem]]:
    paths = sorted(data_dir.glob(EARNINGS_PATTERN))
    if not paths:
        _warn(f"no earnings calendar ({EARNINGS_PATTERN}) in {data_dir}: the calendar is empty")
        return {}
    try:
        calendar = parse_earnings(paths[-1].read_bytes())
    except DataFileError as error:
        _warn(f"{paths[-1].name} skipped: {error}")
        return {}
    return {
        ticker: [
            EventItem(type=event.type, date=event.date.isoformat(), risk_factor=event.risk_factor)
            for event in events
        ]
        for ticker, events in calendar.events.items()
    }


def load_provider_data(data_dir: Path) -> ProviderData:
    """The providers' values from `data_dir`; a missing or damaged file leaves its provider empty (with a
    warning on stderr) rather than stopping the simulator."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    return ProviderData(
        lender=_lender_rates(data_dir), volatility=_volatility(data_dir), events=_events(data_dir)
    )
