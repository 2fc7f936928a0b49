"""The Python client (clients/python, `pricer_client`) against a real engine on loopback: every call, every
error code, the 429 retried after Retry-After, token refresh, pacing, and money as exact Decimals."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pricer.errors as engine_errors
from pricer.middleware.errors import error_body, error_headers
from pricer_client import (
    AdminClient,
    AsyncAdminClient,
    AsyncPricerClient,
    ClientNotFound,
    Event,
    Forbidden,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Position,
    PricerClient,
    RateLimited,
    TickerNotFound,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
)
from pricer_client import calls as client_calls
from pricer_client.errors import ERRORS_BY_CODE, error_for
from tests.conftest import RunningServer, free_port, start_server, stop_server
from tests.decimal_reference import reference_fee, reference_rate
from tests.shared_data import SHARED_DATA

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "clients" / "python"
CENT = Decimal("0.01")
# Small enough that a batch of a few thousand rows is refused with 413.
BATCH_BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("client-engine"),
        RATE_LIMIT_PER_MINUTE="1000000",
        JWT_TTL_SECONDS="60",
        MAX_BATCH_BODY_BYTES=str(BATCH_BODY_LIMIT),
    )
    try:
        yield running
    finally:
        stop_server(running)


def client_key(server: RunningServer) -> str:
    return server.keys["DEMO_CLIENT_KEY"]


def admin_key(server: RunningServer) -> str:
    return server.keys["DEMO_ADMIN_KEY"]


def has_at_most_two_places(value: Decimal) -> bool:
    exponent = value.as_tuple().exponent
    return isinstance(exponent, int) and exponent >= -2


# ---- every call --------------------------------------------------------------------------------------


def test_quote_rate_rates_and_get_quote(server: RunningServer) -> None:
    with PricerClient(server.base_url, client_key(server)) as pricer:
        assert pricer.health().status == "healthy"
        quote = pricer.quote("aapl", Decimal("100000"), 30, "demo_client")
        assert (quote.ticker, quote.client_id, quote.loan_days) == ("AAPL", "demo_client", 30)
        assert quote.position_value == Decimal("100000")
        breakdown = quote.breakdown
        assert quote.total_fee == breakdown.borrow_cost + breakdown.markup + breakdown.transaction_fees
        assert pricer.get_quote(quote.quote_id) == quote

        rate = pricer.rate("GME")
        assert (rate.ticker, rate.borrow_status, rate.source) == ("GME", "HARD", "availability_file")
        listed = pricer.rates(["AAPL", "BRK-B", "GME", "ZZZZZ"])
        assert [r.ticker for r in listed.rates] == ["AAPL", "BRK.B", "GME"]
        assert [(e.ticker, e.error_code) for e in listed.errors] == [("ZZZZZ", "TICKER_NOT_FOUND")]
        assert next(r for r in listed.rates if r.ticker == "GME").current_rate == rate.current_rate
        # The rate is reproducible from its own components, exactly (DESIGN §3).
        for each in [*listed.rates, rate]:
            expected = reference_rate(
                each.base_rate, each.volatility_index, each.event_risk_factor, each.min_rate
            )
            assert each.current_rate == expected, each


def test_batch_rows_columns_and_atomic(server: RunningServer) -> None:
    rows: list[client_calls.PositionLike] = [
        Position("TSLA", Decimal("50000"), 10),
        ("AMC", Decimal("1001.01"), 365),
        {"ticker": "ZZZZZ", "position_value": 10, "loan_days": 1},
        ("GME", 250_000, 0),
    ]
    with PricerClient(server.base_url, client_key(server)) as pricer:
        result = pricer.batch("demo_client", rows)
        assert (result.count, result.priced) == (4, 2)
        assert [(e.index, e.error_code, e.field) for e in result.errors] == [
            (2, "TICKER_NOT_FOUND", "ticker"),
            (3, "INVALID_PARAMETER", "loan_days"),
        ]
        columns = result.columns()
        assert len(columns) == 2
        assert columns.index == [0, 1]
        assert columns.ticker == ["TSLA", "AMC"]
        assert columns.position_value == [Decimal("50000"), Decimal("1001.01")]
        assert columns.total_fee == [q.total_fee for q in result.quotes]
        assert pricer.get_quote(columns.quote_id[1]).total_fee == columns.total_fee[1]

        # The same positions given as columns price the same.
        as_columns = pricer.batch(
            "demo_client",
            {
                "ticker": ["TSLA", "AMC"],
                "position_value": [Decimal("50000"), "1001.01"],
                "loan_days": [10, 365],
            },
        )
        assert as_columns.columns().total_fee == columns.total_fee

        arrays = columns.to_numpy()
        assert arrays["total_fee_cents"].tolist() == [int(fee * 100) for fee in columns.total_fee]
        assert arrays["index"].dtype.name == "int64"

        with pytest.raises(InvalidParameter) as refused:
            pricer.batch("demo_client", rows, atomic=True)
        assert refused.value.details["invalid_rows"] == 2
        fields = [problem.field for problem in refused.value.validation_errors]
        assert fields == ["positions[2].ticker", "positions[3].loan_days"]


def test_a_large_batch_goes_as_msgpack_and_answers_exact_decimals(server: RunningServer) -> None:
    count = 1200
    columns = {
        "ticker": ["AAPL", "GME", "BRK B"] * (count // 3),
        "position_value": [Decimal("5.01"), Decimal("123456789.99"), Decimal("0.07")] * (count // 3),
        "loan_days": [1, 365, 30] * (count // 3),
    }
    with PricerClient(server.base_url, client_key(server), msgpack_threshold=1000) as pricer:
        call = client_calls.batch("demo_client", columns, msgpack_threshold=1000)
        assert call.content_type == client_calls.MSGPACK
        result = pricer.batch("demo_client", columns)
    assert result.priced == count
    assert [q.position_value for q in result.quotes[:3]] == [
        Decimal("5.01"),
        Decimal("123456789.99"),
        Decimal("0.07"),
    ]
    assert str(result.quotes[0].position_value) == "5.01"
    for quote in result.quotes:
        assert all(
            has_at_most_two_places(value)
            for value in (quote.total_fee, quote.breakdown.borrow_cost, quote.breakdown.markup)
        )


def test_admin_calls(tmp_path: Path) -> None:
    # An engine of its own: the uploads replace the market data in force.
    server = start_server(tmp_path, RATE_LIMIT_PER_MINUTE="1000000")
    try:
        with AdminClient(server.base_url, admin_key(server)) as admin:
            created = admin.put_client(
                "desk_7",
                markup_percentage=Decimal("2.5"),
                transaction_fee_type="PERCENTAGE",
                transaction_amount=Decimal("0.0125"),
                day_count=360,
                rate_limit_per_minute=600,
                burst=30,
            )
            assert (created.client_id, created.markup_percentage, created.transaction_amount) == (
                "desk_7",
                Decimal("2.5"),
                Decimal("0.0125"),
            )
            assert (created.rate_limit_per_minute, created.burst, created.day_count) == (600, 30, 360)
            stock = admin.put_stock("ACME", min_borrow_rate=Decimal("0.0333"), borrow_status="MEDIUM")
            assert (stock.ticker, stock.min_borrow_rate, stock.borrow_status) == (
                "ACME",
                Decimal("0.0333"),
                "MEDIUM",
            )
            volatility = admin.put_volatility(Decimal("23.4"))
            assert volatility.value == Decimal("23.4")
            events = admin.put_events(
                "ACME", [Event(date=dt.date.today() + dt.timedelta(days=3), risk_factor=7)]
            )
            assert [(e.type, e.risk_factor) for e in events.events] == [("earnings", 7)]

            availability = admin.upload_availability((SHARED_DATA / "ibkr_usa_2022-08-06.txt").read_bytes())
            assert availability.rows > 1000
            assert availability.in_force
            vix = admin.upload_vix((SHARED_DATA / "VIX_History.csv").read_text())
            assert vix.kind == "vix"
            assert vix.rows > 1000
            earnings = admin.upload_earnings(
                (SHARED_DATA / "alphavantage_earnings_calendar_2024-06-21.csv").read_text()
            )
            assert earnings.kind == "earnings"
            assert earnings.detail["tickers"] > 100

            issued = admin.issue_key("desk_7", scopes=["quote"], expires_in_days=5)
            assert issued.client_id == "desk_7"
            assert issued.scopes == ["quote"]
            # The admin key quotes for any client; the new key for its own, with the new fee schedule.
            with PricerClient(server.base_url, issued.api_key) as desk:
                quote = desk.quote("ACME", Decimal("1000000"), 90, "desk_7")
                assert quote.fee_schedule.transaction_fee_type == "PERCENTAGE"
                assert quote.breakdown.transaction_fees == Decimal("125")
                with pytest.raises(Forbidden):
                    desk.rate("ACME")  # no `rates` scope
                admin.revoke_key(issued.key_id)
                with pytest.raises(Unauthorized):
                    desk.quote("ACME", 1000, 1, "desk_7")
            with pytest.raises(InvalidParameter) as damaged:
                admin.upload_availability("#BOF|2030.01.01|00:00:00\nnot a row\n")
            assert damaged.value.details["line"] >= 1
    finally:
        stop_server(server)


@pytest.mark.anyio
async def test_the_async_clients(server: RunningServer) -> None:
    async with AsyncPricerClient(server.base_url, client_key(server), use_token=True) as pricer:
        quote = await pricer.quote("GME", Decimal("250000.01"), 7, "demo_client")
        assert quote.position_value == Decimal("250000.01")
        assert await pricer.get_quote(quote.quote_id) == quote
        assert (await pricer.rate("GME")).current_rate == quote.borrow_rate_used
        assert [r.ticker for r in (await pricer.rates(["AAPL"])).rates] == ["AAPL"]
        result = await pricer.batch("demo_client", [("AAPL", 1000, 30)])
        assert result.quotes[0].ticker == "AAPL"
        assert pricer.tokens_fetched == 1
        with pytest.raises(TickerNotFound):
            await pricer.quote("ZZZZZ", 100, 1, "demo_client")
    async with AsyncAdminClient(server.base_url, admin_key(server)) as admin:
        stock = await admin.put_stock("XYZW", min_borrow_rate=Decimal("0.05"))
        assert stock.min_borrow_rate == Decimal("0.05")
        issued = await admin.issue_key("demo_client")
        await admin.revoke_key(issued.key_id)


# ---- errors ------------------------------------------------------------------------------------------


def test_every_error_the_engine_answers_over_http_is_its_own_exception(server: RunningServer) -> None:
    with PricerClient(server.base_url, client_key(server)) as pricer:
        with pytest.raises(InvalidParameter) as invalid:
            pricer.quote("AAPL", Decimal("100.001"), 0, "demo_client")
        assert invalid.value.status == 400
        assert invalid.value.request_id
        assert {p.field for p in invalid.value.validation_errors} >= {"loan_days"}
        assert "loan_days" in invalid.value.valid_params
        with pytest.raises(Forbidden) as forbidden:
            pricer.quote("AAPL", 100, 1, "xyz123")
        assert forbidden.value.status == 403
        with pytest.raises(TickerNotFound) as unknown:
            pricer.quote("ZZZZZ", 100, 1, "demo_client")
        assert unknown.value.details == {"ticker": "ZZZZZ"}
        with pytest.raises(NotFound) as no_quote:
            pricer.get_quote("0" * 32)
        assert type(no_quote.value) is NotFound
        assert no_quote.value.error_code == "NOT_FOUND"
        with pytest.raises(MethodNotAllowed):
            pricer.call(client_calls.Call("DELETE", "/api/v1/rates/AAPL", client_calls._no_body))
        with pytest.raises(UnsupportedMediaType):
            pricer.call(
                client_calls.Call(
                    "POST",
                    "/api/v1/calculate-locate",
                    client_calls._no_body,
                    content=b"x",
                    content_type="text/xml",
                )
            )
        with pytest.raises(PayloadTooLarge) as too_large:
            pricer.batch("demo_client", [("AAPL", Decimal("1000.01"), 30)] * 5000)
        assert too_large.value.details["max_bytes"] == BATCH_BODY_LIMIT
    with PricerClient(server.base_url, admin_key(server)) as admin, pytest.raises(ClientNotFound):
        admin.quote("AAPL", 100, 1, "nobody_here")
    with (
        PricerClient(server.base_url, "bre_abcdefgh_" + "x" * 40) as stranger,
        pytest.raises(Unauthorized) as no,
    ):
        stranger.rate("AAPL")
    assert no.value.request_id
    assert no.value.status == 401


def every_engine_error() -> list[engine_errors.PricerError]:
    """One instance of each class of the engine's error tree (so that a new code fails this test)."""
    made: list[engine_errors.PricerError] = [
        engine_errors.InvalidParameter.for_field("loan_days", "expected an integer"),
        engine_errors.DataFileError("ibkr", 3, "bad row"),
        engine_errors.Unauthorized(),
        engine_errors.TickerNotFound("ZZZZZ"),
        engine_errors.ClientNotFound("nobody"),
        engine_errors.MethodNotAllowed(["GET"]),
        engine_errors.PayloadTooLarge(1024),
        engine_errors.UnsupportedMediaType("text/xml", ["application/json"]),
        engine_errors.RateLimitExceeded(7),
        engine_errors.BackendServiceFailed("calculation-service", "ConnectFailed"),
        engine_errors.BackendServiceTimeout("calculation-service", 2.0),
        engine_errors.BackendServiceUnavailable("data-service", 7.2),
    ]
    for cls in _subclasses(engine_errors.PricerError):
        if cls.__init__ is engine_errors.PricerError.__init__:
            made.append(cls("something failed"))
    classes = {type(error) for error in made}
    assert classes == _subclasses(engine_errors.PricerError), "an engine error class this test cannot build"
    return made


