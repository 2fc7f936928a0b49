"""Parsers of the market-data files of DESIGN §5: pure functions from file content to domain records.

Nothing here does I/O. Every parser takes the whole file as `str` or `bytes` (bytes are decoded as UTF-8,
with or without a byte-order mark, else as latin-1, which accepts any byte), checks the file's integrity and
either returns the parsed record or raises `DataFileError(kind, line, rule)` naming the 1-based line that
broke the rule; a rejected file yields nothing, so callers change nothing.

Line endings may be CRLF or LF. Blank lines are accepted only at the very end of a file.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import re
from collections.abc import Iterator
from decimal import Decimal
from zoneinfo import ZoneInfo

import msgspec

from pricer.errors import DataFileError
from pricer.models import AvailabilityEntry, AvailabilitySnapshot, MarketEvent, VolatilityReading
from pricer.tickers import normalize_ticker

__all__ = [
    "AVAILABLE_CAP",
    "IBKR_REQUIRED_COLUMNS",
    "EarningsCalendar",
    "VixHistory",
    "parse_availability",
    "parse_earnings",
    "parse_vix",
    "parse_vix_history",
]

IBKR_KIND = "ibkr"
VIX_KIND = "vix"
EARNINGS_KIND = "earnings"

IBKR_REQUIRED_COLUMNS = ("SYM", "CUR", "NAME", "CON", "ISIN", "REBATERATE", "FEERATE", "AVAILABLE")
AVAILABLE_CAP = 10_000_000
_AVAILABLE_CAPPED_TEXT = ">10000000"
MAX_FEE_RATE_DIGITS = 12
IBKR_TIME_ZONE = ZoneInfo("America/New_York")

VIX_HEADER = ("DATE", "OPEN", "HIGH", "LOW", "CLOSE")
VIX_MAX_DECIMALS = 4
VIX_MAX_VALUE = Decimal(200)

EARNINGS_HEADER = ("symbol", "name", "reportDate", "fiscalDateEnding", "estimate", "currency")

_NA = "NA"
# ASCII digits only (`\d` would take any Unicode digit); no exponent, no underscores, no spaces.
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_BOF = re.compile(r"#BOF\|([0-9]{4})\.([0-9]{2})\.([0-9]{2})\|([0-9]{2}):([0-9]{2}):([0-9]{2})")
_EOF = re.compile(r"#EOF\|([0-9]+)")


def _text_of(content: str | bytes, kind: str) -> str:
    """The content as text: UTF-8 (a leading BOM dropped) when it decodes as such, else latin-1.

    A NUL character is refused naming its line: no field of these files holds one, and PostgreSQL's text
    cannot store it (it would fail there, after the file was accepted in memory)."""
    if isinstance(content, bytes):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            text = content.decode("latin-1")
    else:
        text = content
    nul = text.find("\x00")
    if nul >= 0:
        raise DataFileError(kind, text.count("\n", 0, nul) + 1, "a NUL character is not allowed")
    return text[1:] if text.startswith("\ufeff") else text


def _lines_of(text: str) -> list[str]:
    """Physical lines, split on LF with CRLF accepted (a lone CR is not a line break: it stays in its line).

    `str.splitlines` is not used: it also splits on characters such as NEL (U+0085, a latin-1 byte) and
    would shift the line numbers the errors report.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _last_content_line(lines: list[str]) -> int:
    """The number of lines up to the last one that is not blank (trailing blank lines are ignored)."""
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    return end


# --------------------------------------------------------------------------------------------------
# Interactive Brokers short-stock availability files
# --------------------------------------------------------------------------------------------------


def _ibkr_as_of(line: str) -> dt.datetime:
    match = _BOF.fullmatch(line)
    if match is None:
        raise DataFileError(IBKR_KIND, 1, "the first line must be '#BOF|YYYY.MM.DD|HH:MM:SS'")
    year, month, day, hour, minute, second = (int(group) for group in match.groups())
    try:
        local = dt.datetime(year, month, day, hour, minute, second, tzinfo=IBKR_TIME_ZONE)
    except ValueError as exc:
        raise DataFileError(IBKR_KIND, 1, f"#BOF date/time is not valid: {exc}") from None
    as_of = local.astimezone(dt.UTC)
    if as_of.astimezone(IBKR_TIME_ZONE).replace(tzinfo=None) != local.replace(tzinfo=None):
        raise DataFileError(IBKR_KIND, 1, "#BOF time does not exist in America/New_York (DST gap)")
    return as_of


