"""Loaders of the market-data files (DESIGN §3 availability files, §5 data), checked on the real files.

The real files come from `../shared/data` (see `shared_data.py`); a missing file fails the test, it is
never skipped. Damaged files are made by mutating the real ones in memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pricer.errors import DataFileError
from pricer.marketdata.loaders import EarningsCalendar, parse_availability, parse_earnings, parse_vix
from pricer.models import AvailabilityEntry, AvailabilitySnapshot, MarketEvent
from pricer.tickers import normalize_ticker
from tests.shared_data import SHARED_DATA

UTC = dt.UTC
NEW_YORK = ZoneInfo("America/New_York")
LOADED_AT = dt.datetime(2026, 8, 1, 12, 0, tzinfo=UTC)

IBKR_2022 = "ibkr_usa_2022-08-06.txt"
VIX = "VIX_History.csv"
EARNINGS = "alphavantage_earnings_calendar_2024-06-21.csv"

# file -> (#EOF count, #BOF instant in UTC, rows with FEERATE NA, rows with AVAILABLE >10000000)
IBKR_FILES = {
    "ibkr_usa_2021-06-11.txt": (13210, dt.datetime(2021, 6, 11, 23, 15, 3, tzinfo=UTC), 20, 509),
    "ibkr_usa_2021-06-14.txt": (13345, dt.datetime(2021, 6, 14, 21, 30, 4, tzinfo=UTC), 33, 540),
    "ibkr_usa_2021-06-15.txt": (13026, dt.datetime(2021, 6, 15, 13, 15, 2, tzinfo=UTC), 31, 530),
    IBKR_2022: (17461, dt.datetime(2022, 8, 7, 2, 30, 3, tzinfo=UTC), 35, 791),
}

HEADER = "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|"


def read_bytes(name: str) -> bytes:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(
            f"shared data file {path} is missing: the loaders are tested on the real files (DESIGN §5)"
        )
    return path.read_bytes()


def read_text(name: str) -> str:
    return read_bytes(name).decode("utf-8")


def ibkr_lines(name: str = IBKR_2022) -> list[str]:
    """The file's lines without their CRLF; index i is line i + 1."""
    text = read_text(name)
    assert text.endswith("\r\n")
    return text[:-2].split("\r\n")


def crlf(lines: list[str]) -> str:
    return "".join(line + "\r\n" for line in lines)


def line_of(lines: list[str], prefix: str) -> int:
    """The 1-based line of the first line starting with `prefix`."""
    return next(i for i, line in enumerate(lines) if line.startswith(prefix)) + 1


def rejects(parse: Callable[[str | bytes], object], content: str | bytes, kind: str, line: int) -> str:
    with pytest.raises(DataFileError) as caught:
        parse(content)
    error = caught.value
    assert (error.kind, error.line) == (kind, line), error.message
    assert error.details == {"file_type": kind, "line": line}
    return error.message


def ibkr(content: str | bytes) -> AvailabilitySnapshot:
    return parse_availability(content, loaded_at=LOADED_AT)


def rejects_ibkr(content: str | bytes, line: int) -> str:
    return rejects(ibkr, content, "ibkr", line)


def synthetic_ibkr(rows: list[str], *, bof: str = "#BOF|2026.07.31|09:15:02", header: str = HEADER) -> str:
    return crlf([bof, header, *rows, f"#EOF|{len(rows)}"])


def test_shared_data_dir_is_present() -> None:
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing (DESIGN §5: ../shared/data next to the repo)"
    assert SHARED_DATA.name == "data"
    assert SHARED_DATA.parent.name == "shared"


# --------------------------------------------------------------------------------------------------
# IBKR availability files: the real ones
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IBKR_FILES))
def test_real_ibkr_file_parses_whole(name: str) -> None:
    eof_count, as_of, fee_na, capped = IBKR_FILES[name]
    lines = ibkr_lines(name)
    assert lines[-1] == f"#EOF|{eof_count}"
    assert len(lines) == eof_count + 3

    snapshot = parse_availability(read_bytes(name), loaded_at=LOADED_AT)

    assert snapshot.as_of == as_of
    assert snapshot.as_of.utcoffset() == dt.timedelta(0)
    assert snapshot.loaded_at is LOADED_AT
    # Finding: no symbol of the real files normalises to the same ticker as another, so no row collapses
    # and the entry count equals the #EOF count exactly.
    assert len(snapshot.entries) == eof_count
    raw_symbols = [line.split("|", 1)[0] for line in lines[2:-1]]
    assert len({normalize_ticker(symbol) for symbol in raw_symbols}) == eof_count
    assert all(ticker == entry.ticker for ticker, entry in snapshot.entries.items())
    entries = snapshot.entries.values()
    assert sum(entry.fee_rate is None for entry in entries) == fee_na
    assert sum(entry.rebate_rate is None for entry in entries) == fee_na
    assert sum(entry.available == 10_000_000 for entry in entries) == capped
    assert not any(entry.available is None for entry in entries)


