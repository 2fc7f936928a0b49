"""The contract's edges (issue 17 items 2, 6, 7): what /openapi.json declares, NUL characters, and the
same rules on every route (unknown query parameters, integers written 30.0, decimals as written)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricer.app import create_app
from pricer.settings import Settings
from pricer.tickers import normalize_ticker
from tests.conftest import TEST_SECRETS, Engine, make_settings
from tests.pg import pg_schema
from tests.test_loaders import synthetic_ibkr

pytestmark = pytest.mark.anyio

QUOTE = "/api/v1/calculate-locate"
BATCH = "/api/v1/calculate-locate/batch"
ADMIN_KEY = "bre_contract01_" + "C" * 40


def quote(**overrides: Any) -> dict[str, Any]:
    return {
        "ticker": "AAPL",
        "position_value": 100000,
        "loan_days": 30,
        "client_id": "demo_client",
        **overrides,
    }


def assert_invalid(response: httpx.Response, field: str, location: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body: dict[str, Any] = response.json()
    assert body["error_code"] == "INVALID_PARAMETER", body
    assert body["validation_errors"][0]["field"] == field, body
    assert body["validation_errors"][0]["location"] == location, body
    return body


async def openapi(engine: Engine) -> dict[str, Any]:
    response = await engine.client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def parameters(operation: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(p["in"], p["name"]): p for p in operation.get("parameters", [])}


# ---- item 2: the OpenAPI document says what clients need -------------------------------------------


async def test_openapi_declares_the_query_parameters_and_text_bodies(engine: Engine) -> None:
    paths = (await openapi(engine))["paths"]
    tickers = parameters(paths["/api/v1/rates"]["get"])[("query", "tickers")]
    assert tickers["required"] is True
    assert tickers["schema"]["type"] == "string"
    atomic = parameters(paths[BATCH]["post"])[("query", "atomic")]
    assert atomic["required"] is False
    assert atomic["schema"]["type"] == "boolean"
    # The POST form of calculate-locate reads its body, not the query.
    assert parameters(paths[QUOTE]["post"]) == {}
    assert {name for _, name in parameters(paths[QUOTE]["get"])} == {
        "ticker",
        "position_value",
        "loan_days",
        "client_id",
    }
    for upload in ("availability", "vix-history", "earnings-calendar"):
        body = paths[f"/api/v1/admin/{upload}"]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["text/plain"]["schema"]["type"] == "string"


async def test_openapi_path_parameters_and_fields_have_their_patterns(engine: Engine) -> None:
    document = await openapi(engine)
    paths, schemas = document["paths"], document["components"]["schemas"]
    expected = {
        ("/api/v1/rates/{ticker}", "get", "ticker"): "AAPL",
        ("/api/v1/admin/stocks/{ticker}", "put", "ticker"): "BRK.B",
        ("/api/v1/admin/events/{ticker}", "put", "ticker"): "brk-b",
        ("/api/v1/admin/clients/{client_id}", "put", "client_id"): "demo_client",
        ("/api/v1/admin/keys/{key_id}", "delete", "key_id"): "abcd1234",
        ("/api/v1/quotes/{quote_id}", "get", "quote_id"): "0" * 32,
    }
    for (path, method, name), example in expected.items():
        schema = parameters(paths[path][method])[("path", name)]["schema"]
        assert re.fullmatch(schema["pattern"], example), (path, schema)
        assert not re.fullmatch(schema["pattern"], example + "\x00"), (path, schema)
    ticker = schemas["QuoteRequest"]["properties"]["ticker"]
    assert ticker["pattern"] == schemas["BatchPosition"]["properties"]["ticker"]["pattern"]
    assert "pattern" in schemas["EventBody"]["properties"]["type"]


async def test_openapi_states_the_decimals_and_the_integers(engine: Engine) -> None:
    schemas = (await openapi(engine))["components"]["schemas"]
    assert schemas["QuoteRequest"]["properties"]["position_value"]["multipleOf"] == 0.01
    assert schemas["BatchPosition"]["properties"]["position_value"]["multipleOf"] == 0.01
    assert schemas["StockBody"]["properties"]["min_borrow_rate"]["multipleOf"] == 1e-8
    assert schemas["VolatilityBody"]["properties"]["value"]["multipleOf"] == 1e-4
    assert schemas["ClientBody"]["allOf"][0]["then"]["properties"]["transaction_amount"]["multipleOf"] == 0.01
    for struct, field in (
        ("QuoteRequest", "loan_days"),
        ("BatchPosition", "loan_days"),
        ("KeyBody", "expires_in_days"),
    ):
        assert schemas[struct]["properties"][field]["type"] == "integer", (struct, field)
    risk = schemas["EventBody"]["properties"]["risk_factor"]["anyOf"]
    assert {"integer", "null"} == {option["type"] for option in risk}
    assert "x-whole-number" not in str(schemas)


@given(
    st.text(max_size=14)
    | st.from_regex(r"\s{0,2}[A-Za-z0-9]{1,7}([-. /][A-Za-z0-9]{1,5})?\s{0,2}", fullmatch=True)
)
def test_the_ticker_pattern_is_the_rule_the_api_applies(raw: str) -> None:
    """What the OpenAPI pattern declares is what the endpoints accept, in a path, a query or a body."""
    from pricer.schemas import TICKER_PATTERN

    assert (re.search(TICKER_PATTERN, raw) is not None) == (normalize_ticker(raw) is not None), raw


async def test_an_integral_loan_days_is_an_integer_everywhere(engine: Engine) -> None:
    """loan_days: 91.0 is an integer for JSON Schema: priced as 91 in the body, the query and the batch."""
    client = engine.as_client()
    reference = await engine.client.post(QUOTE, json=quote(loan_days=91), headers=client)
    assert reference.status_code == 200, reference.text
    fee = reference.json()["total_fee"]
    for answer in (
        await engine.client.post(QUOTE, json=quote(loan_days=91.0), headers=client),
        await engine.client.get(QUOTE, params=quote(loan_days="91.0"), headers=client),
        await engine.client.get(QUOTE, params=quote(loan_days="9.1e1"), headers=client),
    ):
        assert answer.status_code == 200, answer.text
        assert answer.json()["loan_days"] == 91
        assert answer.json()["total_fee"] == fee
    batch = await engine.client.post(
        BATCH,
        json={
            "client_id": "demo_client",
            "positions": [{"ticker": "AAPL", "position_value": 100000, "loan_days": 91.0}],
        },
        headers=client,
    )
    assert batch.status_code == 200, batch.text
    assert batch.json()["quotes"][0]["total_fee"] == fee
    key = await engine.client.post(
        "/api/v1/admin/keys",
        json={"client_id": "demo_client", "expires_in_days": 30.0},
        headers=engine.as_admin(),
    )
    assert key.status_code == 201, key.text


async def test_a_fractional_loan_days_is_refused_everywhere(engine: Engine) -> None:
    client = engine.as_client()
    assert_invalid(
        await engine.client.post(QUOTE, json=quote(loan_days=30.5), headers=client), "loan_days", "body"
    )
    assert_invalid(
        await engine.client.get(QUOTE, params=quote(loan_days="30.5"), headers=client), "loan_days", "query"
    )
    batch = await engine.client.post(
        BATCH,
        json={
            "client_id": "demo_client",
            "positions": [{"ticker": "AAPL", "position_value": 100, "loan_days": 30.5}],
        },
        headers=client,
    )
    assert batch.status_code == 200, batch.text
    assert batch.json()["errors"][0]["field"] == "loan_days"
    events = await engine.client.put(
        "/api/v1/admin/events/AAPL",
        json={"events": [{"date": "2030-01-02", "risk_factor": 2.5}]},
        headers=engine.as_admin(),
    )
    assert_invalid(events, "events[0].risk_factor", "body")


# ---- item 7: decimals as written, unknown query parameters -----------------------------------------

# 17 decimals as written; the float nearest to it is the float of 100.01, so a check on the float's
# shortest text would take it for 100.01.
HIDDEN = "100.00999999999999999"


async def test_decimals_are_counted_as_written_in_the_body_query_and_batch(engine: Engine) -> None:
    client = {**engine.as_client(), "Content-Type": "application/json"}
    body = f'{{"ticker":"AAPL","position_value":{HIDDEN},"loan_days":30,"client_id":"demo_client"}}'
    assert_invalid(await engine.client.post(QUOTE, content=body, headers=client), "position_value", "body")
    query = quote(position_value=HIDDEN)
    assert_invalid(await engine.client.get(QUOTE, params=query, headers=client), "position_value", "query")
    good = '{"ticker":"AAPL","position_value":100.01,"loan_days":30}'
    rows = f'[{good},{{"ticker":"GME","position_value":{HIDDEN},"loan_days":30}}]'
    batch = f'{{"client_id":"demo_client","positions":{rows}}}'
    answer = await engine.client.post(BATCH, content=batch, headers=client)
    assert answer.status_code == 200, answer.text
    assert answer.json()["priced"] == 1
    assert [(e["index"], e["field"]) for e in answer.json()["errors"]] == [(1, "position_value")]
    atomic = await engine.client.post(BATCH, params={"atomic": "true"}, content=batch, headers=client)
    assert_invalid(atomic, "positions[1].position_value", "body")
    # Trailing zeros are not decimals: 100.0100 is 100.01, and 1.001e2 is 100.1.
    for written in ("100.0100", "1.001e2", "100.01000000000000000"):
        same = body.replace(HIDDEN, written)
        assert (await engine.client.post(QUOTE, content=same, headers=client)).status_code == 200, written
    stock = await engine.client.put(
        "/api/v1/admin/stocks/AAPL",
        content='{"min_borrow_rate":0.0100000000000000001}',
        headers={**engine.as_admin(), "Content-Type": "application/json"},
    )
    assert_invalid(stock, "min_borrow_rate", "body")


@pytest.mark.parametrize(
    "written",
    [
        "100.00999999999999999999999999999999",  # more digits than Decimal's 28-digit context
        "1e1000000",  # an exponent past the context's limit
        "1.0000000000000000000000000000000000001e5",
    ],
)
async def test_long_or_huge_numbers_are_counted_as_written_not_rounded(engine: Engine, written: str) -> None:
    client = {**engine.as_client(), "Content-Type": "application/json"}
    query = await engine.client.get(QUOTE, params=quote(position_value=written), headers=client)
    assert_invalid(query, "position_value", "query")
    body = f'{{"ticker":"AAPL","position_value":{written},"loan_days":30,"client_id":"demo_client"}}'
    assert (await engine.client.post(QUOTE, content=body, headers=client)).status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/rates/AAPL", None),
        ("GET", "/api/v1/rates?tickers=AAPL", None),
        ("GET", f"{QUOTE}?" + "&".join(f"{k}={v}" for k, v in quote().items()), None),
        ("POST", QUOTE, quote()),
        ("POST", BATCH, {"client_id": "demo_client", "positions": []}),
        ("GET", "/api/v1/quotes/" + "0" * 32, None),
        ("PUT", "/api/v1/admin/volatility", {"value": 20}),
        ("POST", "/api/v1/auth/token", None),
    ],
)
async def test_an_unknown_query_parameter_is_refused_on_every_api_route(
    engine: Engine, method: str, path: str, body: Any
) -> None:
    separator = "&" if "?" in path else "?"
    headers = engine.as_admin() if "admin" in path else engine.as_client()
    answer = await engine.client.request(method, f"{path}{separator}verbose=1", json=body, headers=headers)
    assert_invalid(answer, "verbose", "query")
    assert "unknown parameter" in answer.json()["error"]


# ---- item 6: NUL characters, in both modes ---------------------------------------------------------


@pytest.fixture(params=["embedded", "postgresql"])
async def admin_client(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    if request.param == "embedded":
        async with running(make_settings(BOOTSTRAP_ADMIN_KEY=ADMIN_KEY)) as client:
            yield client
        return
    async with pg_schema() as (dsn, schema):
        settings = make_settings(
            DATABASE_URL=dsn,
            DATABASE_SCHEMA=schema,
            BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
            AUDIT_SPOOL_DIR=str(tmp_path / "spool"),
            **TEST_SECRETS,
        )
        async with running(settings) as client:
            yield client


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The engine in process, called with the bootstrap admin key."""
    app = create_app(settings)
    for step in app.lifecycle.startup:
        await step()
    try:
        transport = httpx.ASGITransport(app=app)
        headers = {"X-API-Key": ADMIN_KEY}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://engine.test", headers=headers
        ) as client:
            yield client
    finally:
        for step in reversed(app.lifecycle.shutdown):
            await step()