def _ibkr_columns(line: str) -> dict[str, int]:
    fields = line.split("|")
    if len(fields) < 2 or fields[0] != "#SYM" or fields[-1] != "":
        raise DataFileError(
            IBKR_KIND, 2, "the second line must be the '#SYM|CUR|NAME|...|' header ending in '|'"
        )
    names = ["SYM", *fields[1:-1]]
    if any(not name for name in names):
        raise DataFileError(IBKR_KIND, 2, "the header has an empty column name")
    columns = {name: index for index, name in enumerate(names)}
    if len(columns) != len(names):
        raise DataFileError(IBKR_KIND, 2, "the header repeats a column name")
    missing = [name for name in IBKR_REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise DataFileError(IBKR_KIND, 2, f"the header lacks the column(s) {', '.join(missing)}")
    return columns


def _ibkr_shape_problem(line: str, fields: list[str], width: int) -> str:
    if line.startswith("#"):
        return "unexpected '#' line among the data rows"
    if not line.strip():
        return "blank line among the data rows"
    if len(fields) != width:
        return f"expected {width - 1} fields each followed by '|', found {len(fields) - 1} '|' separators"
    return "text after the last '|' of the row"


def _fee_rate(text: str) -> float | None:
    """FEERATE (percent) as a fraction: the exact decimal FEERATE / 100, as the float whose repr it is."""
    if text == _NA:
        return None
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"FEERATE {text!r} is not a decimal number or NA")
    percent = Decimal(text)
    if percent < 0:
        raise ValueError(f"FEERATE {text!r} is negative")
    if percent == 0:
        return 0.0
    # Fewer than 14 characters hold at most 12 digits besides the point; longer texts are counted.
    if (
        len(text) > MAX_FEE_RATE_DIGITS + 1
        and len(percent.normalize().as_tuple().digits) > MAX_FEE_RATE_DIGITS
    ):
        raise ValueError(f"FEERATE {text!r} has more than {MAX_FEE_RATE_DIGITS} significant digits")
    return float(str(percent.scaleb(-2)))


def _rebate_rate(text: str) -> float | None:
    if text == _NA:
        return None
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"REBATERATE {text!r} is not a decimal number or NA")
    return float(text)


def _available(text: str) -> int | None:
    if text == _NA:
        return None
    if text == _AVAILABLE_CAPPED_TEXT:
        return AVAILABLE_CAP
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"AVAILABLE {text!r} is not a whole number, '>10000000' or NA")
    return int(text)


def _availability_rank(available: int | None) -> int:
    """Orders duplicate rows: `NA` below any number of shares, zero included."""
    return -1 if available is None else available


def _currency(text: str) -> str:
    if len(text) != 3 or not (text.isascii() and text.isalpha() and text.isupper()):
        raise ValueError(f"CUR {text!r} is not a three-letter currency code")
    return text


