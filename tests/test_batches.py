"""Batches in both forms (DESIGN §2.1): rows or columns, JSON or msgpack, through the HTTP API and through the
three steps of `pricer.batches` (decode, price, encode) that the endpoint runs.

The columnar and row forms give the same figures, equal to the Decimal reference; the JSON row response is
byte for byte what msgspec writes for the response Structs; malformed rows are row errors, malformed bodies
400s naming the field, never a 500.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricer.batches import (
    COLUMNS,
    ROWS,
    decode_batch,
    encode_batch_response,
    merge_errors,
    price_decoded,
)
from pricer.errors import InvalidParameter
from pricer.models import BorrowStatus, FeeType, RateSource
from pricer.quotes import PricedBatch, TickerRate
from pricer.schemas import BatchQuote, BatchResponse, Breakdown, FeeScheduleView, RowError
from pricer.validation import JSON, MSGPACK
from tests.conftest import Engine
from tests.test_api_quotes import BATCH, assert_quote_reproducible, current_rates, expected_fees
from tests.test_pricing import PROPERTY_SETTINGS, FeeCase, dec, fee_cases, plain

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)


def as_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {name: [row[name] for row in rows] for name in ("ticker", "position_value", "loan_days")}


def dollars(value: float) -> Decimal:
    return Decimal(repr(value))


# ---- the pipeline: both forms, both media, equal to Decimal ------------------------------------------------


def ticker_rate(ticker: str, rate_units: int) -> TickerRate:
    return TickerRate(
        ticker=ticker,
        rate_units=rate_units,
        base_rate=rate_units / 10**8,
        volatility_index=0.0,
        volatility_adjustment=0.0,
        event_risk_factor=0,
        event_adjustment=0.0,
        min_rate_units=10_000,
        borrow_status=BorrowStatus.EASY,
        source=RateSource.AVAILABILITY_FILE,
        available_shares=None,
        as_of=NOW,
    )


# The reference the column-wise encoder is checked against: the row-form response as msgspec Structs (what
# the endpoint answered before pricer.batches wrote its text column-wise).
def batch_quotes(batch: PricedBatch) -> list[BatchQuote]:
    """The `quotes` list of a batch response, built column-wise (no per-row Python arithmetic)."""
    tickers = [rate.ticker for rate in batch.rates]
    rates = [rate.rate for rate in batch.rates]
    return [
        BatchQuote(
            index=index,
            quote_id=quote_id,
            ticker=tickers[which],
            position_value=position,
            loan_days=days,
            total_fee=total,
            breakdown=Breakdown(borrow_cost=cost, markup=markup, transaction_fees=fees),
            borrow_rate_used=rates[which],
        )
        for index, quote_id, which, position, days, total, cost, markup, fees in zip(
            batch.input_index.tolist(),
            batch.quote_ids(),
            batch.rate_index.tolist(),
            (batch.position_cents / 100).tolist(),
            batch.loan_days.tolist(),
            (batch.total_fee / 100).tolist(),
            (batch.borrow_cost / 100).tolist(),
            (batch.markup / 100).tolist(),
            (batch.transaction_fees / 100).tolist(),
            strict=True,
        )
    ]


def batch_response(
    batch: PricedBatch, *, fee_schedule: FeeScheduleView, count: int, errors: list[RowError]
) -> BatchResponse:
    """The body of a batch: its priced rows and the errors of the `count` rows asked for."""
    return BatchResponse(
        client_id=batch.client_id,
        fee_schedule=fee_schedule,
        calculated_at=batch.calculated_at,
        count=count,
        priced=batch.size,
        quotes=batch_quotes(batch),
        errors=errors,
    )


def run_pipeline(body: bytes, media: str, case: FeeCase, *, msgpack_out: bool) -> tuple[bytes, Any]:
    decoded = decode_batch(body, media, max_batch_size=1000)
    rates = [
        ticker_rate(ticker, case.rates[int(ticker[1:])]) if int(ticker[1:]) < len(case.rates) else None
        for ticker in decoded.tickers
    ]
    schedule = case.schedule
    view = FeeScheduleView(
        markup_percentage=float(plain(schedule.markup)),
        transaction_fee_type=FeeType(schedule.fee_type),
        transaction_amount=float(plain(schedule.amount)),
        day_count=schedule.day_count,
    )
    batch, unknown = price_decoded(
        decoded,
        schedule.terms_from_floats(),
        rates,
        fee_schedule=view,
        batch_id="ab" * 12,
        key_id=None,
        request_id="r",
        now=NOW,
    )
    errors = merge_errors(decoded.errors, unknown)
    encoded = encode_batch_response(decoded, batch, errors, view, msgpack=msgpack_out)
    if decoded.form == ROWS and not msgpack_out:
        # Written column-wise, yet byte for byte what msgspec writes for the response's Structs.
        reference = batch_response(batch, fee_schedule=view, count=decoded.count, errors=errors)
        assert encoded == msgspec.json.encode(reference)
    parsed = msgspec.msgpack.decode(encoded) if msgpack_out else msgspec.json.decode(encoded)
    if decoded.form == ROWS and msgpack_out:
        # Numbers written fixed-width, read back as what msgspec's own encoding reads back as.
        reference = batch_response(batch, fee_schedule=view, count=decoded.count, errors=errors)
        assert parsed == msgspec.msgpack.decode(msgspec.msgpack.encode(reference))
    return encoded, parsed


def figures(body: dict[str, Any]) -> list[tuple[int, Decimal, Decimal, Decimal, Decimal, Decimal]]:
    """(row index, total, borrow cost, markup, transaction fees, rate) of every priced row, either form."""
    if "columns" in body:
        columns = body["columns"]
        return [
            (index, *(dollars(value) for value in values))
            for index, *values in zip(
                columns["index"],
                columns["total_fee"],
                columns["borrow_cost"],
                columns["markup"],
                columns["transaction_fees"],
                columns["borrow_rate_used"],
                strict=True,
            )
        ]
    return [
        (
            quote["index"],
            dollars(quote["total_fee"]),
            dollars(quote["breakdown"]["borrow_cost"]),
            dollars(quote["breakdown"]["markup"]),
            dollars(quote["breakdown"]["transaction_fees"]),
            dollars(quote["borrow_rate_used"]),
        )
        for quote in body["quotes"]
    ]


# Eight pipelines per example (2 forms x 2 media x 2 answers): fewer examples than the core's properties.
@settings(PROPERTY_SETTINGS, max_examples=150)
@given(fee_cases(), st.data())
def test_both_forms_and_media_give_the_decimal_figures(case: FeeCase, data: st.DataObject) -> None:
    # Each row its own ticker (T<i>, priced at the case's rate i), written in any accepted spelling; some
    # rows made invalid or unknown, which every form must report alike.
    rows: list[dict[str, Any]] = [
        {
            "ticker": data.draw(st.sampled_from([f"T{i}", f"t{i}", f" T{i} "])),
            "position_value": p / 100,
            "loan_days": d,
        }
        for i, (p, d) in enumerate(zip(case.positions, case.days, strict=True))
    ]
    spoiled = data.draw(st.sets(st.integers(0, len(rows) - 1)))
    for index in spoiled:
        rows[index] = {**rows[index], **data.draw(st.sampled_from(BAD_VALUES))}
    expected = [
        (index, *fees)
        for index, (position, day, rate) in enumerate(zip(case.positions, case.days, case.rates, strict=True))
        if index not in spoiled
        for fees in [case.schedule.reference(position, dec(rate, 8), day)]
    ]
    results = {}
    for form, payload in (("rows", {"positions": rows}), ("columns", {"columns": as_columns(rows)})):
        for media, encode in ((JSON, msgspec.json.encode), (MSGPACK, msgspec.msgpack.encode)):
            body = encode({"client_id": "prop_client", **payload})
            for msgpack_out in (False, True):
                _, parsed = run_pipeline(body, media, case, msgpack_out=msgpack_out)
                results[form, media, msgpack_out] = parsed
                got = figures(parsed)
                assert [row[:5] for row in got] == [
                    (index, *(Decimal(cents) / 100 for cents in (total, cost, markup, fees)))
                    for index, cost, markup, fees, total in expected
                ]
                assert [row[5] for row in got] == [dec(case.rates[index], 8) for index, *_ in expected]
                assert sorted(e["index"] for e in parsed["errors"]) == sorted(spoiled)
                assert parsed["count"] == len(rows)
                assert parsed["priced"] == len(expected)
    all_errors = [parsed["errors"] for parsed in results.values()]
    assert all(errors == all_errors[0] for errors in all_errors)


BAD_VALUES: list[dict[str, Any]] = [
    {"ticker": "T9999"},  # unknown
    {"ticker": "A.B.C"},  # not a ticker
    {"position_value": 0.001},
    {"position_value": -1.0},
    {"loan_days": 0},
    {"loan_days": 30.5},
    {"loan_days": "30"},
]


def test_decoded_batch_counts_every_row_and_marks_the_invalid() -> None:
    body = msgspec.json.encode(
        {
            "client_id": "abc",
            "columns": {
                "ticker": ["aapl", "brk-b", "BRK.B", "!!", "AAPL"],
                "position_value": [1.5, 2, 3, 4, 5.001],
                "loan_days": [1, 2, 3.0, 4, 5],
            },
        }
    )
    decoded = decode_batch(body, JSON, max_batch_size=10)
    assert decoded.form == COLUMNS
    assert decoded.count == 5
    assert decoded.tickers == ["AAPL", "BRK.B"]  # normalised once, merged
    assert decoded.ticker_index.tolist() == [0, 1, 1, -1, -1]
    assert decoded.cents.tolist() == [150, 200, 300, 0, 0]
    assert decoded.days.tolist() == [1, 2, 3, 0, 0]
    assert [(e.index, e.field) for e in decoded.errors] == [(3, "ticker"), (4, "position_value")]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"columns": {"ticker": ["A"], "position_value": [1, 2], "loan_days": [1]}}, "columns"),
        (
            {"positions": [], "columns": {"ticker": [], "position_value": [], "loan_days": []}},
            "columns",
        ),
        ({}, "positions"),
        ({"columns": {"ticker": ["A"], "position_value": [1], "loan_days": [1], "x": []}}, "columns.x"),
    ],
)
def test_whole_request_problems_are_400_naming_the_field(payload: dict[str, Any], field: str) -> None:
    for body, media in (
        (msgspec.json.encode({"client_id": "abc", **payload}), JSON),
        (msgspec.msgpack.encode({"client_id": "abc", **payload}), MSGPACK),
    ):
        with pytest.raises(InvalidParameter) as raised:
            decode_batch(body, media, max_batch_size=10)
        assert raised.value.problems[0].field == field


# ---- over HTTP ------------------------------------------------------------------------------------------

ROWS_SENT = [
    {"ticker": "AAPL", "position_value": 100000, "loan_days": 30},  # 0 ok
    {"ticker": "ZZZZ", "position_value": 1, "loan_days": 1},  # 1 unknown ticker
    {"ticker": "brk-b", "position_value": 5000.5, "loan_days": 10},  # 2 ok (normalised)
    {"ticker": "TSLA", "position_value": 10.001, "loan_days": 10},  # 3 too many decimals
    {"ticker": "TSLA", "position_value": 10, "loan_days": 366},  # 4 days out of range
    {"ticker": "A.B.C", "position_value": 10, "loan_days": 1},  # 5 bad ticker
    {"ticker": "GME", "position_value": 2500000.25, "loan_days": 365},  # 6 ok
    {"ticker": "NVDA", "position_value": 10, "loan_days": True},  # 7 bool for int
    {"ticker": "GME", "position_value": 77777.77, "loan_days": 77},  # 8 ok
]


async def post_batch(engine: Engine, payload: dict[str, Any], *, msgpack: bool = False) -> dict[str, Any]:
    if msgpack:
        response = await engine.client.post(
            BATCH,
            content=msgspec.msgpack.encode(payload),
            headers={**engine.as_client(), "Content-Type": "application/msgpack"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/msgpack")
        decoded: dict[str, Any] = msgspec.msgpack.decode(response.content)
        return decoded
    response = await engine.client.post(BATCH, json=payload, headers=engine.as_client())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_columnar_batch_matches_the_row_form_and_reads_back(engine: Engine) -> None:
    rows_body = await post_batch(engine, {"client_id": "demo_client", "positions": ROWS_SENT})
    columns_payload = {"client_id": "demo_client", "columns": as_columns(ROWS_SENT)}
    as_json = await post_batch(engine, columns_payload)
    as_msgpack = await post_batch(engine, columns_payload, msgpack=True)
    rates = await current_rates(engine, ["AAPL", "BRK.B", "GME"])

    for body in (as_json, as_msgpack):
        assert body["status"] == "success"
        assert body["count"] == len(ROWS_SENT)
        assert body["priced"] == 4
        assert body["columns"]["index"] == [0, 2, 6, 8]
        assert body["errors"] == rows_body["errors"]
        assert body["fee_schedule"] == rows_body["fee_schedule"]
        assert set(body["rates"]) == {"AAPL", "BRK.B", "GME"}
        assert figures(body) == figures(rows_body)
        assert body["columns"]["borrow_rate_used"] == [rates[q["ticker"]] for q in rows_body["quotes"]]
        for components in body["rates"].values():
            assert set(components) >= {"base_rate", "min_rate", "borrow_status", "source", "as_of"}
    assert [(e["index"], e["error_code"], e["field"]) for e in as_json["errors"]] == [
        (1, "TICKER_NOT_FOUND", "ticker"),
        (3, "INVALID_PARAMETER", "position_value"),
        (4, "INVALID_PARAMETER", "loan_days"),
        (5, "INVALID_PARAMETER", "ticker"),
        (7, "INVALID_PARAMETER", "loan_days"),
    ]

    # Row j of the columns is the quote `batch_id + format(j, "08x")`, read back with its figures.
    batch_id = as_json["batch_id"]
    columns = as_json["columns"]
    for j, index in enumerate(columns["index"]):
        stored = await engine.client.get(f"/api/v1/quotes/{batch_id}{j:08x}", headers=engine.as_client())
        assert stored.status_code == 200, stored.text
        quote = stored.json()
        sent = ROWS_SENT[index]
        assert quote["position_value"] == sent["position_value"]
        assert quote["loan_days"] == sent["loan_days"]
        assert quote["total_fee"] == columns["total_fee"][j]
        assert quote["breakdown"] == {name: columns[name][j] for name in quote["breakdown"]}
        assert quote["borrow_rate_used"] == columns["borrow_rate_used"][j]
        assert quote["rate"] == as_json["rates"][quote["ticker"]]
        assert quote["calculated_at"] == as_json["calculated_at"]
        assert_quote_reproducible(quote)
        want = expected_fees(
            sent["position_value"], quote["borrow_rate_used"], sent["loan_days"], quote["fee_schedule"]
        )
        assert dollars(columns["total_fee"][j]) == want["total_fee"]


async def test_atomic_columnar_batch_is_refused_listing_the_rows(engine: Engine) -> None:
    response = await engine.client.post(
        BATCH,
        params={"atomic": "true"},
        json={"client_id": "demo_client", "columns": as_columns(ROWS_SENT)},
        headers=engine.as_client(),
    )
    assert response.status_code == 400, response.text
    assert [e["index"] for e in response.json()["details"]["errors"]] == [1, 3, 4, 5, 7]


async def post_raw(engine: Engine, body: bytes, media: str) -> Any:
    return await engine.client.post(
        BATCH, content=body, headers={**engine.as_client(), "Content-Type": media}
    )


async def test_out_of_range_numbers_are_row_errors(engine: Engine) -> None:
    huge = b"1" + b"0" * 400  # an integer >= 10^309: beyond any float
    rows_body = (
        b'{"client_id": "demo_client", "positions": [{"ticker": "AAPL", "position_value": 100, "loan_days": '
        + huge
        + b'}, {"ticker": "AAPL", "position_value": 1e999, "loan_days": 5}, '
        b'{"ticker": "AAPL", "position_value": ' + huge + b', "loan_days": 5}, '
        b'{"ticker": "AAPL", "position_value": 100, "loan_days": 5}]}'
    )
    columns_body = (
        b'{"client_id": "demo_client", "columns": {"ticker": ["AAPL", "AAPL", "AAPL", "AAPL"], '
        b'"position_value": [100, 1e999, ' + huge + b", 100], "
        b'"loan_days": [' + huge + b", 5, 5, 5]}}"
    )
    for body in (rows_body, columns_body):
        response = await post_raw(engine, body, "application/json")
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["priced"] == 1
        assert [(e["index"], e["field"]) for e in answer["errors"]] == [
            (0, "loan_days"),
            (1, "position_value"),
            (2, "position_value"),
        ]


async def test_deeply_nested_positions_are_400_naming_the_field(engine: Engine) -> None:
    depth = 1_000
    as_json = b'{"client_id": "demo_client", "positions": [' + b"[" * depth + b"]" * depth + b"]}"
    as_msgpack = (
        b"\x82"
        + msgspec.msgpack.encode("client_id")
        + msgspec.msgpack.encode("demo_client")
        + msgspec.msgpack.encode("positions")
        + b"\x91" * depth
        + b"\xc0"
    )
    columns = b'{"client_id": "demo_client", "columns": {"ticker": ' + b"[" * depth + b"]" * depth + b"}}"
    for body, media, field in (
        (as_json, "application/json", "positions[0]"),
        (as_msgpack, "application/msgpack", "positions[0]"),
        (columns, "application/json", "columns.ticker[0]"),
    ):
        response = await post_raw(engine, body, media)
        assert response.status_code == 400, response.text
        problems = response.json()["validation_errors"]
        assert problems[0]["field"] == field, problems
