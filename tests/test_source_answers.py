"""Live sources (issue 20 point 4), fast and in process: each provider answer the engine must refuse, and one
provider's calls (deadline, retries, circuit breaker, metrics, logs) against the real simulator process."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path

import pytest

from pricer.marketdata.providers import events, lender, volatility
from pricer.marketdata.providers.calls import Provider, ProviderFailure
from pricer.marketdata.providers.validation import (
    BadAnswer,
    borrow_status,
    lender_rate,
    market_events,
    volatility_reading,
)
from pricer.models import BorrowStatus, MarketEvent
from pricer.observability.metrics import Metrics
from pricer.outbound.breaker import BreakerState
from tests.sources_sim import Sim, running_simulator

pytestmark = pytest.mark.anyio

KEY = "sim-answers-key-7b2c41d9e0"
MAX = Decimal(10)
lender_answer = partial(lender_rate, max_rate=MAX)


# ---- answers, one by one -------------------------------------------------------------------------


def test_good_answers_are_read_exactly() -> None:
    assert lender_answer(200, b'{"rate": 0.15, "status": "HARD"}') == (0.15, BorrowStatus.HARD)
    assert lender_answer(200, b'{"rate": 0.0025, "status": "EASY_TO_BORROW"}') == (0.0025, BorrowStatus.EASY)
    assert lender_answer(404, b'{"error": "unknown"}') is None
    value, as_of = volatility_reading(200, b'{"value": 20.5, "timestamp": "2026-12-04T14:30:00Z"}')
    assert (value, as_of) == (20.5, dt.datetime(2026, 12, 4, 14, 30, tzinfo=dt.UTC))
    assert market_events(
        200, b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": 7}]}'
    ) == [MarketEvent(date=dt.date(2026, 12, 8), type="earnings", risk_factor=7)]
    assert (
        market_events(200, b'{"events": [{"type": "earnings", "date": "2026-12-08"}]}')[0].risk_factor is None
    )


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("EASY", BorrowStatus.EASY),
        ("easy_to_borrow", BorrowStatus.EASY),
        ("MEDIUM", BorrowStatus.MEDIUM),
        ("MEDIUM_TO_BORROW", BorrowStatus.MEDIUM),
        ("HARD_TO_BORROW", BorrowStatus.HARD),
        ("SOMETHING_ELSE", BorrowStatus.HARD),
        (None, BorrowStatus.HARD),
    ],
)
def test_lender_statuses(raw: str | None, status: BorrowStatus) -> None:
    assert borrow_status(raw) == status


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, b"<html><body>502 Bad Gateway</body></html>", "not JSON"),
        (200, b"rate=0.15", "not JSON"),
        (200, b"[0.15]", "not a JSON object"),
        (200, b'{"rate": "0.15", "status": "HARD"}', "not a number"),
        (200, b'{"rate": true}', "not a number"),
        (200, b'{"status": "HARD"}', "rate missing"),
        (200, b'{"rate": NaN}', "not JSON"),
        (200, b'{"rate": Infinity}', "not JSON"),
        (200, b'{"rate": 1e999}', "not JSON"),
        # An integer past float range: OverflowError, not a refusal, aborted the whole lender refresh.
        (200, b'{"rate": ' + b"9" * 400 + b"}", "not finite"),
        (200, b'{"rate": -0.05}', "negative"),
        (200, b'{"rate": 10.5}', "above MAX_BORROW_RATE"),
        (200, b'{"rate": 0.1234567890123456}', "significant digits"),
        (200, b'{"rate": 0.15, "status": 3}', "status is not a string"),
        (302, b"", "redirect"),
        (500, b"oops", "HTTP 500"),
        (401, b"", "HTTP 401"),
        (200, b'{"rate": 0.15, "pad": "' + b"x" * 70_000 + b'"}', "64 KiB"),
    ],
)
def test_bad_lender_answers_are_refused(status: int, body: bytes, reason: str) -> None:
    with pytest.raises(BadAnswer, match=reason):
        lender_answer(status, body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"timestamp": "2026-12-04T14:30:00Z"}', "value missing"),
        (b'{"value": "20.5", "timestamp": "2026-12-04T14:30:00Z"}', "not a number"),
        (b'{"value": -5.0, "timestamp": "2026-12-04T14:30:00Z"}', "outside 0-200"),
        (b'{"value": 200.5, "timestamp": "2026-12-04T14:30:00Z"}', "outside 0-200"),
        (b'{"value": 20.5}', "timestamp missing"),
        (b'{"value": 20.5, "timestamp": 1733322600}', "timestamp missing"),
        (b'{"value": 20.5, "timestamp": "yesterday"}', "not ISO-8601"),
        (b'{"value": 20.5, "timestamp": "2026-12-04T14:30:00"}', "no time zone"),
        # Valid ISO-8601 whose UTC time is outside datetime's range: OverflowError, not a refusal.
        (b'{"value": 20.5, "timestamp": "9999-12-31T23:59:59-14:00"}', "out of range"),
        (b'{"value": 20.5, "timestamp": "0001-01-01T00:00:00+14:00"}', "out of range"),
    ],
)
def test_bad_volatility_answers_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(BadAnswer, match=reason):
        volatility_reading(200, body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{}", "events missing"),
        (b'{"events": {"type": "earnings"}}', "not a list"),
        (b'{"events": [7]}', "not an object"),
        (b'{"events": [{"type": 7, "date": "2026-12-08"}]}', "type"),
        (b'{"events": [{"type": "earnings"}]}', "date missing"),
        (b'{"events": [{"type": "earnings", "date": 20261208}]}', "date missing"),
        (b'{"events": [{"type": "earnings", "date": "2026-13-08"}]}', "not YYYY-MM-DD"),
        (b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": 11}]}', "risk_factor"),
        (b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": -1}]}', "risk_factor"),
        (b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": "high"}]}', "risk_factor"),
        (b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": 7.5}]}', "risk_factor"),
    ],
)
def test_bad_event_answers_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(BadAnswer, match=reason):
        market_events(200, body)


# ---- one provider's calls against the real simulator -------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    with running_simulator(tmp_path_factory.mktemp("sim"), KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def healthy_simulator(request: pytest.FixtureRequest) -> None:
    if "sim" in request.fixturenames:
        request.getfixturevalue("sim").healthy()


def provider(
    sim: Sim, name: str = "lender", *, timeout: float = 0.6, metrics: Metrics | None = None
) -> Provider:
    return Provider(
        name, sim.url, KEY, timeout_seconds=timeout, connections=4, metrics=metrics, breaker_open_seconds=0.5
    )


async def test_a_good_answer_carries_the_key_and_is_counted(sim: Sim) -> None:
    metrics = Metrics()
    calls = provider(sim, metrics=metrics)
    lane = asyncio.Semaphore(2)
    sim.control("PUT", "/control/lender/ZQX", {"rate": 0.1234, "status": "MEDIUM"})
    answer = await lender.fetch_rate(calls, "ZQX", lane=lane, max_rate=MAX)
    assert (answer.rate, answer.status) == (0.1234, BorrowStatus.MEDIUM)
    sim.control("DELETE", "/control/lender/ZQX")
    gone = await lender.fetch_rate(calls, "ZQX", lane=lane, max_rate=MAX)
    assert gone.rate is None
    assert metrics.external_requests[("lender", "success")] == 1
    assert metrics.external_requests[("lender", "not_found")] == 1
    vix, calendar = provider(sim, "volatility"), provider(sim, "events")
    reading = await volatility.fetch_reading(vix, lane=lane)
    assert reading.source == "volatility_api"
    assert 0 < reading.value <= 200
    assert isinstance(await events.fetch_events(calendar, "AAPL", lane=lane), list)
    without_key = Provider("lender", sim.url, None, timeout_seconds=0.6, connections=1)
    with pytest.raises(ProviderFailure, match="HTTP 401"):
        await lender.fetch_rate(without_key, "GME", lane=lane, max_rate=MAX)
    for one in (calls, vix, calendar, without_key):
        await one.aclose()


MALFORMED = {
    "html": "not JSON",
    "non_json": "not JSON",
    "wrong_types": "not a number",
    "missing_fields": "rate missing",
    "nan": "not JSON",
    "infinity": "not JSON",
    "negative": "negative",
    "too_high": "above MAX_BORROW_RATE",
    "vix_out_of_range": "above MAX_BORROW_RATE",
    "huge_body": "64 KiB",
    "redirect": "redirect",
    "drip": "no answer within",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_each_malformed_lender_answer_is_refused_counted_and_logged(
    sim: Sim, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    calls = provider(sim, metrics=metrics)
    sim.fault("lender", mode="malformed", malformed=kind)
    caplog.set_level(logging.WARNING, logger="pricer.sources")
    started = time.monotonic()
    with pytest.raises(ProviderFailure, match=MALFORMED[kind]):
        await lender.fetch_rate(calls, "GME", lane=asyncio.Semaphore(1), max_rate=MAX)
    assert time.monotonic() - started < 0.6 + 1.0  # never past the deadline (plus scheduling slack)
    expected = "timeout" if kind == "drip" else "invalid"
    assert metrics.external_requests[("lender", expected)] == 1
    records = [r for r in caplog.records if r.getMessage() == "External API error"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert KEY not in caplog.text
    await calls.aclose()


@pytest.mark.parametrize(
    ("provider_name", "kind"), [("volatility", "vix_out_of_range"), ("events", "too_high")]
)
async def test_malformed_answers_of_the_other_providers_are_refused(
    sim: Sim, provider_name: str, kind: str
) -> None:
    sim.fault(provider_name, mode="malformed", malformed=kind)
    calls = provider(sim, provider_name)
    lane = asyncio.Semaphore(1)
    call = (
        volatility.fetch_reading(calls, lane=lane)
        if provider_name == "volatility"
        else events.fetch_events(calls, "AAPL", lane=lane)
    )
    with pytest.raises(ProviderFailure):
        await call
    await calls.aclose()


async def test_errors_are_retried_within_the_deadline(sim: Sim) -> None:
    metrics = Metrics()
    calls = provider(sim, metrics=metrics, timeout=0.8)
    sim.fault("lender", mode="error", error_rate=1.0)
    started = time.monotonic()
    with pytest.raises(ProviderFailure, match="HTTP 50"):
        await lender.fetch_rate(calls, "GME", lane=asyncio.Semaphore(1), max_rate=MAX)
    assert time.monotonic() - started < 0.8 + 1.0
    assert metrics.external_requests[("lender", "error")] >= 2  # retried, with backoff, inside the deadline
    await calls.aclose()
    # Half the calls failing: a fetch's retries (4-6 attempts in 2 s) get a good answer nearly always. Each
    # fetch has a provider of its own: ten fetches' failed attempts together would open one breaker.
    sim.fault("lender", mode="error", error_rate=0.5)
    retried = Metrics()
    got = 0
    for _ in range(10):
        fresh = provider(sim, timeout=2.0, metrics=retried)
        try:
            answer = await lender.fetch_rate(fresh, "GME", lane=asyncio.Semaphore(1), max_rate=MAX)
            got += answer.rate is not None
        except ProviderFailure:
            pass  # all of a fetch's attempts failed: about 1 in 16 to 64
        finally:
            await fresh.aclose()
    # At least 6 of 10 (fewer: a chance of about 2 in 10,000), and errors were met and retried past.
    assert got >= 6, (got, retried.external_requests)
    assert retried.external_requests[("lender", "error")] >= 1
    assert retried.external_requests[("lender", "success")] == got


async def test_hangs_and_drops_fail_at_the_deadline(sim: Sim) -> None:
    for mode, reason in (("hang", "no answer within"), ("down", "broken answer|connection failed")):
        sim.fault("lender", mode=mode)
        calls = provider(sim, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ProviderFailure, match=reason):
            await lender.fetch_rate(calls, "GME", lane=asyncio.Semaphore(1), max_rate=MAX)
        assert time.monotonic() - started < 0.5 + 1.0
        await calls.aclose()


async def test_the_breaker_opens_after_five_failures_answers_at_once_and_closes_after_three_successes(
    sim: Sim,
) -> None:
    metrics = Metrics()
    calls = provider(sim, metrics=metrics, timeout=0.3)
    lane = asyncio.Semaphore(1)
    sim.fault("lender", mode="malformed", malformed="html")
    for _ in range(5):
        with pytest.raises(ProviderFailure, match="not JSON"):
            await lender.fetch_rate(calls, "GME", lane=lane, max_rate=MAX)
    assert calls.breaker.state is BreakerState.OPEN
    sim.healthy()
    started = time.monotonic()
    with pytest.raises(ProviderFailure, match="circuit open"):
        await lender.fetch_rate(calls, "GME", lane=lane, max_rate=MAX)
    assert time.monotonic() - started < 0.05
    assert metrics.external_requests[("lender", "circuit_open")] == 1
    await asyncio.sleep(0.6)  # breaker_open_seconds=0.5: a probe may go
    for _ in range(3):
        assert (await lender.fetch_rate(calls, "GME", lane=lane, max_rate=MAX)).rate is not None
    assert calls.breaker.state is BreakerState.CLOSED
    await calls.aclose()


def test_the_simulator_log_and_the_settings_repr_hold_no_key(sim: Sim, tmp_path: Path) -> None:
    from tests.conftest import make_settings

    settings = make_settings(LENDER_API_URL=sim.url, LENDER_API_KEY=KEY)
    assert KEY not in repr(settings)
    assert settings.lender_api_key == KEY


async def test_a_refresh_after_an_outage_probes_one_at_a_time_then_runs_at_full_width(sim: Sim) -> None:
    calls = provider(sim, timeout=0.3)
    lane = asyncio.Semaphore(4)
    sim.fault("lender", mode="error")
    tickers = ["AAPL", "GME", "TSLA", "MSFT", "AMC", "NVDA", "SPCE", "BYND"]
    assert await lender.fetch_rates(calls, tickers, lane=lane, max_rate=MAX) == []
    assert calls.breaker.state is BreakerState.OPEN
    assert await lender.fetch_rates(calls, tickers, lane=lane, max_rate=MAX) == []  # open: no call at all
    sim.healthy()
    await asyncio.sleep(0.6)  # past breaker_open_seconds: half-open
    answers = await lender.fetch_rates(calls, tickers, lane=lane, max_rate=MAX)
    assert [answer.ticker for answer in answers] == tickers  # every ticker refreshed in this one pass
    assert calls.breaker.state is BreakerState.CLOSED
    await calls.aclose()


async def test_a_cancelled_probe_does_not_leave_the_breaker_refusing_for_good(sim: Sim) -> None:
    calls = provider(sim, timeout=2.0)
    lane = asyncio.Semaphore(1)
    for _ in range(5):
        calls.breaker.record_failure()
    assert calls.breaker.state is BreakerState.OPEN
    await asyncio.sleep(0.6)  # half-open: the next call is the probe
    sim.fault("lender", mode="hang")
    probe = asyncio.ensure_future(lender.fetch_rate(calls, "GME", lane=lane, max_rate=MAX))
    await asyncio.sleep(0.2)
    probe.cancel()  # e.g. shutdown, or a cold fetch's task cancelled
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert calls.breaker.state is BreakerState.OPEN  # the probe failed: not a probe forever in flight
    sim.healthy()
    await asyncio.sleep(0.6)
    assert (await lender.fetch_rate(calls, "GME", lane=lane, max_rate=MAX)).rate is not None
    await calls.aclose()