def parse_availability(content: str | bytes, *, loaded_at: dt.datetime) -> AvailabilitySnapshot:
    """Parse an Interactive Brokers short-stock availability file (`usa.txt`) into a snapshot.

    Format: line 1 `#BOF|YYYY.MM.DD|HH:MM:SS` (US Eastern local time; `as_of` is that instant in UTC; an
    ambiguous fall-back hour reads as the first, daylight-time, occurrence and a time in the spring-forward
    gap is rejected), line 2 the header `#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|` (columns are
    found by name; the eight above are required, extra ones such as `FIGI` are allowed and ignored), then one
    row per symbol with the header's number of fields and a trailing `|`, and the last line `#EOF|N` with N
    the number of data rows. Blank lines after `#EOF` are ignored; anything else after it is rejected.

    Row fields: SYM normalises as a ticker (DESIGN §2.1, `AAIC PRB` -> `AAIC.PRB`), else the row is damaged;
    CUR is a three-letter code; FEERATE is a non-negative percent with at most 12 significant digits, stored
    as the fraction FEERATE / 100 (exact in decimal, `30.3849` -> 0.303849), `NA` -> None; AVAILABLE is a
    whole number, `>10000000` -> 10,000,000, `NA` -> None; REBATERATE is a decimal percent (may be negative)
    or `NA` -> None. CON and ISIN are not checked (they are not used).

    Duplicates: two rows whose symbols normalise to the same ticker collapse to one entry, the row with the
    larger availability (`NA` counts as less than any number), the later row on a tie. The four real files
    in `shared/data` have no such duplicates, so there `len(entries)` equals the `#EOF` count.

    `loaded_at` must be timezone-aware (ValueError otherwise, a caller's bug rather than a damaged file).
    Raises `DataFileError("ibkr", line, rule)` for a damaged file.
    """
    if loaded_at.tzinfo is None or loaded_at.utcoffset() is None:
        raise ValueError("loaded_at must be a timezone-aware datetime")
    lines = _lines_of(_text_of(content, IBKR_KIND))
    if not lines:
        raise DataFileError(IBKR_KIND, 1, "the file is empty; expected '#BOF|YYYY.MM.DD|HH:MM:SS'")
    as_of = _ibkr_as_of(lines[0])
    if len(lines) < 2:
        raise DataFileError(IBKR_KIND, 2, "the '#SYM|...|' header line is missing")
    columns = _ibkr_columns(lines[1])
    width = len(columns) + 1  # the trailing '|' leaves an empty last field
    i_sym, i_cur, i_name = columns["SYM"], columns["CUR"], columns["NAME"]
    i_rebate, i_fee, i_available = columns["REBATERATE"], columns["FEERATE"], columns["AVAILABLE"]

    # Hot loop (17,000 rows in a few tens of milliseconds): one split per row, and each distinct
    # FEERATE / REBATERATE / AVAILABLE / CUR text converted once ("0.2500", ">10000000", "USD" recur).
    normalize = normalize_ticker
    new_entry = AvailabilityEntry
    fees: dict[str, float | None] = {_NA: None}
    rebates: dict[str, float | None] = {_NA: None}
    availables: dict[str, int | None] = {_NA: None, _AVAILABLE_CAPPED_TEXT: AVAILABLE_CAP}
    currencies: dict[str, str] = {}
    entries: dict[str, AvailabilityEntry] = {}
    eof_index = -1
    index = 1
    for line in itertools.islice(lines, 2, None):
        index += 1
        fields = line.split("|")
        if len(fields) != width or fields[-1]:
            if line.startswith("#EOF"):
                eof_index = index
                break
            raise DataFileError(IBKR_KIND, index + 1, _ibkr_shape_problem(line, fields, width))
        ticker = normalize(fields[i_sym])
        if ticker is None:
            raise DataFileError(IBKR_KIND, index + 1, f"SYM {fields[i_sym]!r} is not a valid ticker")
        try:
            try:
                fee_rate = fees[fields[i_fee]]
            except KeyError:
                fee_rate = fees[fields[i_fee]] = _fee_rate(fields[i_fee])
            try:
                available = availables[fields[i_available]]
            except KeyError:
                available = availables[fields[i_available]] = _available(fields[i_available])
            try:
                rebate = rebates[fields[i_rebate]]
            except KeyError:
                rebate = rebates[fields[i_rebate]] = _rebate_rate(fields[i_rebate])
            try:
                currency = currencies[fields[i_cur]]
            except KeyError:
                currency = currencies[fields[i_cur]] = _currency(fields[i_cur])
        except ValueError as exc:
            raise DataFileError(IBKR_KIND, index + 1, str(exc)) from None
        if ticker in entries and _availability_rank(entries[ticker].available) > _availability_rank(
            available
        ):
            continue  # a duplicate symbol: the row with the larger availability wins (the later on a tie)
        entries[ticker] = new_entry(ticker, fee_rate, available, rebate, fields[i_name], currency)

    if eof_index < 0:
        raise DataFileError(IBKR_KIND, len(lines) + 1, "the '#EOF|N' trailer is missing (truncated file?)")
    eof_line = lines[eof_index]
    match = _EOF.fullmatch(eof_line)
    if match is None:
        raise DataFileError(IBKR_KIND, eof_index + 1, "the trailer must be '#EOF|N' with N a whole number")
    rows = eof_index - 2
    if int(match.group(1)) != rows:
        raise DataFileError(
            IBKR_KIND, eof_index + 1, f"#EOF announces {match.group(1)} rows but the file has {rows}"
        )
    end = _last_content_line(lines)
    if end > eof_index + 1:
        first_extra = next(i for i in range(eof_index + 1, end) if lines[i].strip())
        raise DataFileError(IBKR_KIND, first_extra + 1, "content after the '#EOF' trailer")
    return AvailabilitySnapshot(as_of=as_of, entries=entries, loaded_at=loaded_at)


# --------------------------------------------------------------------------------------------------
# Cboe VIX daily history
# --------------------------------------------------------------------------------------------------