@pytest.mark.parametrize("name", sorted(IBKR_FILES))
def test_real_ibkr_fee_rates_are_the_exact_decimal_feerate_over_100(name: str) -> None:
    snapshot = parse_availability(read_text(name), loaded_at=LOADED_AT)
    for line in ibkr_lines(name)[2:-1]:
        fields = line.split("|")
        entry = snapshot.entries[normalize_ticker(fields[0]) or ""]
        if fields[6] == "NA":
            assert entry.fee_rate is None
        else:
            assert entry.fee_rate is not None
            assert Decimal(repr(entry.fee_rate)) == Decimal(fields[6]) / 100, line
        assert entry.name == fields[2]
        assert entry.currency == fields[1]


def test_real_ibkr_spot_checks() -> None:
    snapshot = parse_availability(read_bytes(IBKR_2022), loaded_at=LOADED_AT)
    assert snapshot.as_of.isoformat() == "2022-08-07T02:30:03+00:00"
    a = snapshot.entries["A"]
    assert a == AvailabilityEntry("A", 0.004081, 10_000_000, 1.9119, "AGILENT TECHNOLOGIES INC", "USD")
    assert repr(a.fee_rate) == "0.004081"
    assert snapshot.entries["AA"].available == 4_000_000
    assert repr(snapshot.entries["AA"].fee_rate) == "0.002664"
    # `AAIC PRB` (space as class separator) normalises to AAIC.PRB; `AADI.OLD1` keeps its dot.
    assert snapshot.entries["AAIC.PRB"].available == 20_000
    assert "AAIC PRB" not in snapshot.entries
    assert "AADI.OLD1" in snapshot.entries
    # `NA` fee and rebate rates read as None; the availability of that row is still a number.
    assert snapshot.entries["AFFL"] == AvailabilityEntry(
        "AFFL", None, 25_000, None, "AFFILIATED RESOURCES CORP", "USD"
    )
    assert snapshot.entries["ZZZOF"].fee_rate == 0.003
    assert snapshot.entries["ZYXI"].rebate_rate == -1.0621


def test_real_ibkr_2021_spot_checks() -> None:
    snapshot = parse_availability(read_bytes("ibkr_usa_2021-06-11.txt"), loaded_at=LOADED_AT)
    assert snapshot.entries["AA"].available == 9_600_000
    assert snapshot.entries["S7X"].currency == "EUR"
    assert snapshot.entries["S7X"].rebate_rate == -0.878
    assert snapshot.entries["AAC.U"].ticker == "AAC.U"
    assert "ADELQ.ESC" in snapshot.entries


def test_ibkr_str_bytes_lf_and_bom_agree() -> None:
    text = read_text(IBKR_2022)
    expected = ibkr(text)
    assert ibkr(text.encode()) == expected
    assert ibkr(text.replace("\r\n", "\n")) == expected
    assert ibkr(text.rstrip("\r\n")) == expected  # no newline after #EOF
    assert ibkr(b"\xef\xbb\xbf" + text.encode()) == expected
    assert ibkr(text + "\r\n\r\n") == expected  # blank lines after #EOF


def test_ibkr_figi_column_is_located_by_name() -> None:
    lines = ibkr_lines()
    with_figi = [lines[0], lines[1] + "FIGI|"]
    with_figi += [row + f"BBG{index:09d}|" for index, row in enumerate(lines[2:-1])]
    with_figi.append(lines[-1])
    assert ibkr(crlf(with_figi)) == ibkr(crlf(lines))


def test_ibkr_columns_in_another_order() -> None:
    header = "#SYM|FEERATE|AVAILABLE|CUR|NAME|CON|ISIN|REBATERATE|FIGI|"
    snapshot = ibkr(synthetic_ibkr(["GME|30.3849|250000|USD|GAMESTOP|1|X|-29.9|BBG0|"], header=header))
    assert snapshot.entries == {"GME": AvailabilityEntry("GME", 0.303849, 250_000, -29.9, "GAMESTOP", "USD")}