def _subclasses(cls: type[engine_errors.PricerError]) -> set[type[engine_errors.PricerError]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


def test_every_error_code_of_the_engine_maps_to_its_exception() -> None:
    """The engine's own edge renders each error of its tree; the client reads each back as the exception of
    that code, with the request id, the details, and Retry-After where the engine sends it."""
    for error in every_engine_error():
        headers = httpx.Headers(
            [(name.decode(), value.decode()) for name, value in error_headers(error)]
            + [("x-request-id", "r1")]
        )
        raised = error_for(error.status, error_body(error, "r1"), headers)
        assert type(raised) is ERRORS_BY_CODE[error.code], error.code
        assert (raised.status, raised.error_code, raised.request_id) == (error.status, error.code, "r1")
        if isinstance(error, engine_errors.RateLimitExceeded):
            assert isinstance(raised, RateLimited)
            assert raised.retry_after == 7
        if isinstance(error, engine_errors.InvalidParameter):
            assert isinstance(raised, InvalidParameter)
            assert raised.validation_errors
    # A response that is not the envelope (a proxy's page) is still an error, never a crash.
    assert error_for(502, b"<html>bad gateway</html>", httpx.Headers()).status == 502
    assert isinstance(error_for(429, b"slow down", httpx.Headers({"retry-after": "3"})), RateLimited)


# ---- rate limits -------------------------------------------------------------------------------------


def slow_client_key(server: RunningServer, client_id: str, per_minute: int, burst: int) -> str:
    with AdminClient(server.base_url, admin_key(server)) as admin:
        admin.put_client(
            client_id,
            markup_percentage=5,
            transaction_fee_type="FLAT",
            transaction_amount=25,
            rate_limit_per_minute=per_minute,
            burst=burst,
        )
        return admin.issue_key(client_id).api_key


def test_a_429_is_retried_after_retry_after_within_the_budget(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    key = slow_client_key(server, "slow_desk", per_minute=60, burst=1)
    with PricerClient(server.base_url, key, retry_budget=0) as impatient:
        impatient.quote("AAPL", 1000, 1, "slow_desk")
        assert impatient.limits.remaining == 0
        assert impatient.limits.limit == 60
        assert impatient.limits.burst == 1
        with pytest.raises(RateLimited) as limited:
            impatient.quote("AAPL", 1000, 1, "slow_desk")
        assert limited.value.retry_after == 1
        assert limited.value.request_id
    time.sleep(1.1)
    caplog.set_level(logging.INFO, logger="pricer_client")
    with PricerClient(server.base_url, key, retry_budget=10) as patient:
        patient.quote("AAPL", 1000, 1, "slow_desk")
        started = time.monotonic()
        quote = patient.quote("AAPL", 1000, 1, "slow_desk")  # refused once, then priced
        assert time.monotonic() - started >= 0.9
        assert quote.ticker == "AAPL"
    retries = [r.getMessage() for r in caplog.records if r.name == "pricer_client"]
    assert any("429 RATE_LIMIT_EXCEEDED in 1.0 s" in line for line in retries), retries


def test_pacing_keeps_the_client_under_its_limit(server: RunningServer) -> None:
    key = slow_client_key(server, "paced_desk", per_minute=120, burst=2)
    # No retries: a single 429 would raise. Pacing waits for the tokens instead.
    with PricerClient(server.base_url, key, retry_budget=0, pace=True) as paced:
        started = time.monotonic()
        for _ in range(5):
            paced.quote("AAPL", 1000, 1, "paced_desk")
        elapsed = time.monotonic() - started
    # Two from the burst, then one each half second.
    assert elapsed >= 1.2, elapsed


# ---- tokens ------------------------------------------------------------------------------------------


def test_a_bearer_token_is_fetched_once_and_refreshed_before_expiry(server: RunningServer) -> None:
    # The engine's tokens live 60 s here; refreshing 59 s early makes each one good for a second.
    with PricerClient(server.base_url, client_key(server), use_token=True, token_refresh_margin=59) as pricer:
        pricer.rate("AAPL")
        pricer.rate("GME")
        assert pricer.tokens_fetched == 1
        time.sleep(1.2)
        pricer.rate("AAPL")
        assert pricer.tokens_fetched == 2
    # A revoked key voids its tokens: the client tries one new token, then gives up with Unauthorized.
    with AdminClient(server.base_url, admin_key(server)) as admin:
        issued = admin.issue_key("demo_client")
        with PricerClient(server.base_url, issued.api_key, use_token=True) as pricer:
            pricer.rate("AAPL")
            admin.revoke_key(issued.key_id)
            with pytest.raises(Unauthorized):
                pricer.rate("AAPL")


def test_a_token_given_as_is(server: RunningServer) -> None:
    token = httpx.post(
        f"{server.base_url}/api/v1/auth/token", headers={"X-API-Key": client_key(server)}
    ).json()["access_token"]
    with PricerClient(server.base_url, token=token) as pricer:
        assert pricer.rate("AAPL").ticker == "AAPL"


# ---- money -------------------------------------------------------------------------------------------

positions = st.lists(
    st.tuples(
        st.sampled_from(["AAPL", "GME", "TSLA", "AMC", "BRK.B"]),
        st.integers(min_value=1, max_value=100_000_000_000).map(lambda cents: Decimal(cents) / 100),
        st.integers(min_value=1, max_value=365),
    ),
    min_size=1,
    max_size=12,
)


@pytest.fixture(scope="module")
def money_clients(server: RunningServer) -> Iterator[dict[int, PricerClient]]:
    """Clients (admin key: any client) sending every batch as msgpack (threshold 1) or as JSON."""
    with (
        PricerClient(server.base_url, admin_key(server), msgpack_threshold=1) as msgpack,
        PricerClient(server.base_url, admin_key(server), msgpack_threshold=1_000_000) as json_client,
    ):
        yield {1: msgpack, 1_000_000: json_client}


@pytest.mark.parametrize("msgpack_threshold", [1, 1_000_000], ids=["msgpack", "json"])
@settings(max_examples=25)
@given(rows=positions)
def test_money_is_exact_decimal_as_the_reference(
    money_clients: dict[int, PricerClient], msgpack_threshold: int, rows: list[tuple[str, Decimal, int]]
) -> None:
    pricer = money_clients[msgpack_threshold]
    client_id = "pct_client" if len(rows) % 2 else "demo_client"
    result = pricer.batch(client_id, rows)
    schedule = result.fee_schedule
    assert result.priced == len(rows)
    for quote, (_ticker, value, days) in zip(result.quotes, rows, strict=True):
        assert quote.position_value == value
        borrow_cost, markup, fees, total = reference_fee(
            value,
            quote.borrow_rate_used,
            days,
            schedule.day_count,
            schedule.markup_percentage,
            schedule.transaction_fee_type,
            schedule.transaction_amount,
        )
        assert (quote.breakdown.borrow_cost, quote.breakdown.markup) == (borrow_cost, markup)
        assert (quote.breakdown.transaction_fees, quote.total_fee) == (fees, total)
        assert has_at_most_two_places(quote.total_fee)


def test_five_oh_one_stays_five_oh_one(server: RunningServer) -> None:
    raw = httpx.post(
        f"{server.base_url}/api/v1/calculate-locate",
        headers={"X-API-Key": client_key(server)},
        json={"ticker": "AMC", "position_value": 5.01, "loan_days": 365, "client_id": "demo_client"},
    ).text
    with PricerClient(server.base_url, client_key(server)) as pricer:
        quote = pricer.quote("AMC", Decimal("5.01"), 365, "demo_client")
        assert str(quote.position_value) == "5.01"
        # Every number is the Decimal of the text the engine wrote, digit for digit.
        sent = json.loads(raw, parse_float=Decimal)
        assert quote.breakdown.borrow_cost == sent["breakdown"]["borrow_cost"]
        assert str(quote.rate.base_rate) == str(sent["rate"]["base_rate"])
        assert str(quote.borrow_rate_used) == str(sent["borrow_rate_used"])
        # A float given by the caller is taken by its text, never by its binary value.
        assert pricer.quote("AMC", 5.01, 365, "demo_client").position_value == Decimal("5.01")


# ---- connections -------------------------------------------------------------------------------------


def test_a_read_is_resent_once_after_a_broken_connection_a_quote_is_not() -> None:
    """A listener that accepts and closes every connection at once: a read is sent twice and then fails;
    a quote is sent once (it could have been priced) and fails."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            connection.recv(65536)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with PricerClient(f"http://127.0.0.1:{port}", "bre_abcdefgh_" + "x" * 40) as pricer:
            with pytest.raises(TransportError):
                pricer.rate("AAPL")
            assert len(accepted) == 2
            with pytest.raises(TransportError):
                pricer.quote("AAPL", 100, 1, "demo_client")
            assert len(accepted) == 3
    finally:
        listener.close()
    # Nothing listening: the connection is never made, so even a quote may try again.
    with (
        PricerClient(f"http://127.0.0.1:{free_port()}", "k", timeout=2) as pricer,
        pytest.raises(TransportError),
    ):
        pricer.quote("AAPL", 100, 1, "demo_client")


# ---- packaging and the README ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_client_installs_with_httpx_and_msgspec_only(tmp_path: Path) -> None:
    """`pip install ./clients/python` (resolved, not installed: --dry-run --report) brings the client, httpx,
    msgspec and their own dependencies, nothing of the engine's."""
    report_path = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report_path),
            str(CLIENT_DIR),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(report_path.read_text())
    installed = {item["metadata"]["name"].lower().replace("_", "-"): item for item in report["install"]}
    client = installed["pricer-client"]["metadata"]
    roots = {
        re.split(r"[ ;<>=!~\[]", dep, maxsplit=1)[0].lower()
        for dep in client["requires_dist"]
        if "extra ==" not in dep
    }
    assert roots == {"httpx", "msgspec"}
    # Everything else is httpx's or msgspec's (transitively).
    reachable = {"pricer-client"}
    frontier = list(roots)
    while frontier:
        name = frontier.pop()
        if name in reachable or name not in installed:
            continue
        reachable.add(name)
        for dep in installed[name]["metadata"].get("requires_dist", []):
            if "extra ==" not in dep:
                frontier.append(re.split(r"[ ;<>=!~\[(]", dep, maxsplit=1)[0].lower().replace("_", "-"))
    assert set(installed) == reachable, set(installed) - reachable
    assert not {"starlette", "numpy", "uvicorn", "borrow-rate-engine"} & set(installed)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python client", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_is_ten_lines_and_runs_against_the_engine(server: RunningServer) -> None:
    example = readme_example()
    assert len(example.strip().splitlines()) <= 12
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICER_")}
    env.update(server.keys)  # DEMO_CLIENT_KEY, DEMO_ADMIN_KEY and PRICER_URL, as `. ./.demo-keys.env` sets
    result = subprocess.run(
        [sys.executable, "-c", example], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"AAPL 30 days: total fee \d+\.\d{1,2}", result.stdout), result.stdout


def test_results_are_msgspec_structs_that_encode_back_to_json(server: RunningServer) -> None:
    with PricerClient(server.base_url, client_key(server)) as pricer:
        quote = pricer.quote("AAPL", Decimal("100000"), 30, "demo_client")
    # Decimals encode as strings by default: the figures survive a round trip through JSON exactly.
    encoded: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(quote))
    assert encoded["total_fee"] == str(quote.total_fee)
    assert msgspec.json.decode(msgspec.json.encode(quote), type=type(quote)) == quote