def _us_date(text: str) -> dt.date:
    """A strict `MM/DD/YYYY` date."""
    if len(text) != 10 or text[2] != "/" or text[5] != "/":
        raise ValueError
    month, day, year = text[:2], text[3:5], text[6:]
    if not all(part.isascii() and part.isdigit() for part in (month, day, year)):
        raise ValueError
    return dt.date(int(year), int(month), int(day))


def _iso_date(text: str) -> dt.date:
    """A strict `YYYY-MM-DD` date (`date.fromisoformat` alone also takes `20240813`, `2024-W01-1`...)."""
    if len(text) != 10 or text[4] != "-" or text[7] != "-" or not text.isascii():
        raise ValueError
    return dt.date.fromisoformat(text)


def _decimal_places(value: Decimal) -> int:
    """Decimal places once trailing zeros are dropped (17.090000 -> 2, 20.000 -> 0)."""
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # finite values only reach here
    return max(0, -exponent)


class VixHistory(msgspec.Struct, frozen=True):
    """A parsed VIX history: the reading it yields and the number of data rows read (the header aside)."""

    reading: VolatilityReading
    rows: int


def parse_vix(content: str | bytes) -> VolatilityReading:
    """The reading of a VIX daily history CSV (see `parse_vix_history`)."""
    return parse_vix_history(content).reading


def parse_vix_history(content: str | bytes) -> VixHistory:
    """Parse Cboe's VIX daily history CSV (`DATE,OPEN,HIGH,LOW,CLOSE`, dates `MM/DD/YYYY`).

    Every row is checked: five fields, a valid date later than the previous row's, four non-negative
    decimal numbers, LOW <= HIGH. (OPEN and CLOSE are not required to lie within LOW..HIGH: Cboe's own early
    history breaks that rule on dozens of days.) The reading is the last row's CLOSE as of that date at
    00:00 UTC, with `source="vix_file"`; that CLOSE must have at most 4 decimals once trailing zeros are
    dropped (17.090000 reads as 17.09) and lie within 0..200.

    Raises `DataFileError("vix", line, rule)` for a damaged file, an empty one or one without data rows.
    """
    lines = _lines_of(_text_of(content, VIX_KIND))
    end = _last_content_line(lines)
    if end == 0:
        raise DataFileError(VIX_KIND, 1, "the file is empty; expected the header DATE,OPEN,HIGH,LOW,CLOSE")
    if tuple(lines[0].split(",")) != VIX_HEADER:
        raise DataFileError(VIX_KIND, 1, "the header must be DATE,OPEN,HIGH,LOW,CLOSE")
    if end == 1:
        raise DataFileError(VIX_KIND, 2, "the file has no data rows")
    previous: dt.date | None = None
    day = dt.date.min
    close = Decimal(0)
    for index in range(1, end):
        fields = lines[index].split(",")
        if len(fields) != len(VIX_HEADER):
            raise DataFileError(VIX_KIND, index + 1, f"expected 5 fields, found {len(fields)}")
        try:
            day = _us_date(fields[0])
        except ValueError:
            raise DataFileError(VIX_KIND, index + 1, f"DATE {fields[0]!r} is not a MM/DD/YYYY date") from None
        if previous is not None and day <= previous:
            raise DataFileError(VIX_KIND, index + 1, f"DATE {fields[0]} is not after the previous row's")
        previous = day
        values: list[Decimal] = []
        for name, text in zip(VIX_HEADER[1:], fields[1:], strict=True):
            if _DECIMAL.fullmatch(text) is None:
                raise DataFileError(VIX_KIND, index + 1, f"{name} {text!r} is not a decimal number")
            value = Decimal(text)
            if value < 0:
                raise DataFileError(VIX_KIND, index + 1, f"{name} {text} is negative")
            values.append(value)
        _open, high, low, close = values
        if low > high:
            raise DataFileError(VIX_KIND, index + 1, f"LOW {fields[3]} is above HIGH {fields[2]}")
    last_line = end
    if _decimal_places(close) > VIX_MAX_DECIMALS:
        raise DataFileError(
            VIX_KIND, last_line, f"the last CLOSE {close} has more than {VIX_MAX_DECIMALS} decimals"
        )
    if close > VIX_MAX_VALUE:
        raise DataFileError(VIX_KIND, last_line, f"the last CLOSE {close} is outside 0..{VIX_MAX_VALUE}")
    as_of = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    reading = VolatilityReading(value=float(str(close.normalize())), as_of=as_of, source="vix_file")
    # Every line between the header and the last content line is a data row (each was checked above).
    return VixHistory(reading=reading, rows=end - 1)


