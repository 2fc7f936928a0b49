"""Locate-fee quotes through the HTTP API (DESIGN §2.1, §2.3, §3): single (POST and GET), batch, read-back.

Every figure a response carries is checked against an exact `Decimal` evaluation of the DESIGN formulas on
the values the response itself states (its position, days, fee schedule and rate components).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
from collections.abc import AsyncIterator, Mapping
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import msgspec
import pytest

from tests.conftest import Engine, make_settings, started_app

pytestmark = pytest.mark.anyio

QUOTE = "/api/v1/calculate-locate"
BATCH = "/api/v1/calculate-locate/batch"
QUOTE_FIELDS = {"ticker", "position_value", "loan_days", "client_id"}
CENT = Decimal("0.01")
RATE_QUANTUM = Decimal("1e-8")
EASTERN = ZoneInfo("America/New_York")
DEMO_TICKERS = ["AAPL", "MSFT", "NVDA", "TSLA", "GME", "AMC", "SPCE", "BYND", "BRK.B", "XYZQ", "ACME"]


# ---- helpers ---------------------------------------------------------------------------------------


def dec(value: Any) -> Decimal:
    """The decimal a JSON number stands for (floats by their shortest repr, as DESIGN §2 says)."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def half_up(value: Decimal, quantum: Decimal) -> Decimal:
    return value.quantize(quantum, rounding=ROUND_HALF_UP)


def expected_rate(components: Mapping[str, Any]) -> Decimal:
    """DESIGN §3's rate from the components a response states (default factors)."""
    base = dec(components["base_rate"])
    vol_adj = Decimal("0.01") * max(Decimal(0), dec(components["volatility_index"]))
    event_adj = Decimal(components["event_risk_factor"]) / 10 * Decimal("0.05")
    assert dec(components["volatility_adjustment"]) == vol_adj
    assert dec(components["event_adjustment"]) == event_adj
    adjusted = base * (1 + vol_adj) * (1 + event_adj)
    return min(half_up(max(adjusted, dec(components["min_rate"])), RATE_QUANTUM), Decimal(10))


def expected_fees(position: Any, rate: Any, days: int, schedule: Mapping[str, Any]) -> dict[str, Decimal]:
    """DESIGN §3's locate fee, exactly in Decimal, ties half up."""
    p, r = dec(position), dec(rate)
    with localcontext() as context:
        context.prec = 80
        borrow_cost = half_up(p * r * days / schedule["day_count"], CENT)
        markup = half_up(borrow_cost * dec(schedule["markup_percentage"]) / 100, CENT)
        amount = dec(schedule["transaction_amount"])
        flat = schedule["transaction_fee_type"] == "FLAT"
        fees = amount if flat else half_up(p * amount / 100, CENT)
    return {
        "borrow_cost": borrow_cost,
        "markup": markup,
        "transaction_fees": fees,
        "total_fee": borrow_cost + markup + fees,
    }


def assert_quote_reproducible(body: Mapping[str, Any]) -> None:
    """Every figure of a single-quote response follows from the response itself."""
    assert dec(body["borrow_rate_used"]) == expected_rate(body["rate"])
    want = expected_fees(
        body["position_value"], body["borrow_rate_used"], body["loan_days"], body["fee_schedule"]
    )
    breakdown = body["breakdown"]
    assert dec(breakdown["borrow_cost"]) == want["borrow_cost"]
    assert dec(breakdown["markup"]) == want["markup"]
    assert dec(breakdown["transaction_fees"]) == want["transaction_fees"]
    assert dec(body["total_fee"]) == want["total_fee"]
    for money in (body["total_fee"], body["position_value"], *breakdown.values()):
        assert dec(money) == dec(money).quantize(CENT), money


def quote_body(**overrides: Any) -> dict[str, Any]:
    return {
        "ticker": "AAPL",
        "position_value": 100000,
        "loan_days": 30,
        "client_id": "demo_client",
        **overrides,
    }


def without(body: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in body.items() if name not in names}


def availability_file(rows: list[tuple[str, str, str]], stamp: dt.datetime) -> str:
    """A small IBKR-format file (CRLF, #BOF in US Eastern time, #EOF count)."""
    local = stamp.astimezone(EASTERN)
    lines = [
        f"#BOF|{local:%Y.%m.%d}|{local:%H:%M:%S}",
        "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|",
    ]
    for number, (symbol, fee, available) in enumerate(rows, 1):
        lines.append(f"{symbol}|USD|TEST {symbol}|{number}|XX{number:010d}|1.0000|{fee}|{available}|")
    lines.append(f"#EOF|{len(rows)}")
    return "\r\n".join(lines) + "\r\n"


async def admin_ok(engine: Engine, method: str, path: str, **kwargs: Any) -> httpx.Response:
    response = await engine.client.request(method, path, headers=engine.as_admin(), **kwargs)
    assert response.status_code in (200, 201), response.text
    return response


async def issue_key(engine: Engine, client_id: str, scopes: list[str] | None = None) -> str:
    body: dict[str, Any] = {"client_id": client_id}
    if scopes is not None:
        body["scopes"] = scopes
    response = await admin_ok(engine, "POST", "/api/v1/admin/keys", json=body)
    return str(response.json()["api_key"])


async def set_volatility(engine: Engine, value: float) -> None:
    await admin_ok(engine, "PUT", "/api/v1/admin/volatility", json={"value": value})


@contextlib.asynccontextmanager
async def custom_engine(**overrides: str) -> AsyncIterator[Engine]:
    app = await started_app(make_settings(**overrides))
    assert app.demo_keys is not None
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine.test"
    ) as client:
        yield Engine(app=app, client=client, keys=app.demo_keys)