@pytest.mark.slow
def test_a_503_is_retried_until_the_database_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A private PostgreSQL is stopped; a key the engine has not seen yet needs the key store: 503 with
    Retry-After. The client waits and sends again until the database is back, within its budget."""
    from tests.private_postgres import PrivatePostgres
    from tests.test_postgres_engine import start_engine

    bootstrap = "bre_clientboot01_" + "B" * 40
    with PrivatePostgres() as pg:
        server = start_engine(
            tmp_path,
            {
                "DATABASE_URL": pg.dsn,
                "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
                "SHUTDOWN_DRAIN_SECONDS": "0",
                "BOOTSTRAP_ADMIN_KEY": bootstrap,
            },
        )
        try:
            with AdminClient(server.base_url, bootstrap) as admin:
                admin.put_stock("ACME", min_borrow_rate=Decimal("0.02"))
                fresh = admin.issue_key("admin", scopes=["rates"]).api_key
            pg.stop("fast")
            restart = threading.Timer(3.0, pg.start)
            restart.start()
            caplog.set_level(logging.INFO, logger="pricer_client")
            try:
                with PricerClient(server.base_url, fresh, retry_budget=60) as pricer:
                    rate = pricer.rate("ACME")
                assert (rate.ticker, rate.base_rate) == ("ACME", Decimal("0.02"))
            finally:
                restart.join()
            retries = [r.getMessage() for r in caplog.records if r.name == "pricer_client"]
            assert any("503 SERVICE_UNAVAILABLE" in line for line in retries), retries
        finally:
            stop_server(server)


def test_a_success_that_is_not_the_engines_answer_is_an_error_not_a_crash() -> None:
    """A proxy that answers 200 with a page of its own: `UnexpectedResponse` naming the call."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    page = b"<html>captive portal</html>"

    def serve() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
            + f"Content-Length: {len(page)}\r\n\r\n".encode()
            + page
        )
        connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        with (
            PricerClient(f"http://127.0.0.1:{port}", "k") as pricer,
            pytest.raises(UnexpectedResponse) as odd,
        ):
            pricer.rate("AAPL")
        assert odd.value.status == 200
        assert "/api/v1/rates/AAPL" in odd.value.message
    finally:
        listener.close()
        thread.join(timeout=5)