def test_ibkr_fee_rate_conversion_is_exact_in_decimal() -> None:
    rows = [
        "GME|USD|GAMESTOP|1|X|-29.9|30.3849|250000|",
        "ZERO|USD|Z|1|X|0|0.0000|0|",
        "TINY|USD|T|1|X|0|0.0001|1|",
        "BIG|USD|B|1|X|0|1000|1|",
        "TWELVE|USD|T|1|X|0|1.23456789012|1|",
        "LONG|USD|L|1|X|0|000000000000000.2500000000000000|1|",
    ]
    entries = ibkr(synthetic_ibkr(rows)).entries
    assert {ticker: repr(entry.fee_rate) for ticker, entry in entries.items()} == {
        "GME": "0.303849",
        "ZERO": "0.0",
        "TINY": "1e-06",
        "BIG": "10.0",
        "TWELVE": "0.0123456789012",
        "LONG": "0.0025",
    }
    assert entries["ZERO"].available == 0


def test_ibkr_na_values() -> None:
    entries = ibkr(synthetic_ibkr(["X|USD|X CORP|1|X|NA|NA|NA|", "Y|USD||1|X|NA|1.5|>10000000|"])).entries
    assert entries["X"] == AvailabilityEntry("X", None, None, None, "X CORP", "USD")
    assert entries["Y"] == AvailabilityEntry("Y", 0.015, 10_000_000, None, "", "USD")


def test_ibkr_symbols_normalise() -> None:
    rows = [f"{symbol}|USD|N|1|X|0|1|1|" for symbol in ("BRK B", "BF-A", "AB/C", "abc", "A.B")]
    assert list(ibkr(synthetic_ibkr(rows)).entries) == ["BRK.B", "BF.A", "AB.C", "ABC", "A.B"]


def test_ibkr_duplicate_symbols_keep_the_larger_availability_else_the_last() -> None:
    rows = [
        "BRK B|USD|first|1|X|0|1|500|",
        "BRK.B|USD|second|1|X|0|2|900|",
        "BRK-B|USD|third|1|X|0|3|100|",
        "TIE|USD|first|1|X|0|1|7|",
        "TIE|USD|second|1|X|0|2|7|",
        "NA0|USD|zero|1|X|0|1|0|",
        "NA0|USD|na|1|X|0|2|NA|",
        "CAP|USD|number|1|X|0|1|10000000|",
        "CAP|USD|capped|1|X|0|2|>10000000|",
    ]
    entries = ibkr(synthetic_ibkr(rows)).entries
    assert {ticker: entry.name for ticker, entry in entries.items()} == {
        "BRK.B": "second",
        "TIE": "second",
        "NA0": "zero",
        "CAP": "capped",
    }


def test_ibkr_names_decode_as_utf8_else_latin1() -> None:
    text = synthetic_ibkr(["NESN|CHF|NESTLÉ SA|1|X|0|0.25|100|"])
    assert ibkr(text.encode("utf-8")).entries["NESN"].name == "NESTLÉ SA"
    assert ibkr(text.encode("latin-1")).entries["NESN"].name == "NESTLÉ SA"
    # NEL (U+0085, byte 0x85 in latin-1) inside a name is not a line break.
    assert ibkr(synthetic_ibkr(["X|USD|A\x85B|1|X|0|1|1|"]).encode("latin-1")).entries["X"].name == "A\x85B"


def test_ibkr_loaded_at_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_availability(synthetic_ibkr([]), loaded_at=dt.datetime(2026, 1, 1))


def test_ibkr_empty_body_with_zero_rows_is_valid() -> None:
    snapshot = ibkr(synthetic_ibkr([]))
    assert snapshot.entries == {}
    assert snapshot.as_of == dt.datetime(2026, 7, 31, 13, 15, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("bof", "expected"),
    [
        ("#BOF|2022.01.15|09:00:00", dt.datetime(2022, 1, 15, 14, 0, tzinfo=UTC)),  # EST, UTC-5
        ("#BOF|2022.07.15|09:00:00", dt.datetime(2022, 7, 15, 13, 0, tzinfo=UTC)),  # EDT, UTC-4
        ("#BOF|2022.12.31|23:59:59", dt.datetime(2023, 1, 1, 4, 59, 59, tzinfo=UTC)),
        ("#BOF|2022.11.06|01:30:00", dt.datetime(2022, 11, 6, 5, 30, tzinfo=UTC)),  # ambiguous: first (EDT)
    ],
)
def test_ibkr_bof_is_new_york_time(bof: str, expected: dt.datetime) -> None:
    assert ibkr(synthetic_ibkr([], bof=bof)).as_of == expected


