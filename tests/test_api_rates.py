"""Borrow rates through the HTTP API (DESIGN §2.1 "Rate", §3): components, fallbacks, the list endpoint, and
availability files taking over (newest in force)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.conftest import Engine, make_settings, started_app

pytestmark = pytest.mark.anyio

RATES = "/api/v1/rates"
EASTERN = ZoneInfo("America/New_York")
RATE_FIELDS = {
    "status", "ticker", "current_rate", "base_rate", "volatility_index", "volatility_adjustment",
    "event_risk_factor", "event_adjustment", "min_rate", "borrow_status", "available_shares", "source",
    "is_fallback", "last_updated",
}  # fmt: skip


def dec(value: Any) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def expected_rate(body: Mapping[str, Any]) -> Decimal:
    base = dec(body["base_rate"])
    vol_adj = Decimal("0.01") * max(Decimal(0), dec(body["volatility_index"]))
    event_adj = Decimal(body["event_risk_factor"]) / 10 * Decimal("0.05")
    assert dec(body["volatility_adjustment"]) == vol_adj
    assert dec(body["event_adjustment"]) == event_adj
    adjusted = max(base * (1 + vol_adj) * (1 + event_adj), dec(body["min_rate"]))
    return min(adjusted.quantize(Decimal("1e-8"), rounding=ROUND_HALF_UP), Decimal(10))


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


@contextlib.asynccontextmanager
async def custom_engine(**overrides: str) -> AsyncIterator[Engine]:
    app = await started_app(make_settings(**overrides))
    assert app.demo_keys is not None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
        yield Engine(app=app, client=client, keys=app.demo_keys)


async def upload(engine: Engine, text: str) -> dict[str, Any]:
    response = await engine.client.post(
        "/api/v1/admin/availability",
        content=text,
        headers={**engine.as_admin(), "Content-Type": "text/plain"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def rate_of(engine: Engine, ticker: str) -> httpx.Response:
    return await engine.client.get(f"{RATES}/{ticker}", headers=engine.as_client())


async def ok_rate(engine: Engine, ticker: str) -> dict[str, Any]:
    response = await rate_of(engine, ticker)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == RATE_FIELDS
    assert body["status"] == "success"
    assert dec(body["current_rate"]) == expected_rate(body)
    return body


async def test_gme_components_with_an_earnings_event_two_days_ahead(engine: Engine) -> None:
    body = await ok_rate(engine, "GME")
    assert body["ticker"] == "GME"
    assert body["base_rate"] == 0.303849
    assert body["volatility_index"] == 20.0
    assert body["volatility_adjustment"] == 0.2
    assert body["event_risk_factor"] == 6
    assert body["event_adjustment"] == 0.03
    expected = (Decimal("0.303849") * Decimal("1.2") * Decimal("1.03")).quantize(
        Decimal("1e-8"), rounding=ROUND_HALF_UP
    )
    assert expected == Decimal("0.37555736")
    assert body["current_rate"] == 0.37555736
    assert body["min_rate"] == 0.0001
    assert body["borrow_status"] == "HARD"
    assert body["available_shares"] == 250000
    assert body["source"] == "availability_file"
    assert body["is_fallback"] is False
    assert body["last_updated"].endswith("Z")


async def test_file_rate_with_a_stock_minimum_and_status(engine: Engine) -> None:
    body = await ok_rate(engine, "AAPL")
    assert body["base_rate"] == 0.0025
    assert body["min_rate"] == 0.0025  # the stock's minimum is above MIN_BORROW_RATE
    assert body["current_rate"] == 0.003
    assert body["borrow_status"] == "EASY"
    assert body["available_shares"] == 10_000_000  # ">10000000"
    assert body["source"] == "availability_file"
    assert body["is_fallback"] is False


@pytest.mark.parametrize(
    ("ticker", "status"),
    [("MSFT", "EASY"), ("NVDA", "EASY"), ("SPCE", "HARD"), ("AMC", "HARD"), ("BYND", "HARD")],
)
async def test_status_follows_the_base_without_a_stored_status(
    engine: Engine, ticker: str, status: str
) -> None:
    body = await ok_rate(engine, ticker)
    assert body["borrow_status"] == status
    assert body["is_fallback"] is False


async def test_fallback_for_a_file_row_without_a_fee_rate(engine: Engine) -> None:
    body = await ok_rate(engine, "XYZQ")
    assert body["source"] == "fallback"
    assert body["is_fallback"] is True
    assert body["min_rate"] == 0.0001
    assert body["base_rate"] == 0.0001  # the floor is the base ...
    assert body["current_rate"] == 0.00012  # ... adjusted like any other (V = 20 -> x 1.2)
    assert body["available_shares"] is None  # NA
    assert body["borrow_status"] == "EASY"


async def test_fallback_for_a_stock_without_a_file_row(engine: Engine) -> None:
    body = await ok_rate(engine, "ACME")
    assert body["source"] == "fallback"
    assert body["is_fallback"] is True
    assert body["min_rate"] == 0.02
    assert body["base_rate"] == 0.02
    assert body["current_rate"] == 0.024
    assert body["available_shares"] is None  # no file row
    assert body["borrow_status"] == "MEDIUM"


@pytest.mark.parametrize("spelling", ["BRK.B", "brk-b", "BRK%20B", "brk.b"])
async def test_rate_ticker_is_normalised(engine: Engine, spelling: str) -> None:
    body = await ok_rate(engine, spelling)
    assert body["ticker"] == "BRK.B"
    assert body["base_rate"] == 0.0025


async def test_unknown_and_invalid_tickers(engine: Engine) -> None:
    unknown = await rate_of(engine, "ZZZZ")
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error_code"] == "TICKER_NOT_FOUND"
    assert unknown.json()["details"] == {"ticker": "ZZZZ"}
    ten = await rate_of(engine, "ABCDE.FGHI")  # 10 characters, separator included: a ticker, unknown
    assert ten.status_code == 404, ten.text
    for bad in ("A.B.C", "ABCDEFGHIJK", "ABCDEF.GHIJ", "AB$", "BRK..B", "-AB"):
        response = await rate_of(engine, bad)
        assert response.status_code == 400, (bad, response.text)
        body = response.json()
        assert body["error_code"] == "INVALID_PARAMETER"
        assert body["validation_errors"][0]["field"] == "ticker"
        assert body["validation_errors"][0]["location"] == "path"


async def test_list_endpoint_gives_the_same_rates_and_lists_errors(engine: Engine) -> None:
    response = await engine.client.get(
        RATES, params={"tickers": "GME,aapl,ZZZZ,A.B.C,brk b,ACME,XYZQ"}, headers=engine.as_client()
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success"
    assert [rate["ticker"] for rate in body["rates"]] == ["GME", "AAPL", "BRK.B", "ACME", "XYZQ"]
    for rate in body["rates"]:
        single = await ok_rate(engine, rate["ticker"])
        assert {k: v for k, v in rate.items() if k != "last_updated"} == {
            k: v for k, v in single.items() if k != "last_updated"
        }
        if not rate["is_fallback"]:
            assert rate["last_updated"] == single["last_updated"]
    errors = {error["ticker"]: error["error_code"] for error in body["errors"]}
    assert errors == {"ZZZZ": "TICKER_NOT_FOUND", "A.B.C": "INVALID_PARAMETER"}
    assert all(error["error"] for error in body["errors"])


async def test_list_endpoint_limits_and_parameters(engine: Engine) -> None:
    thousand = ",".join(f"T{number:04d}" for number in range(1000))
    at_limit = await engine.client.get(RATES, params={"tickers": thousand}, headers=engine.as_client())
    assert at_limit.status_code == 200, at_limit.text
    assert at_limit.json()["rates"] == []
    assert len(at_limit.json()["errors"]) == 1000
    over = await engine.client.get(RATES, params={"tickers": thousand + ",AAPL"}, headers=engine.as_client())
    assert over.status_code == 400, over.text
    assert over.json()["error_code"] == "INVALID_PARAMETER"
    assert over.json()["validation_errors"][0]["field"] == "tickers"
    for params in ({}, {"tickers": ""}, {"tickers": " , "}):
        missing = await engine.client.get(RATES, params=params, headers=engine.as_client())
        assert missing.status_code == 400, (params, missing.text)
        assert missing.json()["validation_errors"][0]["field"] == "tickers"
    unknown_param = await engine.client.get(
        RATES, params={"tickers": "AAPL", "ticker": "GME"}, headers=engine.as_client()
    )
    assert unknown_param.status_code == 400
    assert unknown_param.json()["validation_errors"][0]["field"] == "ticker"


async def test_a_newer_availability_file_replaces_the_snapshot(engine: Engine) -> None:
    before = await ok_rate(engine, "GME")
    result = await upload(
        engine,
        availability_file(
            [("GME", "50.0000", "1234"), ("NEWCO", "1.5000", ">10000000"), ("AAPL", "NA", "NA")],
            dt.datetime.now(dt.UTC),
        ),
    )
    assert result["status"] == "success"
    assert result["rows"] == 3
    assert result["in_force"] is True
    gme = await ok_rate(engine, "GME")
    assert gme["base_rate"] == 0.5
    assert gme["available_shares"] == 1234
    assert gme["current_rate"] == 0.618  # 0.5 x 1.2 x 1.03
    assert gme["current_rate"] != before["current_rate"]
    assert gme["last_updated"] != before["last_updated"]
    assert dt.datetime.fromisoformat(gme["last_updated"]) == dt.datetime.fromisoformat(result["as_of"])
    newco = await ok_rate(engine, "NEWCO")
    assert (newco["base_rate"], newco["borrow_status"], newco["available_shares"]) == (
        0.015,
        "MEDIUM",
        10_000_000,
    )
    # The file replaces the snapshot whole: NVDA (only in the old file) is gone.
    gone = await rate_of(engine, "NVDA")
    assert gone.status_code == 404
    # AAPL keeps its stock record; with NA in the file it falls back to its minimum.
    aapl = await ok_rate(engine, "AAPL")
    assert (aapl["source"], aapl["is_fallback"], aapl["base_rate"]) == ("fallback", True, 0.0025)
    assert aapl["available_shares"] is None


async def test_an_older_availability_file_changes_nothing(engine: Engine) -> None:
    newer = availability_file(
        [("GME", "30.3849", "250000"), ("NVDA", "0.3000", "8500000"), ("BRK B", "0.2500", ">10000000")],
        dt.datetime.now(dt.UTC),
    )
    assert (await upload(engine, newer))["in_force"] is True
    before = {ticker: await ok_rate(engine, ticker) for ticker in ("GME", "NVDA", "BRK.B")}
    result = await upload(
        engine, availability_file([("GME", "99.0000", "5")], dt.datetime(2020, 1, 2, 20, 0, tzinfo=dt.UTC))
    )
    assert result["in_force"] is False
    assert result["rows"] == 1
    assert result["as_of"].startswith("2020-01-02T20:00:00")
    for ticker, rate in before.items():
        assert await ok_rate(engine, ticker) == rate


async def test_rates_need_the_rates_scope(engine: Engine) -> None:
    issued = await engine.client.post(
        "/api/v1/admin/keys", json={"client_id": "xyz123", "scopes": ["quote"]}, headers=engine.as_admin()
    )
    assert issued.status_code == 201, issued.text
    key = {"X-API-Key": issued.json()["api_key"]}
    for path in (f"{RATES}/AAPL", f"{RATES}?tickers=AAPL"):
        response = await engine.client.get(path, headers=key)
        assert response.status_code == 403, response.text
        assert response.json()["error_code"] == "FORBIDDEN"
        admin = await engine.client.get(path, headers=engine.as_admin())  # admin implies every scope
        assert admin.status_code == 200, admin.text
        missing = await engine.client.get(path)
        assert missing.status_code == 401


async def test_rates_are_capped_at_max_borrow_rate(engine: Engine) -> None:
    await upload(
        engine,
        availability_file([("WILD", "900.0000", "10"), ("TAME", "1.0000", "10")], dt.datetime.now(dt.UTC)),
    )
    put = await engine.client.put("/api/v1/admin/volatility", json={"value": 200}, headers=engine.as_admin())
    assert put.status_code == 200
    wild = await ok_rate(engine, "WILD")
    assert wild["base_rate"] == 9.0
    assert wild["volatility_adjustment"] == 2.0
    assert wild["current_rate"] == 10.0  # 9 x 3 = 27, capped at MAX_BORROW_RATE
    tame = await ok_rate(engine, "TAME")
    assert tame["current_rate"] == 0.03
    stock = await engine.client.put(
        "/api/v1/admin/stocks/TAME", json={"min_borrow_rate": 10}, headers=engine.as_admin()
    )
    assert stock.status_code == 201, stock.text
    floored = await ok_rate(engine, "TAME")
    assert (floored["min_rate"], floored["current_rate"]) == (10.0, 10.0)


async def test_rate_factors_follow_the_settings() -> None:
    async with custom_engine(
        DEFAULT_VOLATILITY_INDEX="30",
        VOLATILITY_THRESHOLD="10",
        VOLATILITY_FACTOR="0.02",
        EVENT_RISK_FACTOR="0.1",
        MIN_BORROW_RATE="0.001",
        MAX_BORROW_RATE="0.35",
    ) as engine:
        gme = (await rate_of(engine, "GME")).json()
        assert gme["volatility_index"] == 30.0
        assert gme["volatility_adjustment"] == 0.4  # 0.02 x (30 - 10)
        assert gme["event_adjustment"] == 0.06  # 6 / 10 x 0.1
        assert gme["current_rate"] == 0.35  # 0.303849 x 1.4 x 1.06 = 0.4509..., capped
        msft = (await rate_of(engine, "MSFT")).json()
        assert msft["current_rate"] == 0.0035  # 0.0025 x 1.4
        xyzq = (await rate_of(engine, "XYZQ")).json()
        assert (xyzq["min_rate"], xyzq["base_rate"], xyzq["current_rate"]) == (0.001, 0.001, 0.0014)
    async with custom_engine(EVENT_WINDOW_DAYS="1") as engine:
        gme = (await rate_of(engine, "GME")).json()
        assert gme["event_risk_factor"] == 0  # the earnings two days ahead are outside a 1-day window
