"""Admin endpoints (DESIGN §2.2): clients, stocks, volatility, events, market-data uploads, keys; and that
they need the admin scope."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from pricer.settings import DEV_API_KEY_PEPPER
from tests.conftest import Engine, make_settings, started_app
from tests.shared_data import SHARED_DATA

pytestmark = pytest.mark.anyio

CLIENTS = "/api/v1/admin/clients"
STOCKS = "/api/v1/admin/stocks"
KEYS = "/api/v1/admin/keys"
EASTERN = ZoneInfo("America/New_York")
KEY_FORMAT = re.compile(r"bre_([a-z0-9]{8,16})_([A-Za-z0-9]{32,64})")
QUOTE = "/api/v1/calculate-locate"


def text_headers(engine: Engine) -> dict[str, str]:
    return {**engine.as_admin(), "Content-Type": "text/plain"}


def availability_file(rows: list[tuple[str, str, str]], stamp: dt.datetime) -> str:
    local = stamp.astimezone(EASTERN)
    lines = [
        f"#BOF|{local:%Y.%m.%d}|{local:%H:%M:%S}",
        "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|",
    ]
    for number, (symbol, fee, available) in enumerate(rows, 1):
        lines.append(f"{symbol}|USD|TEST {symbol}|{number}|XX{number:010d}|1.0000|{fee}|{available}|")
    lines.append(f"#EOF|{len(rows)}")
    return "\r\n".join(lines) + "\r\n"


async def rate(engine: Engine, ticker: str) -> dict[str, Any]:
    response = await engine.client.get(f"/api/v1/rates/{ticker}", headers=engine.as_admin())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def client_body(**overrides: Any) -> dict[str, Any]:
    return {"markup_percentage": 5.0, "transaction_fee_type": "FLAT", "transaction_amount": 25.0, **overrides}


@contextlib.asynccontextmanager
async def custom_engine(**overrides: str) -> AsyncIterator[Engine]:
    app = await started_app(make_settings(**overrides))
    assert app.demo_keys is not None
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine.test"
    ) as client:
        yield Engine(app=app, client=client, keys=app.demo_keys)


def assert_invalid(response: httpx.Response, field: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body: dict[str, Any] = response.json()
    assert body["error_code"] == "INVALID_PARAMETER"
    assert field in [problem["field"] for problem in body["validation_errors"]], body
    return body


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


# ---- clients ----------------------------------------------------------------------------------------


async def test_put_client_creates_then_replaces_with_the_stored_record() -> None:
    async with custom_engine(RATE_LIMIT_PER_MINUTE="77", RATE_LIMIT_BURST="88") as engine:
        full = client_body(
            markup_percentage=12.3456,
            transaction_fee_type="PERCENTAGE",
            transaction_amount=0.1234,
            day_count=360,
            active=True,
            rate_limit_per_minute=10,
            burst=20,
        )
        created = await engine.client.put(f"{CLIENTS}/new-client_1", json=full, headers=engine.as_admin())
        assert created.status_code == 201, created.text
        record = created.json()
        assert {k: record[k] for k in full} == full
        assert record["client_id"] == "new-client_1"
        assert dt.datetime.fromisoformat(record["updated_at"]) <= dt.datetime.now(dt.UTC)

        # A PUT replaces the record whole: omitted optional fields take their defaults again.
        replaced = await engine.client.put(
            f"{CLIENTS}/new-client_1", json=client_body(), headers=engine.as_admin()
        )
        assert replaced.status_code == 200, replaced.text
        assert replaced.json() == {
            **client_body(),
            "client_id": "new-client_1",
            "day_count": 365,
            "active": True,
            "rate_limit_per_minute": 77,  # RATE_LIMIT_PER_MINUTE
            "burst": 88,  # RATE_LIMIT_BURST
            "updated_at": replaced.json()["updated_at"],
        }
        # The stored schedule is what a quote uses.
        quote = await engine.client.post(
            QUOTE,
            json={"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "new-client_1"},
            headers=engine.as_admin(),
        )
        assert quote.status_code == 200, quote.text
        assert quote.json()["fee_schedule"] == {
            "markup_percentage": 5.0,
            "transaction_fee_type": "FLAT",
            "transaction_amount": 25.0,
            "day_count": 365,
        }
        assert quote.json()["total_fee"] == 50.89


async def test_client_burst_defaults_to_its_own_rate_when_only_the_rate_is_given(engine: Engine) -> None:
    response = await engine.client.put(
        f"{CLIENTS}/limited", json=client_body(rate_limit_per_minute=30), headers=engine.as_admin()
    )
    assert response.status_code == 201, response.text
    assert (response.json()["rate_limit_per_minute"], response.json()["burst"]) == (30, 30)


VALID_CLIENTS = [
    pytest.param(client_body(markup_percentage=0), id="markup-0"),
    pytest.param(client_body(markup_percentage=100), id="markup-100"),
    pytest.param(client_body(markup_percentage=99.9999), id="markup-4dp"),
    pytest.param(client_body(transaction_amount=0), id="flat-0"),
    pytest.param(client_body(transaction_amount=1234567.89), id="flat-2dp"),
    pytest.param(client_body(transaction_fee_type="PERCENTAGE", transaction_amount=100), id="pct-100"),
    pytest.param(client_body(transaction_fee_type="PERCENTAGE", transaction_amount=0.0001), id="pct-4dp"),
    pytest.param(client_body(day_count=360), id="dc-360"),
    pytest.param(client_body(day_count=365), id="dc-365"),
    pytest.param(client_body(day_count=366), id="dc-366"),
]


@pytest.mark.parametrize("body", VALID_CLIENTS)
async def test_valid_client_bodies_are_stored(engine: Engine, body: dict[str, Any]) -> None:
    response = await engine.client.put(f"{CLIENTS}/valid_one", json=body, headers=engine.as_admin())
    assert response.status_code == 201, response.text
    assert {k: response.json()[k] for k in body} == body


INVALID_CLIENTS = [
    pytest.param(client_body(markup_percentage=1.23456), "markup_percentage", id="markup-5dp"),
    pytest.param(client_body(markup_percentage=100.0001), "markup_percentage", id="markup-over-100"),
    pytest.param(client_body(markup_percentage=-1), "markup_percentage", id="markup-negative"),
    pytest.param(client_body(markup_percentage="5"), "markup_percentage", id="markup-string"),
    pytest.param(client_body(transaction_amount=1.555), "transaction_amount", id="flat-3dp"),
    pytest.param(client_body(transaction_amount=-1), "transaction_amount", id="flat-negative"),
    pytest.param(
        client_body(transaction_fee_type="PERCENTAGE", transaction_amount=100.01),
        "transaction_amount",
        id="pct-over-100",
    ),
    pytest.param(
        client_body(transaction_fee_type="PERCENTAGE", transaction_amount=0.12345),
        "transaction_amount",
        id="pct-5dp",
    ),
    pytest.param(client_body(transaction_fee_type="TIERED"), "transaction_fee_type", id="fee-type"),
    pytest.param(client_body(day_count=364), "day_count", id="dc-364"),
    pytest.param(client_body(day_count=0), "day_count", id="dc-0"),
    pytest.param(client_body(day_count="365"), "day_count", id="dc-string"),
    pytest.param(client_body(active="yes"), "active", id="active-string"),
    pytest.param(client_body(rate_limit_per_minute=0), "rate_limit_per_minute", id="limit-0"),
    pytest.param(client_body(burst=True), "burst", id="burst-bool"),
    pytest.param(client_body(nickname="x"), "nickname", id="unknown-field"),
    pytest.param(
        {"markup_percentage": 5.0, "transaction_fee_type": "FLAT"}, "transaction_amount", id="missing"
    ),
]


@pytest.mark.parametrize(("body", "field"), INVALID_CLIENTS)
async def test_invalid_client_bodies_are_400_and_store_nothing(
    engine: Engine, body: dict[str, Any], field: str
) -> None:
    response = await engine.client.put(f"{CLIENTS}/xyz123", json=body, headers=engine.as_admin())
    assert_invalid(response, field)
    # xyz123 keeps its schedule (published vector's FLAT 25 / 5 %).
    quote = await engine.client.post(
        QUOTE,
        json={"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "xyz123"},
        headers=engine.as_admin(),
    )
    assert quote.json()["fee_schedule"]["transaction_amount"] == 25.0
    assert quote.json()["fee_schedule"]["markup_percentage"] == 5.0


@pytest.mark.parametrize("client_id", ["ab", "a" * 51, "bad.id", "bad%20id"])
async def test_client_id_in_the_path_is_checked(engine: Engine, client_id: str) -> None:
    response = await engine.client.put(
        f"{CLIENTS}/{client_id}", json=client_body(), headers=engine.as_admin()
    )
    body = assert_invalid(response, "client_id")
    assert body["validation_errors"][0]["location"] == "path"


async def test_client_body_needs_json(engine: Engine) -> None:
    response = await engine.client.put(
        f"{CLIENTS}/xyz123", content=b"markup=5", headers={**engine.as_admin(), "Content-Type": "text/plain"}
    )
    assert response.status_code == 415, response.text


# ---- stocks -----------------------------------------------------------------------------------------


async def test_put_stock_creates_then_replaces_and_drives_the_rate(engine: Engine) -> None:
    created = await engine.client.put(
        f"{STOCKS}/brk-b",
        json={"min_borrow_rate": 0.12345678, "borrow_status": "HARD"},
        headers=engine.as_admin(),
    )
    assert created.status_code == 201, created.text
    assert created.json()["ticker"] == "BRK.B"
    assert created.json()["min_borrow_rate"] == 0.12345678
    assert created.json()["borrow_status"] == "HARD"
    brk = await rate(engine, "BRK.B")
    assert brk["min_rate"] == 0.12345678
    assert brk["current_rate"] == 0.12345678  # the floor is above base x 1.2
    assert brk["borrow_status"] == "HARD"  # stored status wins over the derived EASY
    assert brk["source"] == "availability_file"

    replaced = await engine.client.put(
        f"{STOCKS}/BRK.B", json={"min_borrow_rate": 0}, headers=engine.as_admin()
    )
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["min_borrow_rate"] == 0.0
    assert replaced.json()["borrow_status"] is None
    brk = await rate(engine, "BRK.B")
    assert brk["min_rate"] == 0.0001
    assert brk["current_rate"] == 0.003
    assert brk["borrow_status"] == "EASY"


async def test_a_stock_record_makes_a_ticker_known(engine: Engine) -> None:
    unknown = await engine.client.get("/api/v1/rates/NEWSTOCK", headers=engine.as_admin())
    assert unknown.status_code == 404
    created = await engine.client.put(
        f"{STOCKS}/newstock", json={"min_borrow_rate": 0.07}, headers=engine.as_admin()
    )
    assert created.status_code == 201, created.text
    body = await rate(engine, "NEWSTOCK")
    assert (body["base_rate"], body["current_rate"], body["is_fallback"]) == (0.07, 0.084, True)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"min_borrow_rate": 0.123456789}, "min_borrow_rate"),
        ({"min_borrow_rate": -0.01}, "min_borrow_rate"),
        ({"min_borrow_rate": "0.01"}, "min_borrow_rate"),
        ({"min_borrow_rate": 0.01, "borrow_status": "IMPOSSIBLE"}, "borrow_status"),
        ({"min_borrow_rate": 0.01, "extra": 1}, "extra"),
    ],
)
async def test_invalid_stock_bodies(engine: Engine, body: dict[str, Any], field: str) -> None:
    response = await engine.client.put(f"{STOCKS}/AAPL", json=body, headers=engine.as_admin())
    assert_invalid(response, field)
    assert (await rate(engine, "AAPL"))["min_rate"] == 0.0025


async def test_stock_body_requires_min_borrow_rate(engine: Engine) -> None:
    response = await engine.client.put(
        f"{STOCKS}/AAPL", json={"borrow_status": "HARD"}, headers=engine.as_admin()
    )
    assert_invalid(response, "min_borrow_rate")
    assert (await rate(engine, "AAPL"))["min_rate"] == 0.0025


async def test_invalid_stock_ticker_in_the_path(engine: Engine) -> None:
    response = await engine.client.put(
        f"{STOCKS}/A.B.C", json={"min_borrow_rate": 0.01}, headers=engine.as_admin()
    )
    assert_invalid(response, "ticker")


# ---- volatility -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "adjustment"), [(0, 0.0), (12.3456, 0.123456), (200, 2.0), (35.5, 0.355)])
async def test_volatility_changes_rates(engine: Engine, value: float, adjustment: float) -> None:
    response = await engine.client.put(
        "/api/v1/admin/volatility", json={"value": value}, headers=engine.as_admin()
    )
    assert response.status_code == 200, response.text
    assert response.json()["value"] == value
    assert response.json()["status"] == "success"
    body = await rate(engine, "MSFT")
    assert body["volatility_index"] == value
    assert body["volatility_adjustment"] == adjustment


@pytest.mark.parametrize("value", [-0.0001, 200.0001, 12.34567, "20", None, True])
async def test_invalid_volatility(engine: Engine, value: Any) -> None:
    response = await engine.client.put(
        "/api/v1/admin/volatility", json={"value": value}, headers=engine.as_admin()
    )
    assert_invalid(response, "value")
    assert (await rate(engine, "MSFT"))["volatility_index"] == 20.0


# ---- events -----------------------------------------------------------------------------------------


async def test_events_replace_the_tickers_events(engine: Engine) -> None:
    assert (await rate(engine, "GME"))["event_risk_factor"] == 6  # demo earnings two days ahead
    tomorrow = (today() + dt.timedelta(days=1)).isoformat()
    later = (today() + dt.timedelta(days=30)).isoformat()
    response = await engine.client.put(
        "/api/v1/admin/events/gme",
        json={
            "events": [
                {"date": later, "type": "split", "risk_factor": 10},
                {"date": tomorrow, "risk_factor": 2},
            ]
        },
        headers=engine.as_admin(),
    )
    assert response.status_code == 200, response.text
    assert response.json()["ticker"] == "GME"
    assert [event["date"] for event in response.json()["events"]] == [tomorrow, later]
    body = await rate(engine, "GME")
    assert body["event_risk_factor"] == 2  # the demo earnings are gone; the split is outside the window
    assert body["event_adjustment"] == 0.01

    earnings = await engine.client.put(
        "/api/v1/admin/events/GME",
        json={"events": [{"date": today().isoformat()}]},
        headers=engine.as_admin(),
    )
    assert earnings.status_code == 200, earnings.text
    assert (await rate(engine, "GME"))["event_risk_factor"] == 8  # earnings today, no own risk

    cleared = await engine.client.put(
        "/api/v1/admin/events/GME", json={"events": []}, headers=engine.as_admin()
    )
    assert cleared.status_code == 200, cleared.text
    body = await rate(engine, "GME")
    assert (body["event_risk_factor"], body["event_adjustment"]) == (0, 0.0)
    assert body["current_rate"] == 0.3646188  # DESIGN §2.1's example: 0.303849 x 1.2


@pytest.mark.parametrize(
    ("offset", "risk"),
    [(-1, 0), (0, 8), (1, 8), (2, 6), (3, 6), (4, 4), (7, 4), (8, 0), (30, 0)],
)
async def test_earnings_risk_follows_the_days_to_the_report(engine: Engine, offset: int, risk: int) -> None:
    """DESIGN §3: earnings without their own risk: 8 (d <= 1), 6 (d <= 3), 4 (d <= 7); window today..+7."""
    day = (today() + dt.timedelta(days=offset)).isoformat()
    response = await engine.client.put(
        "/api/v1/admin/events/MSFT", json={"events": [{"date": day}]}, headers=engine.as_admin()
    )
    assert response.status_code == 200, response.text
    body = await rate(engine, "MSFT")
    assert body["event_risk_factor"] == risk
    assert body["event_adjustment"] == {0: 0.0, 4: 0.02, 6: 0.03, 8: 0.04}[risk]


async def test_the_highest_event_risk_in_the_window_applies(engine: Engine) -> None:
    days = [(today() + dt.timedelta(days=n)).isoformat() for n in (0, 5, 7, 9)]
    events = [
        {"date": days[0], "type": "dividend", "risk_factor": 3},
        {"date": days[1], "type": "vote", "risk_factor": 9},
        {"date": days[2], "type": "earnings"},
        {"date": days[3], "type": "split", "risk_factor": 10},  # outside the 7-day window
    ]
    response = await engine.client.put(
        "/api/v1/admin/events/MSFT", json={"events": events}, headers=engine.as_admin()
    )
    assert response.status_code == 200, response.text
    body = await rate(engine, "MSFT")
    assert body["event_risk_factor"] == 9
    assert body["event_adjustment"] == 0.045


@pytest.mark.parametrize(
    ("events", "field_part"),
    [
        ([{"date": "2026-12-01", "risk_factor": 11}], "risk_factor"),
        ([{"date": "2026-12-01", "risk_factor": -1}], "risk_factor"),
        ([{"date": "2026-13-01"}], "date"),
        ([{"date": "2026-12-01", "colour": "red"}], "colour"),
        ("none", "events"),
    ],
)
async def test_invalid_events(engine: Engine, events: Any, field_part: str) -> None:
    response = await engine.client.put(
        "/api/v1/admin/events/GME", json={"events": events}, headers=engine.as_admin()
    )
    assert response.status_code == 400, response.text
    assert any(field_part in problem["field"] for problem in response.json()["validation_errors"])
    assert (await rate(engine, "GME"))["event_risk_factor"] == 6


# ---- availability files -------------------------------------------------------------------------------


def damaged_files() -> list[Any]:
    now = dt.datetime.now(dt.UTC)
    good = availability_file([("AAA", "1.0000", "100"), ("BBB", "2.0000", "200"), ("CCC", "NA", "NA")], now)
    lines = good.split("\r\n")
    return [
        pytest.param(good.replace("|2.0000|", "|two|"), 4, id="bad-feerate"),
        pytest.param(good.replace("|200|", "|-200|"), 4, id="bad-available"),
        pytest.param(good.replace("#EOF|3", "#EOF|4"), 6, id="eof-count"),
        pytest.param("\r\n".join(lines[:-2]) + "\r\n", 6, id="truncated"),
        pytest.param(good.replace("CCC|USD|", "CCC|US|"), 5, id="bad-currency"),
        pytest.param(
            good.replace("BBB|USD|TEST BBB|2|XX0000000002|1.0000|2.0000|200|", "BBB|USD|x|"),
            4,
            id="short-row",
        ),
        pytest.param(good.replace("#SYM|", "#SYMBOL|"), 2, id="bad-header"),
        pytest.param("garbage\r\n", 1, id="no-bof"),
    ]


@pytest.mark.parametrize(("text", "line"), damaged_files())
async def test_damaged_availability_file_is_400_naming_the_line_and_changes_nothing(
    engine: Engine, text: str, line: int
) -> None:
    before = {ticker: await rate(engine, ticker) for ticker in ("GME", "NVDA")}
    response = await engine.client.post(
        "/api/v1/admin/availability", content=text, headers=text_headers(engine)
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER"
    assert body["details"]["line"] == line
    assert f"line {line}" in body["error"]
    for ticker, previous in before.items():
        assert await rate(engine, ticker) == previous
    unknown = await engine.client.get("/api/v1/rates/AAA", headers=engine.as_admin())
    assert unknown.status_code == 404


async def test_availability_upload_needs_text(engine: Engine) -> None:
    text = availability_file([("AAA", "1.0000", "100")], dt.datetime.now(dt.UTC))
    response = await engine.client.post(
        "/api/v1/admin/availability",
        content=text,
        headers={**engine.as_admin(), "Content-Type": "application/json"},
    )
    assert response.status_code == 415, response.text
    assert (await engine.client.get("/api/v1/rates/AAA", headers=engine.as_admin())).status_code == 404


# ---- VIX and earnings uploads -------------------------------------------------------------------------


async def test_vix_upload_sets_the_volatility_index(engine: Engine) -> None:
    text = (
        "DATE,OPEN,HIGH,LOW,CLOSE\r\n"
        "01/02/2024,13.0,14.0,12.0,13.5\r\n"
        "01/03/2024,14.000000,26.0,13.9,25.500000\r\n"
    )
    response = await engine.client.post(
        "/api/v1/admin/vix-history", content=text, headers=text_headers(engine)
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "success"
    assert response.json()["detail"]["value"] == 25.5
    body = await rate(engine, "GME")
    assert body["volatility_index"] == 25.5
    assert body["volatility_adjustment"] == 0.255


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("DATE,OPEN,HIGH,LOW,CLOSE\n01/02/2024,13,14,12,13.5\n2024-01-03,13,14,12,13.5\n", 3),
        ("DATE,OPEN,HIGH,LOW,CLOSE\n01/02/2024,13,14,12,13.5\n01/03/2024,13,14,12\n", 3),
        ("DATE,OPEN,HIGH,LOW,CLOSE\n01/03/2024,13,14,12,13.5\n01/02/2024,13,14,12,13.5\n", 3),
        ("DATE,OPEN,HIGH,LOW\n01/02/2024,13,14,12\n", 1),
    ],
)
async def test_damaged_vix_file_is_400_naming_the_line(engine: Engine, text: str, line: int) -> None:
    response = await engine.client.post(
        "/api/v1/admin/vix-history", content=text, headers=text_headers(engine)
    )
    assert response.status_code == 400, response.text
    assert response.json()["details"]["line"] == line
    assert (await rate(engine, "GME"))["volatility_index"] == 20.0


async def test_earnings_upload_replaces_those_tickers_events(engine: Engine) -> None:
    header = "symbol,name,reportDate,fiscalDateEnding,estimate,currency"
    rows = [
        f"AAPL,Apple Inc,{today() + dt.timedelta(days=1)},2026-09-30,1.2,USD",
        f"MSFT,Microsoft,{today() + dt.timedelta(days=5)},2026-09-30,,USD",
        f"GME,GameStop,{today() + dt.timedelta(days=60)},2026-09-30,,USD",
    ]
    response = await engine.client.post(
        "/api/v1/admin/earnings-calendar",
        content="\r\n".join([header, *rows]) + "\r\n",
        headers=text_headers(engine),
    )
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == 3
    assert response.json()["detail"]["tickers"] == 3
    assert (await rate(engine, "AAPL"))["event_risk_factor"] == 8  # d <= 1
    assert (await rate(engine, "MSFT"))["event_risk_factor"] == 4  # d <= 7
    assert (await rate(engine, "GME"))["event_risk_factor"] == 0  # replaced; 60 days out
    assert (await rate(engine, "NVDA"))["event_risk_factor"] == 0


async def test_damaged_earnings_file_is_400_naming_the_line(engine: Engine) -> None:
    text = (
        "symbol,name,reportDate,fiscalDateEnding,estimate,currency\n"
        f"AAPL,Apple Inc,{today()},2026-09-30,1.2,USD\n"
        "GME,GameStop,12/04/2024,2024-10-31,,USD\n"
    )
    response = await engine.client.post(
        "/api/v1/admin/earnings-calendar", content=text, headers=text_headers(engine)
    )
    assert response.status_code == 400, response.text
    assert response.json()["details"]["line"] == 3
    assert (await rate(engine, "AAPL"))["event_risk_factor"] == 0
    assert (await rate(engine, "GME"))["event_risk_factor"] == 6


def real_file(name: str) -> bytes:
    return (SHARED_DATA / name).read_bytes()


def earnings_rows() -> int:
    with (SHARED_DATA / "alphavantage_earnings_calendar_2024-06-21.csv").open(newline="") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1


async def test_an_older_vix_close_does_not_override_a_newer_reading(engine: Engine) -> None:
    put = await engine.client.put("/api/v1/admin/volatility", json={"value": 30}, headers=engine.as_admin())
    assert put.status_code == 200
    text = "DATE,OPEN,HIGH,LOW,CLOSE\n01/02/2024,13,14,12,13.5\n"
    response = await engine.client.post(
        "/api/v1/admin/vix-history", content=text, headers=text_headers(engine)
    )
    assert response.status_code == 200, response.text
    assert (await rate(engine, "GME"))["volatility_index"] == 30.0  # the admin's reading is as of now


async def test_real_vix_history_upload(engine: Engine) -> None:
    content = real_file("VIX_History.csv")
    last = content.decode().strip().splitlines()[-1].split(",")
    response = await engine.client.post(
        "/api/v1/admin/vix-history", content=content, headers=text_headers(engine)
    )
    assert response.status_code == 200, response.text
    close = float(last[4])
    assert response.json()["detail"]["value"] == close
    body = await rate(engine, "AAPL")
    assert body["volatility_index"] == close
    # An admin PUT afterwards is newer (as of now) and takes over.
    put = await engine.client.put("/api/v1/admin/volatility", json={"value": 30}, headers=engine.as_admin())
    assert put.status_code == 200
    assert (await rate(engine, "AAPL"))["volatility_index"] == 30.0


async def test_real_earnings_calendar_upload(engine: Engine) -> None:
    content = real_file("alphavantage_earnings_calendar_2024-06-21.csv")
    response = await engine.client.post(
        "/api/v1/admin/earnings-calendar", content=content, headers=text_headers(engine)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rows"] == earnings_rows()
    assert body["detail"]["tickers"] > 10_000
    # GME's calendar dates (2024-2025) replace the demo event two days ahead.
    assert (await rate(engine, "GME"))["event_risk_factor"] == 0


async def test_real_availability_files_upload(engine: Engine) -> None:
    """The demo snapshot is stamped before the real files, so a loaded real file takes over."""
    latest = await engine.client.post(
        "/api/v1/admin/availability",
        content=real_file("ibkr_usa_2022-08-06.txt"),
        headers=text_headers(engine),
    )
    assert latest.status_code == 200, latest.text
    assert latest.json()["rows"] == 17461
    assert latest.json()["as_of"].startswith("2022-08-07T02:30:03")  # 22:30:03 EDT
    assert latest.json()["in_force"] is True
    aa = await rate(engine, "AA")
    assert (aa["source"], aa["available_shares"], aa["base_rate"]) == (
        "availability_file",
        4_000_000,
        0.002664,
    )
    assert (await engine.client.get("/api/v1/rates/XYZQ", headers=engine.as_admin())).status_code == 404

    older = await engine.client.post(
        "/api/v1/admin/availability",
        content=real_file("ibkr_usa_2021-06-11.txt"),
        headers=text_headers(engine),
    )
    assert older.status_code == 200, older.text
    assert older.json()["in_force"] is False  # 2021 is older than the file in force
    assert await rate(engine, "AA") == aa


@pytest.mark.parametrize(
    ("path", "body", "fields"),
    [
        (
            f"{CLIENTS}/xyz123",
            client_body(markup_percentage=1.23456),
            {
                "markup_percentage", "transaction_fee_type", "transaction_amount", "day_count", "active",
                "rate_limit_per_minute", "burst",
            },
        ),
        (
            f"{CLIENTS}/xyz123",
            client_body(transaction_fee_type="PERCENTAGE", transaction_amount=101),
            {
                "markup_percentage", "transaction_fee_type", "transaction_amount", "day_count", "active",
                "rate_limit_per_minute", "burst",
            },
        ),
        (f"{STOCKS}/AAPL", {"min_borrow_rate": 0.123456789}, {"min_borrow_rate", "borrow_status"}),
        ("/api/v1/admin/volatility", {"value": 1.23456}, {"value"}),
    ],
)  # fmt: skip
async def test_admin_validation_errors_list_the_valid_params(
    engine: Engine, path: str, body: dict[str, Any], fields: set[str]
) -> None:
    response = await engine.client.put(path, json=body, headers=engine.as_admin())
    assert response.status_code == 400, response.text
    assert set(response.json()["valid_params"]) == fields


# ---- keys ---------------------------------------------------------------------------------------------


async def test_issue_key_shows_it_once_and_it_works(engine: Engine) -> None:
    before = dt.datetime.now(dt.UTC)
    response = await engine.client.post(KEYS, json={"client_id": "xyz123"}, headers=engine.as_admin())
    assert response.status_code == 201, response.text
    body = response.json()
    match = KEY_FORMAT.fullmatch(body["api_key"])
    assert match is not None, body["api_key"]
    assert match.group(1) == body["key_id"]
    assert body["client_id"] == "xyz123"
    assert sorted(body["scopes"]) == ["quote", "rates"]
    expires = dt.datetime.fromisoformat(body["expires_at"])
    assert before + dt.timedelta(days=90) <= expires <= dt.datetime.now(dt.UTC) + dt.timedelta(days=90)
    # Only an HMAC of the secret is stored.
    record = await engine.app.stores.keys.get(body["key_id"])
    assert record is not None
    secret = match.group(2)
    assert (
        record.secret_hash == hmac.new(DEV_API_KEY_PEPPER.encode(), secret.encode(), hashlib.sha256).digest()
    )
    assert secret not in repr(record)
    # The key works for its client.
    quote = await engine.client.post(
        QUOTE,
        json={"ticker": "AAPL", "position_value": 100, "loan_days": 1, "client_id": "xyz123"},
        headers={"X-API-Key": body["api_key"]},
    )
    assert quote.status_code == 200, quote.text
    # Each issue makes a new key.
    again = await engine.client.post(KEYS, json={"client_id": "xyz123"}, headers=engine.as_admin())
    assert again.json()["key_id"] != body["key_id"]


async def test_issue_key_with_scopes_and_expiry(engine: Engine) -> None:
    response = await engine.client.post(
        KEYS,
        json={"client_id": "pct_client", "scopes": ["rates"], "expires_in_days": 1},
        headers=engine.as_admin(),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["scopes"] == ["rates"]
    expires = dt.datetime.fromisoformat(body["expires_at"])
    assert abs(expires - (dt.datetime.now(dt.UTC) + dt.timedelta(days=1))) < dt.timedelta(minutes=1)
    key = {"X-API-Key": body["api_key"]}
    quote = await engine.client.post(
        QUOTE,
        json={"ticker": "AAPL", "position_value": 100, "loan_days": 1, "client_id": "pct_client"},
        headers=key,
    )
    assert quote.status_code == 403, quote.text
    assert quote.json()["error_code"] == "FORBIDDEN"
    batch = await engine.client.post(
        f"{QUOTE}/batch",
        json={
            "client_id": "pct_client",
            "positions": [{"ticker": "AAPL", "position_value": 1, "loan_days": 1}],
        },
        headers=key,
    )
    assert batch.status_code == 403, batch.text
    rates = await engine.client.get("/api/v1/rates/AAPL", headers=key)
    assert rates.status_code == 200, rates.text


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"client_id": "no_such_client"}, 404, None),
        ({"client_id": "xyz123", "scopes": ["superuser"]}, 400, "scopes"),
        ({"client_id": "xyz123", "scopes": []}, 400, "scopes"),
        ({"client_id": "xyz123", "expires_in_days": 0}, 400, "expires_in_days"),
        ({"client_id": "x y"}, 400, "client_id"),
        ({}, 400, "client_id"),
    ],
)
async def test_issue_key_rejections(
    engine: Engine, body: dict[str, Any], status: int, field: str | None
) -> None:
    response = await engine.client.post(KEYS, json=body, headers=engine.as_admin())
    assert response.status_code == status, response.text
    if field is None:
        assert response.json()["error_code"] == "CLIENT_NOT_FOUND"
    else:
        assert any(problem["field"].startswith(field) for problem in response.json()["validation_errors"])


async def test_revoke_key(engine: Engine) -> None:
    issued = (await engine.client.post(KEYS, json={"client_id": "xyz123"}, headers=engine.as_admin())).json()
    key = {"X-API-Key": issued["api_key"]}
    assert (await engine.client.get("/api/v1/rates/AAPL", headers=key)).status_code == 200
    revoked = await engine.client.delete(f"{KEYS}/{issued['key_id']}", headers=engine.as_admin())
    assert revoked.status_code == 204, revoked.text
    assert revoked.content == b""
    after = await engine.client.get("/api/v1/rates/AAPL", headers=key)
    assert after.status_code == 401, after.text
    assert after.json()["error_code"] == "UNAUTHORIZED"
    for unknown in ("zzzzzzzzzzzz", "nokey", "UPPERCASEID12"):
        missing = await engine.client.delete(f"{KEYS}/{unknown}", headers=engine.as_admin())
        assert missing.status_code == 404, (unknown, missing.text)
        assert missing.json()["error_code"] == "NOT_FOUND"
    # Other keys are untouched.
    assert (await engine.client.get("/api/v1/rates/AAPL", headers=engine.as_client())).status_code == 200


# ---- the admin scope ------------------------------------------------------------------------------------

ADMIN_CALLS = [
    ("PUT", f"{CLIENTS}/xyz123", {"json": client_body()}),
    ("PUT", f"{STOCKS}/AAPL", {"json": {"min_borrow_rate": 0.5}}),
    ("POST", "/api/v1/admin/availability", {"content": "x", "headers": {"Content-Type": "text/plain"}}),
    ("POST", "/api/v1/admin/vix-history", {"content": "x", "headers": {"Content-Type": "text/plain"}}),
    ("POST", "/api/v1/admin/earnings-calendar", {"content": "x", "headers": {"Content-Type": "text/plain"}}),
    ("PUT", "/api/v1/admin/volatility", {"json": {"value": 50}}),
    ("PUT", "/api/v1/admin/events/GME", {"json": {"events": []}}),
    ("POST", KEYS, {"json": {"client_id": "demo_client", "scopes": ["admin"]}}),
    ("DELETE", f"{KEYS}/abcdefgh1234", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), ADMIN_CALLS)
async def test_admin_routes_refuse_non_admin_keys(
    engine: Engine, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    headers = {**kwargs.get("headers", {})}
    rest = {k: v for k, v in kwargs.items() if k != "headers"}
    for key in (engine.keys.client_key, None):
        sent = {**headers, "X-API-Key": key} if key else headers
        response = await engine.client.request(method, path, headers=sent, **rest)
        assert response.status_code == (403 if key else 401), (method, path, response.text)
        assert response.json()["error_code"] == ("FORBIDDEN" if key else "UNAUTHORIZED")
    # Nothing changed.
    body = await rate(engine, "GME")
    assert (body["volatility_index"], body["event_risk_factor"]) == (20.0, 6)
    assert (await rate(engine, "AAPL"))["min_rate"] == 0.0025


async def test_audit_and_quote_scopes_are_not_admin(engine: Engine) -> None:
    issued = await engine.client.post(
        KEYS, json={"client_id": "admin", "scopes": ["quote", "rates", "audit"]}, headers=engine.as_admin()
    )
    assert issued.status_code == 201
    key = {"X-API-Key": issued.json()["api_key"]}
    response = await engine.client.put("/api/v1/admin/volatility", json={"value": 1}, headers=key)
    assert response.status_code == 403, response.text