# --------------------------------------------------------------------------------------------------
# IBKR availability files: damaged copies of the real 2022 file (lines: 1 #BOF, 2 header, 3..17463 rows,
# 17464 #EOF)
# --------------------------------------------------------------------------------------------------


def test_damaged_ibkr_truncated_mid_row() -> None:
    lines = ibkr_lines()
    line = 100
    text = crlf(lines[: line - 1]) + lines[line - 1][:20]
    assert "fields" in rejects_ibkr(text, line)


def test_damaged_ibkr_truncated_at_a_row_boundary() -> None:
    lines = ibkr_lines()
    kept = lines[:5000]
    assert "#EOF" in rejects_ibkr(crlf(kept), 5001)
    assert "#EOF" in rejects_ibkr(crlf(lines[:-1]), 17464)  # every row but no trailer


def test_damaged_ibkr_empty_or_header_only() -> None:
    lines = ibkr_lines()
    rejects_ibkr("", 1)
    rejects_ibkr(b"", 1)
    rejects_ibkr(crlf(lines[:1]), 2)
    rejects_ibkr(crlf(lines[:2]), 3)


@pytest.mark.parametrize(
    ("column", "bad"),
    [
        (6, "0.26x4"),  # FEERATE
        (6, "-0.2664"),  # negative fee
        (6, "1.234567890123"),  # 13 significant digits
        (6, "1e5"),
        (6, "NaN"),
        (6, "Infinity"),
        (6, " 0.2664"),
        (6, "0_2664"),
        (6, ""),
        (6, "na"),
        (6, "٣"),  # a Unicode digit
        (7, "4,000,000"),  # AVAILABLE
        (7, "-4000000"),
        (7, ">20000000"),
        (7, "4000000.0"),
        (7, ""),
        (5, "2.05.36"),  # REBATERATE
        (5, "abc"),
        (5, "+2.0536"),
        (1, "usd"),  # CUR
        (1, ""),
        (0, "AA_B"),  # SYM that does not normalise
        (0, "TOOLONGTICKER"),
        (0, "BRK B C"),
        (0, ""),
    ],
)
def test_damaged_ibkr_bad_field(column: int, bad: str) -> None:
    lines = ibkr_lines()
    line = line_of(lines, "AA|")
    assert line == 4
    fields = lines[line - 1].split("|")
    fields[column] = bad
    lines[line - 1] = "|".join(fields)
    rejects_ibkr(crlf(lines), line)


def test_damaged_ibkr_reports_the_first_damaged_line() -> None:
    lines = ibkr_lines()
    lines[9000] = lines[9000].replace("|USD|", "|usd|")
    lines[700] = lines[700].replace("|USD|", "|U$D|")
    rejects_ibkr(crlf(lines), 701)


def test_damaged_ibkr_eof_count_changed() -> None:
    lines = ibkr_lines()
    for count in ("17460", "17462", "0"):
        lines[-1] = f"#EOF|{count}"
        assert "17461" in rejects_ibkr(crlf(lines), 17464)


@pytest.mark.parametrize("trailer", ["#EOF|", "#EOF|abc", "#EOF|17461|", "#EOF 17461", "#EOF|-17461", "#EOF"])
def test_damaged_ibkr_malformed_eof(trailer: str) -> None:
    lines = ibkr_lines()
    lines[-1] = trailer
    rejects_ibkr(crlf(lines), 17464)


def test_damaged_ibkr_dropped_or_extra_column() -> None:
    lines = ibkr_lines()
    line = line_of(lines, "GME|")
    fields = lines[line - 1].split("|")
    dropped = lines.copy()
    dropped[line - 1] = "|".join(fields[:4] + fields[5:])  # no ISIN
    assert "fields" in rejects_ibkr(crlf(dropped), line)
    extra = lines.copy()
    extra[line - 1] = lines[line - 1] + "EXTRA|"
    rejects_ibkr(crlf(extra), line)
    no_trailing_bar = lines.copy()
    no_trailing_bar[line - 1] = lines[line - 1][:-1]
    rejects_ibkr(crlf(no_trailing_bar), line)
    stray_cr = lines.copy()
    stray_cr[line - 1] = lines[line - 1] + "\r"
    rejects_ibkr(crlf(stray_cr), line)


def test_damaged_ibkr_a_column_dropped_everywhere() -> None:
    lines = ibkr_lines()
    without_isin = [lines[0]] + ["|".join(line.split("|")[:4] + line.split("|")[5:]) for line in lines[1:-1]]
    rejects_ibkr(crlf([*without_isin, lines[-1]]), 2)  # the header lacks ISIN