def assert_invalid(response: httpx.Response, field: str, location: str = "body") -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body: dict[str, Any] = response.json()
    assert body["error_code"] == "INVALID_PARAMETER"
    fields = [problem["field"] for problem in body["validation_errors"]]
    assert field in fields, body
    assert all(problem["location"] == location for problem in body["validation_errors"]), body
    assert field in body["error"], body
    return body


# ---- the published vector -------------------------------------------------------------------------

PUBLISHED_BREAKDOWN = {"borrow_cost": 410.96, "markup": 20.55, "transaction_fees": 25.0}
PUBLISHED_SCHEDULE = {
    "markup_percentage": 5.0,
    "transaction_fee_type": "FLAT",
    "transaction_amount": 25.0,
    "day_count": 365,
}


async def test_published_vector_with_a_stock_record_base(engine: Engine) -> None:
    created = await engine.client.put(
        "/api/v1/admin/stocks/VECT", json={"min_borrow_rate": 0.05}, headers=engine.as_admin()
    )
    assert created.status_code == 201, created.text
    await set_volatility(engine, 0)
    key = await issue_key(engine, "xyz123")

    response = await engine.client.post(
        QUOTE, json=quote_body(ticker="VECT", client_id="xyz123"), headers={"X-API-Key": key}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success"
    assert body["ticker"] == "VECT"
    assert body["client_id"] == "xyz123"
    assert body["position_value"] == 100000.0
    assert body["loan_days"] == 30
    assert body["fee_schedule"] == PUBLISHED_SCHEDULE
    assert body["breakdown"] == PUBLISHED_BREAKDOWN
    assert body["total_fee"] == 456.51
    assert body["borrow_rate_used"] == 0.05
    rate = body["rate"]
    assert rate["base_rate"] == 0.05
    assert rate["volatility_index"] == 0.0
    assert rate["volatility_adjustment"] == 0.0
    assert rate["event_risk_factor"] == 0
    assert rate["event_adjustment"] == 0.0
    assert rate["min_rate"] == 0.05
    assert rate["source"] == "fallback"
    assert rate["is_fallback"] is True
    assert isinstance(body["quote_id"], str)
    assert body["quote_id"]
    assert body["calculated_at"].endswith("Z")
    assert_quote_reproducible(body)


async def test_published_vector_with_an_availability_file_base(engine: Engine) -> None:
    upload = await engine.client.post(
        "/api/v1/admin/availability",
        content=availability_file([("VECT", "5.0000", "1000")], dt.datetime.now(dt.UTC)),
        headers={**engine.as_admin(), "Content-Type": "text/plain"},
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["rows"] == 1
    await set_volatility(engine, 0)

    response = await engine.client.post(
        QUOTE, json=quote_body(ticker="VECT", client_id="xyz123"), headers=engine.as_admin()
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["breakdown"] == PUBLISHED_BREAKDOWN
    assert body["total_fee"] == 456.51
    assert body["borrow_rate_used"] == 0.05
    assert body["fee_schedule"] == PUBLISHED_SCHEDULE
    rate = body["rate"]
    assert rate["base_rate"] == 0.05
    assert rate["min_rate"] == 0.0001
    assert rate["source"] == "availability_file"
    assert rate["is_fallback"] is False
    assert rate["borrow_status"] == "MEDIUM"  # 1 % < 5 % <= 10 %, no stored status
    assert_quote_reproducible(body)


async def test_smoke_vector_of_the_demo_data(engine: Engine) -> None:
    """AAPL: base 0.0025, V = 20 -> 0.003; 100,000 x 30 d -> 24.66 + 1.23 + 25 (demo_client)."""
    response = await engine.client.post(QUOTE, json=quote_body(), headers=engine.as_client())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["borrow_rate_used"] == 0.003
    assert body["breakdown"] == {"borrow_cost": 24.66, "markup": 1.23, "transaction_fees": 25.0}
    assert body["total_fee"] == 50.89
    assert body["rate"]["borrow_status"] == "EASY"
    assert body["rate"]["min_rate"] == 0.0025
    assert_quote_reproducible(body)


# ---- POST and GET, reproducibility -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("ticker", "client_id", "position_value", "loan_days"),
    [
        ("AAPL", "demo_client", 100000, 30),
        ("GME", "demo_client", 1234567.89, 365),
        ("BRK.B", "pct_client", 1001, 1),
        ("BYND", "pct_client", 999999999.99, 200),
        ("XYZQ", "xyz123", 0.01, 1),
        ("ACME", "xyz123", 1000000000, 365),
    ],
)
async def test_post_and_get_forms_give_identical_figures(
    engine: Engine, ticker: str, client_id: str, position_value: float, loan_days: int
) -> None:
    body = quote_body(ticker=ticker, client_id=client_id, position_value=position_value, loan_days=loan_days)
    posted = await engine.client.post(QUOTE, json=body, headers=engine.as_admin())
    got = await engine.client.get(QUOTE, params=body, headers=engine.as_admin())
    assert posted.status_code == 200, posted.text
    assert got.status_code == 200, got.text
    first, second = posted.json(), got.json()
    assert first["quote_id"] != second["quote_id"]
    volatile = ("quote_id", "calculated_at", "rate")
    assert without(first, *volatile) == without(second, *volatile)
    assert without(first["rate"], "as_of") == without(second["rate"], "as_of")
    assert_quote_reproducible(first)
    assert_quote_reproducible(second)


async def test_ties_round_half_up_to_the_cent(engine: Engine) -> None:
    """Figures that are exact half cents: a float-only core rounds some of them down."""
    await set_volatility(engine, 0)
    await admin_ok(engine, "PUT", "/api/v1/admin/stocks/TIES", json={"min_borrow_rate": 0.0365})
    await admin_ok(
        engine,
        "PUT",
        "/api/v1/admin/clients/tie_client",
        json={"markup_percentage": 5, "transaction_fee_type": "PERCENTAGE", "transaction_amount": 0.5},
    )
    # 1001 x 0.5 / 100 = 5.005 -> 5.01 (DESIGN §3); 1000 x 0.0365 x 1 / 365 = 0.10, 5 % of it 0.005 -> 0.01;
    # 50 x 0.0365 x 1 / 365 = 0.005 -> 0.01.
    cases = [
        (1001, 1, {"transaction_fees": 5.01}),
        (1000, 1, {"borrow_cost": 0.1, "markup": 0.01}),
        (50, 1, {"borrow_cost": 0.01}),
    ]
    for position, days, want in cases:
        response = await engine.client.post(
            QUOTE,
            json=quote_body(ticker="TIES", client_id="tie_client", position_value=position, loan_days=days),
            headers=engine.as_admin(),
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["borrow_rate_used"] == 0.0365
        for name, value in want.items():
            assert body["breakdown"][name] == value, (position, body["breakdown"])
        assert_quote_reproducible(body)


@pytest.mark.parametrize("raw", ["1e5", "100000", "100000.0", "1E+5"])
async def test_json_number_forms_are_accepted(engine: Engine, raw: str) -> None:
    text = f'{{"ticker":"AAPL","position_value":{raw},"loan_days":30,"client_id":"demo_client"}}'
    response = await engine.client.post(
        QUOTE, content=text, headers={**engine.as_client(), "Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["position_value"] == 100000.0
    assert response.json()["total_fee"] == 50.89


@pytest.mark.parametrize(
    ("field", "value"),
    [("position_value", 0.01), ("position_value", 1000000000), ("loan_days", 1), ("loan_days", 365)],
)
async def test_bounds_are_inclusive(engine: Engine, field: str, value: float) -> None:
    response = await engine.client.post(QUOTE, json=quote_body(**{field: value}), headers=engine.as_client())
    assert response.status_code == 200, response.text
    assert response.json()[field] == value
    assert_quote_reproducible(response.json())


# ---- validation, rights, existence: 400 -> 403 -> 404 -----------------------------------------------


async def test_checks_run_in_order_validation_then_rights_then_existence(engine: Engine) -> None:
    client = engine.as_client()  # a demo_client key (quote, rates)
    # A bad body naming another client: 400, not 403.
    bad = await engine.client.post(QUOTE, json=quote_body(client_id="xyz123", loan_days=0), headers=client)
    assert_invalid(bad, "loan_days")
    bad_ticker = await engine.client.post(
        QUOTE, json=quote_body(client_id="xyz123", ticker="A.B.C"), headers=client
    )
    assert_invalid(bad_ticker, "ticker")
    # A good body for another client: 403.
    other = await engine.client.post(QUOTE, json=quote_body(client_id="xyz123"), headers=client)
    assert other.status_code == 403, other.text
    assert other.json()["error_code"] == "FORBIDDEN"
    # ... even when that client or the ticker does not exist (no disclosure of existence).
    for body in (quote_body(client_id="no_such_client"), quote_body(client_id="xyz123", ticker="ZZZZ")):
        forbidden = await engine.client.post(QUOTE, json=body, headers=client)
        assert forbidden.status_code == 403, forbidden.text
        assert forbidden.json()["error_code"] == "FORBIDDEN"
    # Own client, unknown ticker: 404 TICKER_NOT_FOUND.
    unknown_ticker = await engine.client.post(QUOTE, json=quote_body(ticker="ZZZZ"), headers=client)
    assert unknown_ticker.status_code == 404, unknown_ticker.text
    assert unknown_ticker.json()["error_code"] == "TICKER_NOT_FOUND"
    assert unknown_ticker.json()["details"] == {"ticker": "ZZZZ"}
    # An admin key acts for any client; an unknown client is then 404 CLIENT_NOT_FOUND.
    admin = engine.as_admin()
    for client_id in ("xyz123", "pct_client", "demo_client"):
        ok = await engine.client.post(QUOTE, json=quote_body(client_id=client_id), headers=admin)
        assert ok.status_code == 200, ok.text
        assert ok.json()["client_id"] == client_id
    missing = await engine.client.post(QUOTE, json=quote_body(client_id="no_such_client"), headers=admin)
    assert missing.status_code == 404, missing.text
    assert missing.json()["error_code"] == "CLIENT_NOT_FOUND"
    assert missing.json()["details"] == {"client_id": "no_such_client"}
    # The same order on the GET form.
    got = await engine.client.get(QUOTE, params=quote_body(client_id="xyz123", loan_days=400), headers=client)
    assert_invalid(got, "loan_days", location="query")
    got = await engine.client.get(QUOTE, params=quote_body(client_id="xyz123"), headers=client)
    assert got.status_code == 403


async def test_a_key_issued_for_a_client_acts_only_for_it(engine: Engine) -> None:
    key = {"X-API-Key": await issue_key(engine, "xyz123")}
    own = await engine.client.post(QUOTE, json=quote_body(client_id="xyz123"), headers=key)
    assert own.status_code == 200, own.text
    for other in ("demo_client", "pct_client", "admin"):
        response = await engine.client.post(QUOTE, json=quote_body(client_id=other), headers=key)
        assert response.status_code == 403, (other, response.text)


@pytest.mark.parametrize("spelling", ["BRK.B", "brk-b", "BRK B", "brk.b", "BRK-B", " brk b "])
async def test_ticker_spellings_give_the_same_quote(engine: Engine, spelling: str) -> None:
    reference = await engine.client.post(QUOTE, json=quote_body(ticker="BRK.B"), headers=engine.as_client())
    posted = await engine.client.post(QUOTE, json=quote_body(ticker=spelling), headers=engine.as_client())
    got = await engine.client.get(QUOTE, params=quote_body(ticker=spelling), headers=engine.as_client())
    for response in (reference, posted, got):
        assert response.status_code == 200, response.text
        assert response.json()["ticker"] == "BRK.B"
    volatile = ("quote_id", "calculated_at")
    assert without(posted.json(), *volatile) == without(reference.json(), *volatile)
    assert without(got.json(), *volatile) == without(reference.json(), *volatile)


INVALID_BODIES = [
    pytest.param('{"ticker": "AAPL", ', "body", id="malformed-json"),
    pytest.param("[]", "body", id="json-array"),
    pytest.param("not json", "body", id="not-json"),
    pytest.param(quote_body(position_value="100"), "position_value", id="position-string"),
    pytest.param(quote_body(position_value=None), "position_value", id="position-null"),
    pytest.param(quote_body(loan_days="30"), "loan_days", id="days-string"),
    pytest.param(quote_body(loan_days=30.5), "loan_days", id="days-fraction"),
    pytest.param(quote_body(position_value=True), "position_value", id="position-bool"),
    pytest.param(quote_body(loan_days=True), "loan_days", id="days-bool"),
    pytest.param(quote_body(ticker=123), "ticker", id="ticker-number"),
    pytest.param(quote_body(client_id=123), "client_id", id="client-number"),
    pytest.param(quote_body(position_value=0), "position_value", id="position-zero"),
    pytest.param(quote_body(position_value=-5), "position_value", id="position-negative"),
    pytest.param(quote_body(position_value=0.001), "position_value", id="position-below-a-cent"),
    pytest.param(quote_body(position_value=1e9 + 0.01), "position_value", id="position-over-1e9"),
    pytest.param(quote_body(position_value=100.001), "position_value", id="position-3-decimals"),
    pytest.param(quote_body(position_value=12.345), "position_value", id="position-3-decimals-b"),
    pytest.param(quote_body(loan_days=0), "loan_days", id="days-zero"),
    pytest.param(quote_body(loan_days=366), "loan_days", id="days-366"),
    pytest.param(quote_body(loan_days=-1), "loan_days", id="days-negative"),
    pytest.param(quote_body(unexpected=1), "unexpected", id="unknown-field"),
    pytest.param(without(quote_body(), "loan_days"), "loan_days", id="missing-days"),
    pytest.param(without(quote_body(), "ticker"), "ticker", id="missing-ticker"),
    pytest.param(quote_body(client_id="ab"), "client_id", id="client-too-short"),
    pytest.param(quote_body(client_id="a" * 51), "client_id", id="client-too-long"),
    pytest.param(quote_body(client_id="demo client"), "client_id", id="client-space"),
    pytest.param(quote_body(client_id="demo.client"), "client_id", id="client-dot"),
    pytest.param(quote_body(ticker=""), "ticker", id="ticker-empty"),
    pytest.param(quote_body(ticker="BRK..B"), "ticker", id="ticker-double-separator"),
    pytest.param(quote_body(ticker="A.B.C"), "ticker", id="ticker-two-separators"),
    pytest.param(quote_body(ticker="AB$"), "ticker", id="ticker-symbol"),
    pytest.param(quote_body(ticker="ABCDEFGHIJK"), "ticker", id="ticker-11-chars"),
    pytest.param(quote_body(ticker=".AB"), "ticker", id="ticker-leading-separator"),
]


@pytest.mark.parametrize(("body", "field"), INVALID_BODIES)
async def test_invalid_quote_bodies_are_400_naming_the_field(engine: Engine, body: Any, field: str) -> None:
    content = body if isinstance(body, str) else msgspec.json.encode(body)
    response = await engine.client.post(
        QUOTE, content=content, headers={**engine.as_client(), "Content-Type": "application/json"}
    )
    problem = assert_invalid(response, field)
    assert isinstance(problem["valid_params"], list)
    assert problem["details"] is None or isinstance(problem["details"], dict)


INVALID_QUERIES = [
    pytest.param({"position_value": "abc"}, "position_value", id="position-text"),
    pytest.param({"position_value": "100.001"}, "position_value", id="position-3-decimals"),
    pytest.param({"position_value": "0"}, "position_value", id="position-zero"),
    pytest.param({"position_value": "1000000000.01"}, "position_value", id="position-over-1e9"),
    pytest.param({"loan_days": "0"}, "loan_days", id="days-zero"),
    pytest.param({"loan_days": "366"}, "loan_days", id="days-366"),
    pytest.param({"loan_days": "2.5"}, "loan_days", id="days-fraction"),
    pytest.param({"loan_days": "true"}, "loan_days", id="days-bool"),
    pytest.param({"client_id": "a b"}, "client_id", id="client-pattern"),
    pytest.param({"ticker": "A.B.C"}, "ticker", id="ticker-invalid"),
    pytest.param({"extra": "1"}, "extra", id="unknown-param"),
]


@pytest.mark.parametrize(("change", "field"), INVALID_QUERIES)
async def test_invalid_quote_queries_are_400_naming_the_field(
    engine: Engine, change: dict[str, str], field: str
) -> None:
    params = {name: str(value) for name, value in quote_body().items()} | change
    response = await engine.client.get(QUOTE, params=params, headers=engine.as_client())
    assert_invalid(response, field, location="query")


async def test_repeated_query_parameter_is_400(engine: Engine) -> None:
    params = [(name, str(value)) for name, value in quote_body().items()] + [("ticker", "GME")]
    response = await engine.client.get(QUOTE, params=params, headers=engine.as_client())
    assert_invalid(response, "ticker", location="query")


async def test_extreme_positions_stay_exact(engine: Engine) -> None:
    """Position 1e9, 365 days, rate at the 10 cap, 100 % markup and fee: products beyond int64."""
    await admin_ok(engine, "PUT", "/api/v1/admin/stocks/MAXX", json={"min_borrow_rate": 10})
    await admin_ok(
        engine,
        "PUT",
        "/api/v1/admin/clients/whale",
        json={
            "markup_percentage": 100,
            "transaction_fee_type": "PERCENTAGE",
            "transaction_amount": 100,
            "day_count": 360,
        },
    )
    for position, days in ((1e9, 365), (999999999.99, 365), (0.01, 1), (123456789.01, 359)):
        body = quote_body(ticker="MAXX", client_id="whale", position_value=position, loan_days=days)
        response = await engine.client.post(QUOTE, json=body, headers=engine.as_admin())
        assert response.status_code == 200, response.text
        quote = response.json()
        assert quote["borrow_rate_used"] == 10.0
        assert_quote_reproducible(quote)
        if position == 1e9:
            # 1e9 x 10 x 365 / 360 = 10,138,888,888.89; markup 100 %; fee 100 % of the position.
            assert quote["breakdown"]["borrow_cost"] == 10138888888.89
            assert quote["total_fee"] == 21277777777.78


async def test_missing_query_parameter_is_400(engine: Engine) -> None:
    params = without(quote_body(), "loan_days")
    response = await engine.client.get(QUOTE, params=params, headers=engine.as_client())
    assert_invalid(response, "loan_days", location="query")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(quote_body(loan_days=0), id="range"),
        pytest.param(quote_body(unexpected=1), id="unknown-field"),
        pytest.param(quote_body(position_value=100.001), id="decimals"),
        pytest.param(quote_body(ticker="A.B.C"), id="ticker"),
        pytest.param(quote_body(client_id="a b"), id="client-pattern"),
        pytest.param(quote_body(loan_days="x"), id="type"),
    ],
)
async def test_every_quote_validation_error_lists_the_valid_params(
    engine: Engine, body: dict[str, Any]
) -> None:
    """DESIGN §2.3: validation errors add `valid_params`; a quote's are its four fields, whatever the rule."""
    posted = await engine.client.post(QUOTE, json=body, headers=engine.as_client())
    params = {name: str(value) for name, value in body.items()}
    got = await engine.client.get(QUOTE, params=params, headers=engine.as_client())
    for response in (posted, got):
        assert response.status_code == 400, response.text
        assert set(response.json()["valid_params"]) == QUOTE_FIELDS


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_quote_without_json_content_type_is_415(engine: Engine, content_type: str | None) -> None:
    headers = engine.as_client()
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await engine.client.post(QUOTE, content=msgspec.json.encode(quote_body()), headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error_code"] == "UNSUPPORTED_MEDIA_TYPE"


async def test_json_content_type_with_charset_is_accepted(engine: Engine) -> None:
    response = await engine.client.post(
        QUOTE,
        content=msgspec.json.encode(quote_body()),
        headers={**engine.as_client(), "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200, response.text


async def test_inactive_client_is_403(engine: Engine) -> None:
    await admin_ok(
        engine,
        "PUT",
        "/api/v1/admin/clients/dormant",
        json={
            "markup_percentage": 1,
            "transaction_fee_type": "FLAT",
            "transaction_amount": 1,
            "active": False,
        },
    )
    key = {"X-API-Key": await issue_key(engine, "dormant")}
    for headers in (key, engine.as_admin()):
        single = await engine.client.post(QUOTE, json=quote_body(client_id="dormant"), headers=headers)
        assert single.status_code == 403, single.text
        assert single.json()["error_code"] == "FORBIDDEN"
        batch = await engine.client.post(
            BATCH,
            json={
                "client_id": "dormant",
                "positions": [{"ticker": "AAPL", "position_value": 1, "loan_days": 1}],
            },
            headers=headers,
        )
        assert batch.status_code == 403, batch.text
    # Re-activated, it quotes again.
    await admin_ok(
        engine,
        "PUT",
        "/api/v1/admin/clients/dormant",
        json={
            "markup_percentage": 1,
            "transaction_fee_type": "FLAT",
            "transaction_amount": 1,
            "active": True,
        },
    )
    again = await engine.client.post(QUOTE, json=quote_body(client_id="dormant"), headers=key)
    assert again.status_code == 200, again.text


# ---- batch ------------------------------------------------------------------------------------------

MIXED_ROWS: list[Any] = [
    {"ticker": "AAPL", "position_value": 100000, "loan_days": 30},  # 0 ok
    {"ticker": "ZZZZ", "position_value": 1000, "loan_days": 30},  # 1 unknown ticker
    {"ticker": "AAPL", "position_value": 0, "loan_days": 30},  # 2 out of range
    {"ticker": "GME", "position_value": "x", "loan_days": 30},  # 3 wrong type
    {"ticker": "MSFT", "position_value": 5000.5, "loan_days": 10, "foo": 1},  # 4 unknown field
    {"ticker": "brk-b", "position_value": 5000.5, "loan_days": 10},  # 5 ok (normalised)
    {"ticker": "TSLA", "position_value": 10.001, "loan_days": 10},  # 6 too many decimals
    {"ticker": "TSLA", "position_value": 10, "loan_days": 366},  # 7 days out of range
    {"ticker": "A.B.C", "position_value": 10, "loan_days": 1},  # 8 bad ticker
    {"ticker": "GME", "position_value": 2500000.25, "loan_days": 365},  # 9 ok
    {"ticker": "NVDA", "position_value": 10, "loan_days": True},  # 10 bool for int
]
MIXED_ERRORS = [
    (1, "TICKER_NOT_FOUND", "ticker"),
    (2, "INVALID_PARAMETER", "position_value"),
    (3, "INVALID_PARAMETER", "position_value"),
    (4, "INVALID_PARAMETER", "foo"),
    (6, "INVALID_PARAMETER", "position_value"),
    (7, "INVALID_PARAMETER", "loan_days"),
    (8, "INVALID_PARAMETER", "ticker"),
    (10, "INVALID_PARAMETER", "loan_days"),
]
MIXED_PRICED = [0, 5, 9]


def assert_batch_reproducible(body: Mapping[str, Any], rows: list[Any], rates: Mapping[str, Any]) -> None:
    schedule = body["fee_schedule"]
    for quote in body["quotes"]:
        row = rows[quote["index"]]
        assert quote["position_value"] == row["position_value"]
        assert quote["loan_days"] == row["loan_days"]
        assert quote["borrow_rate_used"] == rates[quote["ticker"]]
        want = expected_fees(quote["position_value"], quote["borrow_rate_used"], quote["loan_days"], schedule)
        assert dec(quote["breakdown"]["borrow_cost"]) == want["borrow_cost"], quote
        assert dec(quote["breakdown"]["markup"]) == want["markup"], quote
        assert dec(quote["breakdown"]["transaction_fees"]) == want["transaction_fees"], quote
        assert dec(quote["total_fee"]) == want["total_fee"], quote


async def current_rates(engine: Engine, tickers: list[str]) -> dict[str, float]:
    response = await engine.client.get(
        "/api/v1/rates", params={"tickers": ",".join(tickers)}, headers=engine.as_admin()
    )
    assert response.status_code == 200, response.text
    assert response.json()["errors"] == []
    return {rate["ticker"]: rate["current_rate"] for rate in response.json()["rates"]}


def check_mixed_batch(body: Mapping[str, Any]) -> None:
    assert body["status"] == "success"
    assert body["client_id"] == "demo_client"
    assert body["count"] == len(MIXED_ROWS)
    assert body["priced"] == len(MIXED_PRICED)
    assert [quote["index"] for quote in body["quotes"]] == MIXED_PRICED
    assert [quote["ticker"] for quote in body["quotes"]] == ["AAPL", "BRK.B", "GME"]
    assert [(e["index"], e["error_code"], e["field"]) for e in body["errors"]] == MIXED_ERRORS
    assert all(isinstance(error["error"], str) and error["error"] for error in body["errors"])
    assert body["fee_schedule"] == PUBLISHED_SCHEDULE
    assert len({quote["quote_id"] for quote in body["quotes"]}) == len(MIXED_PRICED)


async def test_batch_json_with_per_row_errors_in_input_order(engine: Engine) -> None:
    rates = await current_rates(engine, ["AAPL", "BRK.B", "GME"])
    response = await engine.client.post(
        BATCH, json={"client_id": "demo_client", "positions": MIXED_ROWS}, headers=engine.as_client()
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    check_mixed_batch(body)
    assert_batch_reproducible(body, MIXED_ROWS, rates)


async def test_batch_msgpack_gives_the_same_figures_as_json(engine: Engine) -> None:
    payload = {"client_id": "demo_client", "positions": MIXED_ROWS}
    as_json = await engine.client.post(BATCH, json=payload, headers=engine.as_client())
    as_msgpack = await engine.client.post(
        BATCH,
        content=msgspec.msgpack.encode(payload),
        headers={**engine.as_client(), "Content-Type": "application/msgpack"},
    )
    assert as_msgpack.status_code == 200, as_msgpack.text
    assert as_msgpack.headers["content-type"].startswith("application/msgpack")
    body = msgspec.msgpack.decode(as_msgpack.content)
    check_mixed_batch(body)
    strip = ("quote_id",)
    assert [without(q, *strip) for q in body["quotes"]] == [
        without(q, *strip) for q in as_json.json()["quotes"]
    ]
    assert body["errors"] == as_json.json()["errors"]


async def test_batch_msgpack_float_decimals_follow_repr(engine: Engine) -> None:
    rows = [
        {"ticker": "AAPL", "position_value": 0.07, "loan_days": 1},
        {"ticker": "AAPL", "position_value": 1234.56, "loan_days": 1},
        {"ticker": "AAPL", "position_value": 0.1 + 0.2, "loan_days": 1},  # 0.30000000000000004
    ]
    response = await engine.client.post(
        BATCH,
        content=msgspec.msgpack.encode({"client_id": "demo_client", "positions": rows}),
        headers={**engine.as_client(), "Content-Type": "application/msgpack"},
    )
    assert response.status_code == 200, response.text
    body = msgspec.msgpack.decode(response.content)
    assert [quote["index"] for quote in body["quotes"]] == [0, 1]
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(2, "position_value")]


async def test_batch_unknown_tickers_only(engine: Engine) -> None:
    rows = [
        {"ticker": "QQQQ", "position_value": 10, "loan_days": 1},
        {"ticker": "AAPL", "position_value": 10, "loan_days": 1},
        {"ticker": "WWWW", "position_value": 10, "loan_days": 1},
    ]
    response = await engine.client.post(
        BATCH, json={"client_id": "demo_client", "positions": rows}, headers=engine.as_client()
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 3
    assert body["priced"] == 1
    assert [q["index"] for q in body["quotes"]] == [1]
    assert body["errors"] == [
        {
            "index": 0,
            "error_code": "TICKER_NOT_FOUND",
            "error": body["errors"][0]["error"],
            "field": "ticker",
        },
        {
            "index": 2,
            "error_code": "TICKER_NOT_FOUND",
            "error": body["errors"][1]["error"],
            "field": "ticker",
        },
    ]
    assert "QQQQ" in body["errors"][0]["error"]


async def test_atomic_batch_with_invalid_values_is_400_listing_the_rows(engine: Engine) -> None:
    rows = [r for r in MIXED_ROWS if r.get("ticker") != "ZZZZ"]  # invalid values only
    response = await engine.client.post(
        BATCH,
        params={"atomic": "true"},
        json={"client_id": "demo_client", "positions": rows},
        headers=engine.as_client(),
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER"
    listed = [(e["index"], e["field"]) for e in body["details"]["errors"]]
    assert listed == [
        (1, "position_value"),
        (2, "position_value"),
        (3, "foo"),
        (5, "position_value"),
        (6, "loan_days"),
        (7, "ticker"),
        (9, "loan_days"),
    ]
    assert [v["field"].split(".")[0] for v in body["validation_errors"]] == [
        f"positions[{i}]" for i, _ in listed
    ]


async def test_atomic_batch_with_an_unknown_ticker_is_400(engine: Engine) -> None:
    rows = [
        {"ticker": "AAPL", "position_value": 10, "loan_days": 1},
        {"ticker": "ZZZZ", "position_value": 10, "loan_days": 1},
    ]
    response = await engine.client.post(
        BATCH,
        params={"atomic": "true"},
        json={"client_id": "demo_client", "positions": rows},
        headers=engine.as_client(),
    )
    assert response.status_code == 400, response.text
    errors = response.json()["details"]["errors"]
    assert [(e["index"], e["error_code"]) for e in errors] == [(1, "TICKER_NOT_FOUND")]


async def test_atomic_batch_lists_every_invalid_row_including_unknown_tickers(engine: Engine) -> None:
    response = await engine.client.post(
        BATCH,
        params={"atomic": "true"},
        json={"client_id": "demo_client", "positions": MIXED_ROWS},
        headers=engine.as_client(),
    )
    assert response.status_code == 400, response.text
    listed = [(e["index"], e["error_code"], e["field"]) for e in response.json()["details"]["errors"]]
    assert listed == MIXED_ERRORS


async def test_atomic_batch_of_valid_rows_prices_them_all(engine: Engine) -> None:
    rows = [MIXED_ROWS[index] for index in MIXED_PRICED]
    for flag in ("true", "1"):
        response = await engine.client.post(
            BATCH,
            params={"atomic": flag},
            json={"client_id": "demo_client", "positions": rows},
            headers=engine.as_client(),
        )
        assert response.status_code == 200, response.text
        assert response.json()["priced"] == 3
        assert response.json()["errors"] == []
    bad_flag = await engine.client.post(
        BATCH,
        params={"atomic": "maybe"},
        json={"client_id": "demo_client", "positions": rows},
        headers=engine.as_client(),
    )
    assert_invalid(bad_flag, "atomic", location="query")


async def test_batch_validation_rights_and_existence(engine: Engine) -> None:
    rows = [{"ticker": "AAPL", "position_value": 10, "loan_days": 1}]
    client = engine.as_client()
    malformed = await engine.client.post(
        BATCH,
        content=b'{"client_id": "xyz123", "positions": [',
        headers={**client, "Content-Type": "application/json"},
    )
    assert_invalid(malformed, "body")
    bad_client = await engine.client.post(BATCH, json={"client_id": "x y", "positions": rows}, headers=client)
    assert_invalid(bad_client, "client_id")
    no_positions = await engine.client.post(BATCH, json={"client_id": "demo_client"}, headers=client)
    assert_invalid(no_positions, "positions")
    other = await engine.client.post(BATCH, json={"client_id": "xyz123", "positions": rows}, headers=client)
    assert other.status_code == 403, other.text
    missing = await engine.client.post(
        BATCH, json={"client_id": "no_such_client", "positions": rows}, headers=engine.as_admin()
    )
    assert missing.status_code == 404, missing.text
    assert missing.json()["error_code"] == "CLIENT_NOT_FOUND"
    wrong_type = await engine.client.post(
        BATCH,
        content=msgspec.json.encode({"client_id": "demo_client", "positions": rows}),
        headers={**client, "Content-Type": "text/csv"},
    )
    assert wrong_type.status_code == 415, wrong_type.text
    empty = await engine.client.post(
        BATCH, json={"client_id": "demo_client", "positions": []}, headers=client
    )
    assert empty.status_code == 200, empty.text
    assert (empty.json()["count"], empty.json()["priced"], empty.json()["quotes"]) == (0, 0, [])


async def test_batch_over_max_batch_size_is_400() -> None:
    async with custom_engine(MAX_BATCH_SIZE="5") as engine:
        row = {"ticker": "AAPL", "position_value": 10, "loan_days": 1}
        at_limit = await engine.client.post(
            BATCH, json={"client_id": "demo_client", "positions": [row] * 5}, headers=engine.as_client()
        )
        assert at_limit.status_code == 200, at_limit.text
        assert at_limit.json()["priced"] == 5
        for encode, media in (
            (msgspec.json.encode, "application/json"),
            (msgspec.msgpack.encode, "application/msgpack"),
        ):
            over = await engine.client.post(
                BATCH,
                content=encode({"client_id": "demo_client", "positions": [row] * 6}),
                headers={**engine.as_client(), "Content-Type": media},
            )
            body = assert_invalid(over, "positions")
            assert "5" in body["error"]
        # Rows that are invalid still count toward the size.
        over_mixed = await engine.client.post(
            BATCH,
            json={"client_id": "demo_client", "positions": [row] * 3 + [{"ticker": 1}] * 3},
            headers=engine.as_client(),
        )
        assert_invalid(over_mixed, "positions")


async def test_batch_quote_ids_read_back_with_the_same_figures(engine: Engine) -> None:
    rows = [
        {"ticker": "AAPL", "position_value": 100000, "loan_days": 30},
        {"ticker": "ZZZZ", "position_value": 1, "loan_days": 1},
        {"ticker": "GME", "position_value": 77777.77, "loan_days": 77},
        {"ticker": "ACME", "position_value": 5, "loan_days": 365},
    ]
    response = await engine.client.post(
        BATCH, json={"client_id": "demo_client", "positions": rows}, headers=engine.as_client()
    )
    assert response.status_code == 200, response.text
    batch = response.json()
    assert [q["index"] for q in batch["quotes"]] == [0, 2, 3]
    for quote in batch["quotes"]:
        stored = await engine.client.get(f"/api/v1/quotes/{quote['quote_id']}", headers=engine.as_client())
        assert stored.status_code == 200, stored.text
        body = stored.json()
        assert body["quote_id"] == quote["quote_id"]
        assert body["client_id"] == "demo_client"
        assert body["fee_schedule"] == batch["fee_schedule"]
        assert body["calculated_at"] == batch["calculated_at"]
        for name in ("ticker", "position_value", "loan_days", "total_fee", "breakdown", "borrow_rate_used"):
            assert body[name] == quote[name], name
        assert_quote_reproducible(body)


async def test_single_quote_reads_back_identically(engine: Engine) -> None:
    priced = await engine.client.post(QUOTE, json=quote_body(ticker="GME"), headers=engine.as_client())
    assert priced.status_code == 200
    quote_id = priced.json()["quote_id"]
    own = await engine.client.get(f"/api/v1/quotes/{quote_id}", headers=engine.as_client())
    assert own.status_code == 200, own.text
    assert own.json() == priced.json()
    admin = await engine.client.get(f"/api/v1/quotes/{quote_id}", headers=engine.as_admin())
    assert admin.status_code == 200
    assert admin.json() == priced.json()
    audit_key = await issue_key(engine, "xyz123", ["audit"])
    audit = await engine.client.get(f"/api/v1/quotes/{quote_id}", headers={"X-API-Key": audit_key})
    assert audit.status_code == 200, audit.text
    assert audit.json() == priced.json()


async def test_quote_read_back_is_hidden_from_other_clients_and_malformed_ids(engine: Engine) -> None:
    priced = await engine.client.post(QUOTE, json=quote_body(), headers=engine.as_client())
    quote_id = priced.json()["quote_id"]
    other_key = await issue_key(engine, "xyz123")
    other = await engine.client.get(f"/api/v1/quotes/{quote_id}", headers={"X-API-Key": other_key})
    assert other.status_code == 404, other.text
    assert other.json()["error_code"] == "NOT_FOUND"
    never = "0" * len(quote_id)
    unknown = await engine.client.get(f"/api/v1/quotes/{never}", headers=engine.as_client())
    for malformed_id in ("abc", quote_id + "0", "z" * len(quote_id), quote_id[:-1] + "1"):
        response = await engine.client.get(f"/api/v1/quotes/{malformed_id}", headers=engine.as_client())
        assert response.status_code == 404, (malformed_id, response.text)
        assert response.json()["error_code"] == "NOT_FOUND"
        # The body does not tell "exists but not yours" from "never existed".
        assert without(response.json(), "request_id", "details", "error") == without(
            unknown.json(), "request_id", "details", "error"
        )
    rates_only = await issue_key(engine, "demo_client", ["rates"])
    no_scope = await engine.client.get(f"/api/v1/quotes/{quote_id}", headers={"X-API-Key": rates_only})
    assert no_scope.status_code == 403, no_scope.text


@pytest.mark.parametrize(
    ("client_id", "schedule"),
    [
        ("pct_client", None),
        (
            "exotic",
            {
                "markup_percentage": 12.3456,
                "transaction_fee_type": "PERCENTAGE",
                "transaction_amount": 0.0125,
                "day_count": 366,
            },
        ),
    ],
)
async def test_batch_of_ten_thousand_rows_matches_a_decimal_recomputation(
    engine: Engine, client_id: str, schedule: dict[str, Any] | None
) -> None:
    if schedule is not None:
        await admin_ok(engine, "PUT", f"/api/v1/admin/clients/{client_id}", json=schedule)
    rates = await current_rates(engine, DEMO_TICKERS)
    generator = random.Random(20240621)
    rows = []
    for _ in range(10_000):
        cents = generator.choice(
            [
                generator.randint(1, 100_000_000_000),
                generator.randint(1, 10_000),
                generator.randint(1, 10**7) * 50,
            ]
        )
        rows.append(
            {
                "ticker": generator.choice(DEMO_TICKERS),
                "position_value": cents / 100,
                "loan_days": generator.randint(1, 365),
            }
        )
    response = await engine.client.post(
        BATCH, json={"client_id": client_id, "positions": rows}, headers=engine.as_admin()
    )
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["count"] == body["priced"] == 10_000
    assert body["errors"] == []
    assert [quote["index"] for quote in body["quotes"]] == list(range(10_000))
    assert [quote["ticker"] for quote in body["quotes"]] == [row["ticker"] for row in rows]
    if schedule is not None:
        assert body["fee_schedule"] == schedule
    else:
        assert body["fee_schedule"] == {
            "markup_percentage": 10.0,
            "transaction_fee_type": "PERCENTAGE",
            "transaction_amount": 0.05,
            "day_count": 360,
        }
    assert_batch_reproducible(body, rows, rates)
