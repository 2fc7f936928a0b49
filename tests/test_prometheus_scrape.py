"""The runbook's Prometheus queries against a real Prometheus scraping a real engine (RUNBOOK "Key
Metrics", DESIGN §4).

A private `prometheus` scrapes `python -m pricer serve` every second with the example config's
relabelling (namespace/app labels as Kubernetes discovery gives them) while a little mixed traffic runs:
quotes, rates, batches, a fallback ticker, bearer tokens, bad and missing credentials, a client over its
limit, unknown paths. Then every request/auth/rate-limit query of the runbook is evaluated, as written,
through the HTTP API, and the raw exposition is checked for the exact names, labels and counts.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pricer.app import create_app
from tests.conftest import RunningServer, make_settings, start_server, stop_server
from tests.prometheus_server import APP, NAMESPACE, POD, PrivatePrometheus

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUNBOOK = Path(__file__).resolve().parent.parent.parent / "shared" / "RUNBOOK.md"
TRAFFIC_SECONDS = 8.0
LIMITED_CLIENT = "limited_client"

# The runbook's "Key Metrics" queries, verbatim (the backend_* ones need a backend service, the
# container_*/kube_* ones cAdvisor and kube-state-metrics: not this engine's exposition).
SELECTOR = 'namespace="borrow-rate-engine", app="api-gateway"'
RUNBOOK_QUERIES = {
    "Request rate": f"sum(rate(http_requests_total{{{SELECTOR}}}[5m]))",
    "Response time (p95)": (
        f"histogram_quantile(0.95, sum(rate(http_request_duration_seconds_bucket{{{SELECTOR}}}[5m])) by (le))"
    ),
    "Error rate": (
        f'sum(rate(http_requests_total{{{SELECTOR}, status_code=~"[45].*"}}[5m])) / '
        f"sum(rate(http_requests_total{{{SELECTOR}}}[5m]))"
    ),
    "Authentication success rate": (
        f'sum(rate(authentication_attempts_total{{{SELECTOR}, status="success"}}[5m])) / '
        f"sum(rate(authentication_attempts_total{{{SELECTOR}}}[5m]))"
    ),
    "Invalid API key rate": (
        f'sum(rate(authentication_attempts_total{{{SELECTOR}, status="invalid_key"}}[5m])) / '
        f"sum(rate(http_requests_total{{{SELECTOR}}}[5m]))"
    ),
    "Rate limit exceeded": (
        f"sum(rate(rate_limit_exceeded_total{{{SELECTOR}}}[5m])) / "
        f"sum(rate(http_requests_total{{{SELECTOR}}}[5m]))"
    ),
}


def route_templates() -> set[str]:
    """Every route template of the engine, as its route table has them."""
    return {route.path for route in create_app(make_settings()).routes}


AUTH_STATUSES = {"success", "invalid_key", "expired", "revoked", "missing", "invalid_token"}
BAD_KEY = "bre_aaaaaaaaaaaa_" + "Zz9" * 12  # well-formed, unknown id
GARBAGE_KEY = "not-a-key"


@dataclass
class Traffic:
    """What the driver sent and what it got back, to check the counters against."""

    statuses: Counter[int] = field(default_factory=Counter)
    singles_priced: int = 0
    batch_positions_priced: int = 0
    pricing_calls: int = 0
    fallback_positions: int = 0
    tokens_issued: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # auth failure reason -> count
    rate_limited: int = 0
    random_paths: list[str] = field(default_factory=list)


@dataclass
class Rig:
    server: RunningServer
    prometheus: PrivatePrometheus
    traffic: Traffic


def quote(ticker: str, client_id: str = "demo_client") -> dict[str, object]:
    return {"ticker": ticker, "position_value": 250000, "loan_days": 30, "client_id": client_id}


def drive_traffic(server: RunningServer, seconds: float) -> Traffic:
    traffic = Traffic()
    client_headers = {"X-API-Key": server.keys["DEMO_CLIENT_KEY"]}
    admin_headers = {"X-API-Key": server.keys["DEMO_ADMIN_KEY"]}
    with httpx.Client(base_url=server.base_url, timeout=5) as http:
        # A client with a tiny limit and a key of its own, issued through the admin API.
        put = http.put(
            f"/api/v1/admin/clients/{LIMITED_CLIENT}",
            json={
                "markup_percentage": 5,
                "transaction_fee_type": "FLAT",
                "transaction_amount": 10,
                "rate_limit_per_minute": 1,
                "burst": 1,
            },
            headers=admin_headers,
        )
        assert put.status_code in (200, 201), put.text
        issued = http.post("/api/v1/admin/keys", json={"client_id": LIMITED_CLIENT}, headers=admin_headers)
        assert issued.status_code == 201, issued.text
        limited_headers = {"X-API-Key": issued.json()["api_key"]}
        # A key revoked at once: its use is a `revoked` attempt.
        doomed = http.post("/api/v1/admin/keys", json={"client_id": "xyz123"}, headers=admin_headers).json()
        assert http.delete(f"/api/v1/admin/keys/{doomed['key_id']}", headers=admin_headers).status_code == 204
        traffic.statuses.update([200, 201, 201, 204])  # the admin calls above
        token = ""

        def send(method: str, path: str, **kwargs: object) -> httpx.Response:
            response = http.request(method, path, **kwargs)  # type: ignore[arg-type]
            traffic.statuses[response.status_code] += 1
            if response.status_code == 429:
                traffic.rate_limited += 1
            return response

        tick = 0
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            tick += 1
            for ticker in ("AAPL", "MSFT", "XYZQ"):
                response = send(
                    "POST", "/api/v1/calculate-locate", json=quote(ticker), headers=client_headers
                )
                assert response.status_code == 200, response.text
                traffic.singles_priced += 1
                traffic.pricing_calls += 1
                traffic.fallback_positions += ticker == "XYZQ"
            got = send("GET", "/api/v1/calculate-locate", params=quote("TSLA"), headers=client_headers)
            assert got.status_code == 200, got.text
            traffic.singles_priced += 1
            traffic.pricing_calls += 1
            assert send("GET", "/api/v1/rates/NVDA", headers=client_headers).status_code == 200
            listing = send("GET", "/api/v1/rates", params={"tickers": "AAPL,GME"}, headers=client_headers)
            assert listing.status_code == 200, listing.text
            if tick % 4 == 0:
                positions = [
                    {"ticker": "AAPL", "position_value": 1000, "loan_days": 3},
                    {"ticker": "ZZZZQ", "position_value": 1000, "loan_days": 3},  # unknown: not priced
                    {"ticker": "XYZQ", "position_value": 5000, "loan_days": 10},
                    {"ticker": "GME", "position_value": 7000, "loan_days": 60},
                ]
                batch = send(
                    "POST",
                    "/api/v1/calculate-locate/batch",
                    json={"client_id": "demo_client", "positions": positions},
                    headers=client_headers,
                )
                assert batch.status_code == 200, batch.text
                assert batch.json()["priced"] == 3
                traffic.batch_positions_priced += 3
                traffic.pricing_calls += 1
                traffic.fallback_positions += 1
            if tick % 3 == 0:
                for headers, reason in (
                    ({"X-API-Key": BAD_KEY}, "invalid_key"),
                    ({"X-API-Key": GARBAGE_KEY}, "invalid_key"),
                    ({}, "missing"),
                    ({"Authorization": "Bearer not.a.token"}, "invalid_token"),
                    ({"X-API-Key": doomed["api_key"]}, "revoked"),
                ):
                    assert send("GET", "/api/v1/rates/AAPL", headers=headers).status_code == 401
                    traffic.rejected[reason] += 1
                limited = send(
                    "POST",
                    "/api/v1/calculate-locate",
                    json=quote("AAPL", LIMITED_CLIENT),
                    headers=limited_headers,
                )
                assert limited.status_code in (200, 429), limited.text
                if limited.status_code == 200:  # its one-request burst
                    traffic.singles_priced += 1
                    traffic.pricing_calls += 1
            if tick % 10 == 1:
                issued_token = send("POST", "/api/v1/auth/token", headers=client_headers)
                assert issued_token.status_code == 200, issued_token.text
                traffic.tokens_issued += 1
                token = issued_token.json()["access_token"]
            bearer = send("GET", "/api/v1/rates/MSFT", headers={"Authorization": f"Bearer {token}"})
            assert bearer.status_code == 200, bearer.text
            if tick % 5 == 0:
                path = f"/no/such/{uuid.uuid4().hex}"
                traffic.random_paths.append(path)
                assert send("GET", path, headers=client_headers).status_code == 404
                raw = f"/api/v1/rates/{uuid.uuid4().hex[:8].upper()}/extra"
                traffic.random_paths.append(raw)
                assert send("GET", raw, headers=client_headers).status_code == 404
            time.sleep(0.05)
    assert traffic.rate_limited > 0
    return traffic


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("scrape")
    server = start_server(
        directory,
        LOG_LEVEL="WARNING",
        RATE_LIMIT_PER_MINUTE="100000",
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    prometheus: PrivatePrometheus | None = None
    try:
        port = int(server.base_url.rsplit(":", 1)[1])
        prometheus = PrivatePrometheus(directory / "prometheus", "127.0.0.1", port).start()
        # A first scrape before any traffic, so that every counter's increase falls inside the window.
        prometheus.wait_for(f"up{{{SELECTOR}}} == 1", timeout=10)
        traffic = drive_traffic(server, TRAFFIC_SECONDS)
        # Two more scrapes after the last request, so the windows hold all of it.
        time.sleep(2.2)
        yield Rig(server=server, prometheus=prometheus, traffic=traffic)
    finally:
        if prometheus is not None:
            prometheus.stop()
        stop_server(server)


def scrape(server: RunningServer) -> str:
    response = httpx.get(f"{server.base_url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text: str, name: str) -> list[Sample]:
    found = [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
    assert found, f"no {name} in the exposition"
    return found


def value(text: str, name: str, **labels: str) -> float:
    matching = [s.value for s in samples(text, name) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, matching)
    return matching[0]


def test_the_queries_are_the_runbooks() -> None:
    if not RUNBOOK.exists():
        pytest.skip(f"{RUNBOOK} is not checked out next to the repository")
    text = RUNBOOK.read_text()
    block = text.split("# Prometheus queries for key metrics", 1)[1].split("```", 1)[0]
    written = {}
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    for comment, query in zip(lines[::2], lines[1::2], strict=True):
        assert comment.startswith("# "), comment
        written[comment[2:]] = query
    for title, query in RUNBOOK_QUERIES.items():
        assert written[title] == query, title
    left_out = set(written) - set(RUNBOOK_QUERIES)
    assert all(re.search(r"backend_|container_|kube_", written[title]) for title in left_out), left_out


def test_the_target_carries_the_kubernetes_labels(rig: Rig) -> None:
    (target,) = rig.prometheus.targets()
    assert target["health"] == "up", target
    assert target["labels"]["namespace"] == NAMESPACE
    assert target["labels"]["app"] == APP
    assert target["labels"]["pod"] == POD
    assert target["scrapeUrl"] == f"{rig.server.base_url}/metrics"


@pytest.mark.parametrize("title", list(RUNBOOK_QUERIES))
def test_runbook_query_returns_a_finite_value(rig: Rig, title: str) -> None:
    values = rig.prometheus.values(RUNBOOK_QUERIES[title])
    assert len(values) >= 1, (title, rig.prometheus.query(RUNBOOK_QUERIES[title]))
    assert all(math.isfinite(v) for v in values), (title, values)
    (result,) = values  # every query aggregates to one series (p95 by le only)
    if title == "Request rate":
        assert result > 0
    elif title == "Response time (p95)":
        assert 0 < result < 2.5
    elif title == "Error rate":
        assert 0 < result < 1  # 401s, 404s and 429s among many 200s
    elif title == "Authentication success rate":
        assert 0.5 < result < 1  # the bad keys
    elif title in ("Invalid API key rate", "Rate limit exceeded"):
        assert 0 < result < 1


def test_request_metrics_use_route_templates_and_bounded_labels(rig: Rig) -> None:
    text = scrape(rig.server)
    requests = samples(text, "http_requests_total")
    templates = route_templates()
    assert "/api/v1/rates/{ticker}" in templates
    for sample in requests:
        assert set(sample.labels) == {"method", "endpoint", "status_code"}, sample
        assert sample.labels["endpoint"] in templates | {"unmatched"}, sample
        assert re.fullmatch(r"[1-5]\d\d", sample.labels["status_code"]), sample
    endpoints = {s.labels["endpoint"] for s in requests}
    assert {
        "/api/v1/rates/{ticker}",
        "/api/v1/calculate-locate",
        "/api/v1/calculate-locate/batch",
        "/api/v1/auth/token",
        "/metrics",
        "unmatched",
    } <= endpoints
    # The raw paths never become label values: the random ones, nor a ticker.
    assert "/api/v1/rates/AAPL" not in text
    assert "/api/v1/rates/NVDA" not in text
    for path in rig.traffic.random_paths:
        assert path not in text
    assert len(rig.traffic.random_paths) >= 20
    unmatched = [s for s in requests if s.labels["endpoint"] == "unmatched"]
    assert {(s.labels["method"], s.labels["status_code"]) for s in unmatched} == {("GET", "404")}
    assert sum(s.value for s in unmatched) == len(rig.traffic.random_paths)
    rejected = value(
        text, "http_requests_total", endpoint="/api/v1/rates/{ticker}", method="GET", status_code="401"
    )
    assert rejected == sum(rig.traffic.rejected.values())
    limited = value(
        text, "http_requests_total", endpoint="/api/v1/calculate-locate", method="POST", status_code="429"
    )
    assert limited == rig.traffic.rate_limited

    # The histogram: seconds, by method and endpoint, buckets from 0.5 ms to 2.5 s.
    buckets = samples(text, "http_request_duration_seconds_bucket")
    for sample in buckets:
        assert set(sample.labels) == {"method", "endpoint", "le"}, sample
    quote_buckets = {
        float(s.labels["le"]): s.value
        for s in buckets
        if s.labels["endpoint"] == "/api/v1/calculate-locate" and s.labels["method"] == "POST"
    }
    assert {0.0005, 0.001, 2.5, math.inf} <= set(quote_buckets)
    count = value(
        text, "http_request_duration_seconds_count", endpoint="/api/v1/calculate-locate", method="POST"
    )
    assert quote_buckets[math.inf] == count
    posted = sum(
        s.value
        for s in requests
        if s.labels["endpoint"] == "/api/v1/calculate-locate" and s.labels["method"] == "POST"
    )
    assert count == posted


def test_business_metrics_count_what_was_done(rig: Rig) -> None:
    text = scrape(rig.server)
    traffic = rig.traffic

    attempts = {s.labels["status"]: s.value for s in samples(text, "authentication_attempts_total")}
    assert set(attempts) == AUTH_STATUSES
    for reason, sent in traffic.rejected.items():
        assert attempts[reason] == sent, (reason, attempts)
    assert attempts["expired"] == 0
    assert attempts["success"] > 0

    assert value(text, "rate_limit_exceeded_total") == traffic.rate_limited > 0
    assert value(text, "calculations_total", type="single") == traffic.singles_priced
    assert value(text, "calculations_total", type="batch") == traffic.batch_positions_priced > 0
    assert value(text, "calculation_duration_seconds_count") == traffic.pricing_calls
    calc_buckets = {float(s.labels["le"]) for s in samples(text, "calculation_duration_seconds_bucket")}
    assert {0.0005, 2.5} <= calc_buckets
    assert value(text, "fallback_usage_total") == traffic.fallback_positions > 0
    assert value(text, "cache_hits_total") > 0
    assert value(text, "cache_misses_total") > 0
    assert value(text, "jwt_tokens_issued_total") == traffic.tokens_issued > 0
    assert value(text, "process_resident_memory_bytes") > 1_000_000
    # The exposition keeps the names as written (no OTel unit suffixes, no target_info).
    assert "target_info" not in text
    assert "http_request_duration_seconds_seconds" not in text


def test_open_routes_make_no_authentication_attempt(rig: Rig) -> None:
    def attempts() -> float:
        return sum(s.value for s in samples(scrape(rig.server), "authentication_attempts_total"))

    before = attempts()
    with httpx.Client(base_url=rig.server.base_url, timeout=5) as http:
        for _ in range(3):
            for path in ("/health", "/health/detailed", "/metrics", "/openapi.json", "/docs"):
                # Even with credentials, good or bad, an open route does not look at them.
                assert http.get(path).status_code == 200
                assert http.get(path, headers={"X-API-Key": BAD_KEY}).status_code == 200
    # Prometheus itself scrapes /metrics every second meanwhile.
    assert attempts() == before