@pytest.mark.parametrize(
    "header",
    [
        "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEE|AVAILABLE|",
        "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|",
        "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE",
        "SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|",
        "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|FEERATE|",
        "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE||",
        "#sym|cur|name|con|isin|rebaterate|feerate|available|",
        "",
    ],
)
def test_damaged_ibkr_bad_header(header: str) -> None:
    lines = ibkr_lines()
    lines[1] = header
    rejects_ibkr(crlf(lines), 2)


def test_damaged_ibkr_content_after_eof() -> None:
    lines = ibkr_lines()
    assert "after" in rejects_ibkr(crlf([*lines, lines[2]]), 17465)
    assert "after" in rejects_ibkr(crlf([*lines, "", "", "#EOF|17461"]), 17467)
    rejects_ibkr(crlf([*lines, lines[-1]]), 17465)


def test_damaged_ibkr_eof_in_the_middle() -> None:
    lines = ibkr_lines()
    moved = [*lines[:1000], "#EOF|998", *lines[1000:-1]]
    assert "after" in rejects_ibkr(crlf(moved), 1002)
    moved[1000] = "#EOF|17461"
    assert "998" in rejects_ibkr(crlf(moved), 1001)


def test_damaged_ibkr_stray_lines_among_rows() -> None:
    lines = ibkr_lines()
    assert "blank" in rejects_ibkr(crlf([*lines[:50], "", *lines[50:]]), 51)
    assert "'#'" in rejects_ibkr(crlf([*lines[:50], "#COMMENT", *lines[50:]]), 51)
    assert "blank" in rejects_ibkr(crlf([*lines[:2], "   ", *lines[2:]]), 3)


@pytest.mark.parametrize(
    "bof",
    [
        "#BOF|2022.02.30|22:30:03",  # no such day
        "#BOF|2022.13.06|22:30:03",
        "#BOF|2022.08.06|24:30:03",
        "#BOF|2022.08.06|22:60:03",
        "#BOF|2022-08-06|22:30:03",
        "#BOF|2022.8.6|22:30:03",
        "#BOF|2022.08.06",
        "#BOF|2022.08.06|22:30:03|",
        "#BOF 2022.08.06 22:30:03",
        "BOF|2022.08.06|22:30:03",
        "#BOF|2022.03.13|02:30:00",  # in the spring-forward gap: no such New York time
        "",
    ],
)
def test_damaged_ibkr_bad_bof(bof: str) -> None:
    lines = ibkr_lines()
    lines[0] = bof
    rejects_ibkr(crlf(lines), 1)


def test_damaged_ibkr_missing_bof() -> None:
    rejects_ibkr(crlf(ibkr_lines()[1:]), 1)


# --------------------------------------------------------------------------------------------------
# IBKR: synthetic files round-trip
# --------------------------------------------------------------------------------------------------

_symbols = st.from_regex(r"[A-Z][A-Z0-9]{0,4}(?:[ ./\-][A-Z0-9]{1,4})?", fullmatch=True)
_fees = st.none() | st.decimals(
    min_value=0, max_value=10_000, places=4, allow_nan=False, allow_infinity=False
)
_rebates = st.none() | st.decimals(
    min_value=-10_000, max_value=10_000, places=4, allow_nan=False, allow_infinity=False
)
_availables = st.none() | st.integers(min_value=0, max_value=10_000_001)
# NUL is refused (a file with one is rejected naming its line: test_request_contract.py).
_names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="|\r\n\x00"),
    max_size=30,
)
_rows = st.tuples(_symbols, _fees, _rebates, _availables, _names, st.sampled_from(["USD", "EUR", "CAD"]))