# --------------------------------------------------------------------------------------------------
# Alpha Vantage earnings calendar
# --------------------------------------------------------------------------------------------------


class EarningsCalendar(msgspec.Struct, frozen=True):
    """An earnings calendar: `events` maps each normalised ticker to its earnings reports, sorted by date
    and one per date; `rows` is the file's number of data rows; `skipped` lists, once each and in file
    order, the symbols that are not tickers under DESIGN §2.1 (their rows are left out)."""

    events: dict[str, list[MarketEvent]]
    rows: int
    skipped: list[str]


def _csv_records(text: str) -> Iterator[tuple[int, list[str]]]:
    """CSV records with the 1-based line each starts on (quoted fields may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # Reported where the record starts: an unterminated quote fails only at the end of the data.
            raise DataFileError(EARNINGS_KIND, start, f"not valid CSV: {exc}") from None
        yield start, record
        start = reader.line_num + 1


def parse_earnings(content: str | bytes) -> EarningsCalendar:
    """Parse an Alpha Vantage `EARNINGS_CALENDAR` CSV into each ticker's earnings events.

    The header must be exactly `symbol,name,reportDate,fiscalDateEnding,estimate,currency`; every row has
    six fields (names with commas are quoted), `reportDate` and `fiscalDateEnding` are `YYYY-MM-DD` dates,
    `estimate` is empty or a decimal number and `currency` a three-letter code. A symbol that does not
    normalise as a ticker (e.g. `COR_OLD`) is not an error: its rows are left out and the symbol is listed
    in `skipped`. Rows giving
    the same (ticker, reportDate) twice, as the real calendar does for a few companies with two fiscal
    periods, collapse to one event. Events are `MarketEvent(date=reportDate, type="earnings",
    risk_factor=None)`; their risk follows the days to the report (DESIGN §3).

    Raises `DataFileError("earnings", line, rule)` for a damaged file, an empty one or one without rows.
    """
    records = _csv_records(_text_of(content, EARNINGS_KIND))
    first = next(records, None)
    if first is None:
        raise DataFileError(EARNINGS_KIND, 1, "the file is empty; expected the " + ",".join(EARNINGS_HEADER))
    if tuple(first[1]) != EARNINGS_HEADER:
        raise DataFileError(EARNINGS_KIND, 1, "the header must be " + ",".join(EARNINGS_HEADER))
    dates: dict[str, set[dt.date]] = {}
    skipped: dict[str, None] = {}
    rows = 0
    blank_line = 0
    for line, record in records:
        if not record:
            blank_line = blank_line or line
            continue
        if blank_line:
            raise DataFileError(EARNINGS_KIND, blank_line, "blank line among the data rows")
        if len(record) != len(EARNINGS_HEADER):
            raise DataFileError(EARNINGS_KIND, line, f"expected 6 fields, found {len(record)}")
        symbol, _name, report, fiscal, estimate, currency = record
        try:
            report_date = _iso_date(report)
        except ValueError:
            raise DataFileError(
                EARNINGS_KIND, line, f"reportDate {report!r} is not a YYYY-MM-DD date"
            ) from None
        try:
            _iso_date(fiscal)
        except ValueError:
            raise DataFileError(
                EARNINGS_KIND, line, f"fiscalDateEnding {fiscal!r} is not a YYYY-MM-DD date"
            ) from None
        if estimate and _DECIMAL.fullmatch(estimate) is None:
            raise DataFileError(EARNINGS_KIND, line, f"estimate {estimate!r} is not a decimal number")
        try:
            _currency(currency)
        except ValueError as exc:
            raise DataFileError(EARNINGS_KIND, line, str(exc).replace("CUR", "currency", 1)) from None
        rows += 1
        ticker = normalize_ticker(symbol)
        if ticker is None:
            skipped[symbol] = None
            continue
        dates.setdefault(ticker, set()).add(report_date)
    if rows == 0:
        raise DataFileError(EARNINGS_KIND, 2, "the file has no data rows")
    events = {
        ticker: [MarketEvent(date=day, type="earnings", risk_factor=None) for day in sorted(days)]
        for ticker, days in dates.items()
    }
    return EarningsCalendar(events=events, rows=rows, skipped=list(skipped))