async def test_a_nul_in_an_event_type_is_a_400_naming_the_field(admin_client: httpx.AsyncClient) -> None:
    answer = await admin_client.put(
        "/api/v1/admin/events/AAPL",
        json={
            "events": [
                {"date": "2030-01-02", "type": "earnings"},
                {"date": "2030-02-03", "type": "split\x00"},
            ]
        },
    )
    body = assert_invalid(answer, "events[1].type", "body")
    assert "NUL" in body["error"]
    assert "SQLSTATE" not in answer.text
    # Nothing was stored: the same ticker's events are still writable and read back without it.
    fine = await admin_client.put("/api/v1/admin/events/AAPL", json={"events": [{"date": "2030-01-02"}]})
    assert fine.status_code == 200, fine.text


async def test_a_nul_in_a_path_field_is_a_400_naming_it(admin_client: httpx.AsyncClient) -> None:
    client_body = {"markup_percentage": 1, "transaction_fee_type": "FLAT", "transaction_amount": 1}
    assert_invalid(
        await admin_client.put("/api/v1/admin/clients/abc%00d", json=client_body), "client_id", "path"
    )
    assert_invalid(
        await admin_client.put("/api/v1/admin/stocks/AB%00", json={"min_borrow_rate": 0.01}), "ticker", "path"
    )


async def test_a_nul_in_an_availability_file_is_a_400_naming_its_line(
    admin_client: httpx.AsyncClient,
) -> None:
    # Line 4 is the second data row; its NAME holds a NUL.
    text = synthetic_ibkr(["AAA|USD|A CORP|1|X|0|1.5|1000|", "BBB|USD|B\x00CORP|1|X|0|2.5|2000|"])
    answer = await admin_client.post(
        "/api/v1/admin/availability", content=text.encode(), headers={"Content-Type": "text/plain"}
    )
    body = assert_invalid(answer, "line 4", "body")
    assert body["details"] == {"file_type": "ibkr", "line": 4}
    assert "NUL" in body["error"]
    assert "SQLSTATE" not in answer.text