@settings(max_examples=150, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(_rows, max_size=25, unique_by=lambda row: normalize_ticker(row[0])),
    local=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2040, 12, 31)),
    newline=st.sampled_from(["\r\n", "\n"]),
    as_bytes=st.booleans(),
    figi=st.booleans(),
)
def test_synthetic_ibkr_files_round_trip(
    rows: list[tuple[str, Decimal | None, Decimal | None, int | None, str, str]],
    local: dt.datetime,
    newline: str,
    as_bytes: bool,
    figi: bool,
) -> None:
    local = local.replace(microsecond=0)
    aware = local.replace(tzinfo=NEW_YORK)
    assume(aware.astimezone(UTC).astimezone(NEW_YORK).replace(tzinfo=None) == local)  # not in a DST gap

    def text(value: object) -> str:
        return "NA" if value is None else str(value)

    def available_text(value: int | None) -> str:
        return ">10000000" if value == 10_000_001 else text(value)

    lines = [f"#BOF|{local:%Y.%m.%d|%H:%M:%S}", HEADER + ("FIGI|" if figi else "")]
    for symbol, fee, rebate, available, name, currency in rows:
        rates = f"{text(rebate)}|{text(fee)}|{available_text(available)}|"
        row = f"{symbol}|{currency}|{name}|123|US0000000000|{rates}"
        lines.append(row + ("BBG000000000|" if figi else ""))
    lines.append(f"#EOF|{len(rows)}")
    content = newline.join(lines) + newline

    snapshot = parse_availability(content.encode() if as_bytes else content, loaded_at=LOADED_AT)

    assert snapshot.as_of == aware.astimezone(UTC)
    expected = {}
    for symbol, fee, rebate, available, name, currency in rows:
        ticker = normalize_ticker(symbol)
        assert ticker is not None
        expected[ticker] = AvailabilityEntry(
            ticker,
            None if fee is None else float(fee / 100),
            None if available is None else min(available, 10_000_000),
            None if rebate is None else float(rebate),
            name,
            currency,
        )
        if fee is not None:
            assert Decimal(repr(snapshot.entries[ticker].fee_rate)) == fee / 100
    assert snapshot.entries == expected


# --------------------------------------------------------------------------------------------------
# VIX history
# --------------------------------------------------------------------------------------------------


def vix_lines() -> list[str]:
    text = read_text(VIX)
    assert text.endswith("\n")
    return text[:-1].split("\n")


