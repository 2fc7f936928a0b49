"""The request edge (issue 17): non-ASCII tickers, HEAD, Accept q-values, Content-Encoding."""

from __future__ import annotations

from typing import Any

import pytest

from pricer.errors import DataFileError
from pricer.marketdata.loaders import parse_availability
from pricer.tickers import normalize_ticker
from tests.conftest import Engine
from tests.test_loaders import LOADED_AT, synthetic_ibkr

pytestmark = pytest.mark.anyio

QUOTE = "/api/v1/calculate-locate"
BATCH = "/api/v1/calculate-locate/batch"
RATES = "/api/v1/rates"

# Each folds into an ASCII ticker under str.upper(): ß -> SS, ﬀ -> FF, ﬆ -> ST, ı -> I; and a Cyrillic А
# that looks like A. None is a ticker.
FOLDING = ["ß", "ﬀ", "ﬆ", "ı", "А", "aß", "ﬀ.b"]


def quote(**overrides: Any) -> dict[str, Any]:
    return {
        "ticker": "AAPL",
        "position_value": 100000,
        "loan_days": 30,
        "client_id": "demo_client",
        **overrides,
    }


def assert_invalid(response: Any, field: str, location: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER"
    assert body["validation_errors"][0]["field"] == field
    assert body["validation_errors"][0]["location"] == location


@pytest.mark.parametrize("raw", FOLDING)
def test_non_ascii_is_not_a_ticker(raw: str) -> None:
    assert normalize_ticker(raw) is None
    assert normalize_ticker(f" {raw} ") is None


@pytest.mark.parametrize("raw", FOLDING)
async def test_non_ascii_ticker_is_400_on_every_quote_entry(engine: Engine, raw: str) -> None:
    posted = await engine.client.post(QUOTE, json=quote(ticker=raw), headers=engine.as_client())
    assert_invalid(posted, "ticker", "body")
    got = await engine.client.get(QUOTE, params=quote(ticker=raw), headers=engine.as_client())
    assert_invalid(got, "ticker", "query")
    rows = [
        {"ticker": raw, "position_value": 10, "loan_days": 1},
        {"ticker": "AAPL", "position_value": 10, "loan_days": 1},
    ]
    batch = await engine.client.post(
        BATCH, json={"client_id": "demo_client", "positions": rows}, headers=engine.as_client()
    )
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert [q["index"] for q in body["quotes"]] == [1]
    assert [(e["index"], e["error_code"], e["field"]) for e in body["errors"]] == [
        (0, "INVALID_PARAMETER", "ticker")
    ]


@pytest.mark.parametrize("raw", FOLDING)
async def test_non_ascii_ticker_is_400_on_rates(engine: Engine, raw: str) -> None:
    single = await engine.client.get(f"{RATES}/{raw}", headers=engine.as_client())
    assert_invalid(single, "ticker", "path")
    listed = await engine.client.get(RATES, params={"tickers": f"{raw},AAPL"}, headers=engine.as_client())
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [rate["ticker"] for rate in body["rates"]] == ["AAPL"]
    assert [error["error_code"] for error in body["errors"]] == ["INVALID_PARAMETER"]


@pytest.mark.parametrize("raw", FOLDING)
async def test_non_ascii_ticker_is_400_on_admin_paths(engine: Engine, raw: str) -> None:
    stock = await engine.client.put(
        f"/api/v1/admin/stocks/{raw}",
        json={"min_borrow_rate": 0.01, "borrow_status": "EASY"},
        headers=engine.as_admin(),
    )
    assert_invalid(stock, "ticker", "path")
    events = await engine.client.put(
        f"/api/v1/admin/events/{raw}", json={"events": []}, headers=engine.as_admin()
    )
    assert_invalid(events, "ticker", "path")


def test_non_ascii_symbol_in_an_availability_file_is_a_damaged_row() -> None:
    """`ß` is refused like any other non-ticker symbol (`A$B`), not loaded as `SS`."""
    for symbol in ("ß", "ﬆ"):
        with pytest.raises(DataFileError) as caught:
            parse_availability(synthetic_ibkr([f"{symbol}|USD|N|1|X|0|1|1|"]), loaded_at=LOADED_AT)
        assert "line 3" in str(caught.value.args) + str(vars(caught.value)), vars(caught.value)