def lf(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def rejects_vix(content: str | bytes, line: int) -> str:
    return rejects(parse_vix, content, "vix", line)


def test_real_vix_last_close() -> None:
    lines = vix_lines()
    assert len(lines) == 9242
    assert lines[-1] == "07/31/2026,16.820000,18.700000,15.820000,15.990000"
    reading = parse_vix(read_bytes(VIX))
    assert reading.value == 15.99
    assert repr(reading.value) == "15.99"
    assert reading.as_of == dt.datetime(2026, 7, 31, tzinfo=UTC)
    assert reading.source == "vix_file"


def test_real_vix_variants_agree() -> None:
    text = read_text(VIX)
    expected = parse_vix(text)
    assert parse_vix(text.encode()) == expected
    assert parse_vix(text.replace("\n", "\r\n")) == expected
    assert parse_vix(text.rstrip("\n")) == expected
    assert parse_vix(text + "\n\n") == expected


def test_real_vix_previous_day() -> None:
    reading = parse_vix(lf(vix_lines()[:-1]))
    assert repr(reading.value) == "17.09"  # 17.090000 in the file
    assert reading.as_of == dt.datetime(2026, 7, 30, tzinfo=UTC)


def test_vix_close_bounds_and_decimals() -> None:
    header = "DATE,OPEN,HIGH,LOW,CLOSE"
    assert parse_vix(lf([header, "01/02/2026,1,250,0,200.000000"])).value == 200.0
    assert parse_vix(lf([header, "01/02/2026,0,0,0,0"])).value == 0.0
    assert repr(parse_vix(lf([header, "01/02/2026,1,30,0,12.3456"])).value) == "12.3456"
    assert "200" in rejects_vix(lf([header, "01/02/2026,1,250,0,200.01"]), 2)
    assert "decimals" in rejects_vix(lf([header, "01/01/2026,1,1,1,1", "01/02/2026,1,30,0,12.34567"]), 3)
    # Older rows may carry more decimals: only the CLOSE that becomes the reading is held to 4.
    assert parse_vix(lf([header, "01/01/2026,1,1,1,1.123456", "01/02/2026,1,3,0,2"])).value == 2.0


def test_damaged_vix_empty_or_header_only() -> None:
    rejects_vix("", 1)
    rejects_vix("\n\n", 1)
    rejects_vix("DATE,OPEN,HIGH,LOW,CLOSE\n", 2)
    rejects_vix("DATE,OPEN,HIGH,LOW,CLOSE", 2)


@pytest.mark.parametrize(
    "header", ["Date,Open,High,Low,Close", "DATE,OPEN,HIGH,LOW", "DATE;OPEN;HIGH;LOW;CLOSE", ""]
)
def test_damaged_vix_bad_header(header: str) -> None:
    lines = vix_lines()
    lines[0] = header
    rejects_vix(lf(lines), 1)


@pytest.mark.parametrize(
    "row",
    [
        "07/31/2025,16.82,18.70,15.82",  # 4 fields
        "07/31/2025,16.82,18.70,15.82,15.99,1",  # 6 fields
        "",  # blank line in the middle
        "2025-07-31,16.82,18.70,15.82,15.99",
        "13/31/2025,16.82,18.70,15.82,15.99",
        "02/30/2025,16.82,18.70,15.82,15.99",
        "7/31/2025,16.82,18.70,15.82,15.99",
        "07/31/2025,abc,18.70,15.82,15.99",
        "07/31/2025,16.82,18.70,15.82,",
        "07/31/2025,16.82,18.70,-15.82,15.99",
        "07/31/2025,16.82,1e2,15.82,15.99",
        "07/31/2025,16.82,15.00,15.82,15.99",  # LOW above HIGH
    ],
)
def test_damaged_vix_bad_row(row: str) -> None:
    lines = vix_lines()
    line = line_of(lines, "07/31/2025,")
    lines[line - 1] = row
    rejects_vix(lf(lines), line)


def test_damaged_vix_dates_out_of_order() -> None:
    lines = vix_lines()
    line = line_of(lines, "03/16/2020,")
    swapped = lines.copy()
    swapped[line - 1], swapped[line] = swapped[line], swapped[line - 1]
    assert "after" in rejects_vix(lf(swapped), line + 1)
    repeated = [*lines[:line], lines[line - 1], *lines[line:]]
    rejects_vix(lf(repeated), line + 1)


def test_damaged_vix_truncated_mid_row() -> None:
    lines = vix_lines()
    rejects_vix(lf(lines[:-1]) + lines[-1][:30], len(lines))


@settings(max_examples=100, database=None)
@given(
    closes=st.lists(
        st.decimals(min_value=0, max_value=200, places=4, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=10,
    ),
    start=st.dates(min_value=dt.date(1990, 1, 1), max_value=dt.date(2090, 1, 1)),
)
def test_synthetic_vix_reads_the_last_close(closes: list[Decimal], start: dt.date) -> None:
    days = [start + dt.timedelta(days=offset) for offset in range(len(closes))]
    rows = [
        f"{day:%m/%d/%Y},{close},{close + 1},{close},{close:.6f}"
        for day, close in zip(days, closes, strict=True)
    ]
    reading = parse_vix(lf(["DATE,OPEN,HIGH,LOW,CLOSE", *rows]))
    assert Decimal(repr(reading.value)) == closes[-1]
    assert reading.as_of == dt.datetime(days[-1].year, days[-1].month, days[-1].day, tzinfo=UTC)


# --------------------------------------------------------------------------------------------------
# Alpha Vantage earnings calendar
# --------------------------------------------------------------------------------------------------

EARNINGS_HEADER = "symbol,name,reportDate,fiscalDateEnding,estimate,currency"


def earnings_lines() -> list[str]:
    text = read_text(EARNINGS)
    assert text.endswith("\r\n")
    return text[:-2].split("\r\n")


def rejects_earnings(content: str | bytes, line: int) -> str:
    return rejects(parse_earnings, content, "earnings", line)


def earnings_dates(calendar: EarningsCalendar, ticker: str) -> list[str]:
    return [event.date.isoformat() for event in calendar.events[ticker]]


def test_real_earnings_calendar() -> None:
    calendar = parse_earnings(read_bytes(EARNINGS))
    assert calendar.rows == 38_813
    # Symbols that are not tickers under DESIGN §2.1 (underscores): left out, listed once each.
    assert calendar.skipped == ["CNH_OLD", "COR_OLD", "DOC_OLD1", "SLE_OLD", "TLPH_OLD"]
    assert len(calendar.events) == 12_557  # 12,562 symbols less the 5 skipped
    # 38,813 rows less 8 rows of skipped symbols less 98 repeated (ticker, reportDate) pairs.
    assert sum(len(events) for events in calendar.events.values()) == 38_707
    assert earnings_dates(calendar, "A") == ["2024-08-13", "2024-11-18", "2025-02-25"]
    assert earnings_dates(calendar, "AEO").count("2024-09-04") == 1  # two fiscal periods, one report
    assert "BF.A" in calendar.events  # BF-A
    assert "BF-A" not in calendar.events
    for events in calendar.events.values():
        dates = [event.date for event in events]
        assert dates == sorted(set(dates))
        assert all(event.type == "earnings" and event.risk_factor is None for event in events)
    assert calendar.events["AA"][0] == MarketEvent(
        date=dt.date(2024, 7, 17), type="earnings", risk_factor=None
    )
    everything = [event.date for events in calendar.events.values() for event in events]
    assert (min(everything), max(everything)) == (dt.date(2024, 6, 21), dt.date(2025, 6, 13))


def test_real_earnings_variants_agree() -> None:
    text = read_text(EARNINGS)
    expected = parse_earnings(text)
    assert parse_earnings(text.encode()) == expected
    assert parse_earnings(text.replace("\r\n", "\n")) == expected
    assert parse_earnings(text + "\r\n") == expected


def test_earnings_quoted_names_and_duplicates() -> None:
    content = crlf(
        [
            EARNINGS_HEADER,
            'BRK-B,"Berkshire Hathaway, Inc. ""B""",2024-08-03,2024-06-30,4.1,USD',
            "BRK.B,Berkshire,2024-08-03,2024-03-31,,USD",
            '"X_Y","multi\r\nline",2024-07-01,2024-06-30,-0.5,USD',
            "BRK B,Berkshire,2024-07-01,2024-06-30,,USD",
        ]
    )
    calendar = parse_earnings(content)
    assert calendar == EarningsCalendar(
        events={
            "BRK.B": [
                MarketEvent(date=dt.date(2024, 7, 1), type="earnings", risk_factor=None),
                MarketEvent(date=dt.date(2024, 8, 3), type="earnings", risk_factor=None),
            ]
        },
        rows=4,
        skipped=["X_Y"],
    )
    # The multi-line record spans lines 4-5, so the next record starts on line 6.
    damaged = content.replace("BRK B,Berkshire,2024-07-01", "BRK B,Berkshire,2024-07-32")
    rejects_earnings(damaged, 6)


def test_damaged_earnings_empty_or_header_only() -> None:
    rejects_earnings("", 1)
    rejects_earnings(crlf([EARNINGS_HEADER]), 2)
    rejects_earnings(EARNINGS_HEADER, 2)


@pytest.mark.parametrize(
    "header",
    [
        "symbol,name,reportDate,fiscalDateEnding,estimate",
        "symbol,name,reportDate,fiscalDateEnding,estimate,currency,extra",
        "Symbol,Name,ReportDate,FiscalDateEnding,Estimate,Currency",
        "name,symbol,reportDate,fiscalDateEnding,estimate,currency",
        "A,Agilent Technologies Inc,2024-08-13,2024-07-31,1.27,USD",
    ],
)
def test_damaged_earnings_bad_header(header: str) -> None:
    lines = earnings_lines()
    lines[0] = header
    rejects_earnings(crlf(lines), 1)
    rejects_earnings(crlf(lines[1:]), 1)  # no header at all


@pytest.mark.parametrize(
    "row",
    [
        "AA,Alcoa Corp,2024-07-17,2024-06-30,0.03",  # 5 fields
        "AA,Alcoa Corp,2024-07-17,2024-06-30,0.03,USD,",  # 7 fields
        "AA,Alcoa, Corp,2024-07-17,2024-06-30,0.03,USD",  # an unquoted comma
        "AA,Alcoa Corp,2024-13-17,2024-06-30,0.03,USD",
        "AA,Alcoa Corp,20240717,2024-06-30,0.03,USD",
        "AA,Alcoa Corp,2024-W29-3,2024-06-30,0.03,USD",
        "AA,Alcoa Corp,,2024-06-30,0.03,USD",
        "AA,Alcoa Corp,2024-07-17,2024-06-31,0.03,USD",
        "AA,Alcoa Corp,2024-07-17,2024-06-30,n/a,USD",
        "AA,Alcoa Corp,2024-07-17,2024-06-30,0.03,",
        "AA,Alcoa Corp,2024-07-17,2024-06-30,0.03,usd",
        'AA,"Alcoa Corp,2024-07-17,2024-06-30,0.03,USD',  # an unterminated quote
        "",  # blank line in the middle
    ],
)
def test_damaged_earnings_bad_row(row: str) -> None:
    lines = earnings_lines()
    line = line_of(lines, "AA,")
    assert line == 5
    lines[line - 1] = row
    rejects_earnings(crlf(lines), line)


def test_damaged_earnings_truncated_mid_row() -> None:
    lines = earnings_lines()
    rejects_earnings(crlf(lines[:-1]) + lines[-1][:12], len(lines))


def test_damaged_earnings_nul_byte() -> None:
    lines = earnings_lines()
    assert lines[99].endswith(",CAD")
    lines[99] = lines[99][:-1] + "\x00D"
    rejects_earnings(crlf(lines), 100)
