"""The runbook's three services as real processes (DESIGN §1 Roles, issue 15): a gateway, a calculation
service and a data service on loopback, beside a ROLE=all engine, all four on one PostgreSQL schema and
one Redis database.

* what a client sees through the gateway equals what `all` answers (bodies minus ids and timestamps,
  statuses, the headers that matter): quotes (GET, POST, errors), batches (JSON, msgpack, atomic), the
  read-back, rates, admin uploads;
* a backend called without the gateway's credential (or with a forged one) is 401; its /health,
  /health/detailed and /metrics stay open;
* the calculation service stopped: 502 within the deadline, then 503 at once (Retry-After) while its
  breaker is open, the gateway's /health/detailed degraded, and recovery once it is back;
* a backend made slow (SIGSTOP): 504 at the deadline;
* no audit record lost across all of it (every quote answered 200 is a row in PostgreSQL, no other);
* one trace across the services (the calculation service's request span is a child of the gateway's call);
* the runbook's backend PromQL returns data from a real Prometheus scraping the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis

from pricer.demo import demo_availability_text
from tests.conftest import RunningServer, free_port, stop_server, wait_for_health
from tests.pg import PG_DSN, drop_schema, new_schema_name
from tests.prometheus_server import PrivatePrometheus
from tests.test_postgres_engine import audited, base_env, cli_ok, connect, seed_demo, wait_for_rows

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = 8
SECRET = "test-only-internal-secret-5b8e1d7c"
TIMEOUT_SECONDS = 1.0
BREAKER_FAILURES = 3
BREAKER_OPEN_SECONDS = 2.0
# Fields that differ between two answers of the same request (ids, clocks); everything else must match.
VOLATILE = frozenset(
    {
        "quote_id",
        "batch_id",
        "request_id",
        "calculated_at",
        "as_of",
        "last_updated",
        "updated_at",
        "created_at",
    }
)
SELECTOR = 'namespace="borrow-rate-engine", app="api-gateway"'
BACKEND_QUERIES = {
    "Backend service latency (p95)": (
        "histogram_quantile(0.95, sum(rate(backend_request_duration_seconds_bucket"
        f"{{{SELECTOR}}}[5m])) by (le, service))"
    ),
    "Backend service errors": (
        f'sum(rate(backend_requests_total{{{SELECTOR}, status="error"}}[5m])) / '
        f"sum(rate(backend_requests_total{{{SELECTOR}}}[5m]))"
    ),
}


def start_role(directory: Path, port: int, env: Mapping[str, str], name: str) -> RunningServer:
    log_path = directory / f"{name}-{port}-{time.monotonic_ns()}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pricer", "serve"],
            env=base_env(HOST="127.0.0.1", PORT=str(port), **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return RunningServer(base_url=f"http://127.0.0.1:{port}", process=process, keys={}, log_path=log_path)


@dataclass
class Split:
    all: RunningServer
    gateway: RunningServer
    calculation: RunningServer
    data: RunningServer
    directory: Path
    calculation_env: dict[str, str]
    gateway_env: dict[str, str]
    calculation_port: int
    schema: str
    client_key: str
    admin_key: str
    prometheus: PrivatePrometheus
    started: list[RunningServer] = field(default_factory=list)  # every process, stopped at the end
    answered: list[str] = field(default_factory=list)  # quote ids answered 200, by any process

    def restart_calculation(self) -> None:
        server = start_role(self.directory, self.calculation_port, self.calculation_env, "calculation")
        self.started.append(server)
        self.calculation = wait_for_health(server)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Split]:
    directory = tmp_path_factory.mktemp("roles")
    schema = new_schema_name()
    with redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=5) as store:
        for pattern in ("ratecache:*", "ratelimit:*"):
            for name in store.scan_iter(match=pattern, count=1000):
                store.delete(name)
    common = {
        "DATABASE_URL": PG_DSN,
        "DATABASE_SCHEMA": schema,
        "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "INTERNAL_SERVICE_SECRET": SECRET,
        "MIGRATE_ON_START": "false",
    }
    ports = {name: free_port() for name in ("all", "gateway", "calculation", "data")}
    traced = {"OTEL_TRACES_EXPORTER": "console"}
    envs = {
        "all": {**common, "AUDIT_SPOOL_DIR": str(directory / "spool-all")},
        "calculation": {
            **common,
            **traced,
            "ROLE": "calculation",
            "AUDIT_SPOOL_DIR": str(directory / "spool-calculation"),
        },
        "data": {**common, "ROLE": "data", "AUDIT_SPOOL_DIR": str(directory / "spool-data")},
        "gateway": {
            **common,
            **traced,
            "ROLE": "gateway",
            "CALCULATION_SERVICE_URL": f"http://127.0.0.1:{ports['calculation']}",
            "DATA_SERVICE_URL": f"http://127.0.0.1:{ports['data']}",
            "BACKEND_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
            "BACKEND_BREAKER_FAILURES": str(BREAKER_FAILURES),
            "BACKEND_BREAKER_OPEN_SECONDS": str(BREAKER_OPEN_SECONDS),
            "AUDIT_SPOOL_DIR": str(directory / "spool-gateway"),
        },
    }
    servers: dict[str, RunningServer] = {}
    started: list[RunningServer] = []
    prometheus: PrivatePrometheus | None = None
    try:
        cli_ok(common, "migrate")
        demo = seed_demo(common, directory)
        for name in ("calculation", "data", "gateway", "all"):
            servers[name] = start_role(directory, ports[name], envs[name], name)
            started.append(servers[name])
        for server in servers.values():
            wait_for_health(server)
        prometheus = PrivatePrometheus(directory / "prometheus", "127.0.0.1", ports["gateway"]).start()
        yield Split(
            all=servers["all"],
            gateway=servers["gateway"],
            calculation=servers["calculation"],
            data=servers["data"],
            directory=directory,
            calculation_env=envs["calculation"],
            gateway_env=envs["gateway"],
            calculation_port=ports["calculation"],
            schema=schema,
            client_key=demo["DEMO_CLIENT_KEY"],
            admin_key=demo["DEMO_ADMIN_KEY"],
            prometheus=prometheus,
            started=started,
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        for server in started:
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
            stop_server(server)
        asyncio.run(drop_schema(schema))


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items() if key not in VOLATILE}
    if isinstance(value, list):
        return [scrub(item) for item in value]
    return value


def decoded(response: httpx.Response) -> Any:
    if not response.content:
        return None  # HEAD
    if response.headers.get("content-type", "").startswith("application/msgpack"):
        return msgspec.msgpack.decode(response.content)
    return response.json()


def quote_ids(response: httpx.Response) -> list[str]:
    if response.status_code != 200 or "/calculate-locate" not in str(response.url):
        return []
    assert response.request.method != "HEAD", "a HEAD quote's id is only in the audit trail"
    body = decoded(response)
    if "quotes" in body:
        return [row["quote_id"] for row in body["quotes"]]
    if "columns" in body:  # a row's id: the batch id and its row among the priced ones (pricer.quotes)
        return [f"{body['batch_id']}{row:08x}" for row in range(body["priced"])]
    return [body["quote_id"]]


# Headers whose presence and value must be the same through the gateway (RateLimit values move with the
# bucket, so only their presence is compared).
SAME_VALUE = (
    "content-type",
    "retry-after",
    "www-authenticate",
    "allow",
    "x-content-type-options",
    "cache-control",
)
SAME_PRESENCE = ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-request-id", "x-correlation-id")


async def both(
    split: Split, client: httpx.AsyncClient, method: str, path: str, **options: Any
) -> tuple[httpx.Response, httpx.Response]:
    direct = await client.request(method, f"{split.all.base_url}{path}", **options)
    routed = await client.request(method, f"{split.gateway.base_url}{path}", **options)
    for response in (direct, routed):
        split.answered += quote_ids(response)
    return direct, routed


def assert_same(direct: httpx.Response, routed: httpx.Response, what: str) -> None:
    assert routed.status_code == direct.status_code, (what, direct.text[:500], routed.text[:500])
    assert scrub(decoded(routed)) == scrub(decoded(direct)), what
    for name in SAME_VALUE:
        assert routed.headers.get(name) == direct.headers.get(name), (what, name)
    for name in SAME_PRESENCE:
        assert (name in routed.headers) == (name in direct.headers), (what, name)


async def test_everything_through_the_gateway_equals_all(split: Split) -> None:
    client_headers = {"X-API-Key": split.client_key}
    admin_headers = {"X-API-Key": split.admin_key}
    quote = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}
    positions = [
        {"ticker": "GME", "position_value": 2500000.55, "loan_days": 7},
        {"ticker": "AAPL", "position_value": 100.01, "loan_days": 365},
        {"ticker": "NOPE", "position_value": 100, "loan_days": 30},
        {"ticker": "MSFT", "position_value": -1, "loan_days": 30},
    ]
    batch = {"client_id": "demo_client", "positions": positions}
    tickers = ["AAPL", "GME", "MSFT", "NVDA", "BRK.B", "NOPE"]
    big = {
        "client_id": "demo_client",
        "positions": [
            {"ticker": tickers[n % 6], "position_value": 1000 + n * 7.31, "loan_days": 1 + n % 365}
            for n in range(5000)
        ],
    }
    columnar = {
        "client_id": "demo_client",
        "columns": {
            "ticker": [row["ticker"] for row in big["positions"][:2000]],
            "position_value": [row["position_value"] for row in big["positions"][:2000]],
            "loan_days": [row["loan_days"] for row in big["positions"][:2000]],
        },
    }
    msgpack_headers = {
        **client_headers,
        "Content-Type": "application/msgpack",
        "Accept": "application/msgpack",
    }
    requests: list[tuple[str, str, str, dict[str, Any]]] = [
        ("single POST", "POST", "/api/v1/calculate-locate", {"json": quote, "headers": client_headers}),
        (
            "single GET",
            "GET",
            "/api/v1/calculate-locate?ticker=brk%20b&position_value=12345.67&loan_days=90&client_id=demo_client",
            {"headers": client_headers},
        ),
        (
            "single 400",
            "POST",
            "/api/v1/calculate-locate",
            {"json": {**quote, "loan_days": 0}, "headers": client_headers},
        ),
        (
            "single 403",
            "POST",
            "/api/v1/calculate-locate",
            {"json": {**quote, "client_id": "xyz123"}, "headers": client_headers},
        ),
        (
            "single 404",
            "POST",
            "/api/v1/calculate-locate",
            {"json": {**quote, "ticker": "NOPE"}, "headers": client_headers},
        ),
        (
            "single 415",
            "POST",
            "/api/v1/calculate-locate",
            {"content": b"x", "headers": {**client_headers, "Content-Type": "text/plain"}},
        ),
        ("single 401", "POST", "/api/v1/calculate-locate", {"json": quote}),
        ("batch JSON", "POST", "/api/v1/calculate-locate/batch", {"json": batch, "headers": client_headers}),
        (
            "batch msgpack",
            "POST",
            "/api/v1/calculate-locate/batch",
            {"content": msgspec.msgpack.encode(batch), "headers": msgpack_headers},
        ),
        (
            "batch of 5,000 (a body over 64 KiB)",
            "POST",
            "/api/v1/calculate-locate/batch",
            {"json": big, "headers": client_headers},
        ),
        (
            "columnar batch msgpack",
            "POST",
            "/api/v1/calculate-locate/batch",
            {"content": msgspec.msgpack.encode(columnar), "headers": msgpack_headers},
        ),
        (
            "batch atomic 400",
            "POST",
            "/api/v1/calculate-locate/batch?atomic=true",
            {"json": batch, "headers": client_headers},
        ),
        ("rate", "GET", "/api/v1/rates/GME", {"headers": client_headers}),
        ("rates", "GET", "/api/v1/rates?tickers=AAPL,GME,NOPE,bad!", {"headers": client_headers}),
        ("rate 404", "GET", "/api/v1/rates/NOPE", {"headers": client_headers}),
        (
            "rate 403 (admin route)",
            "PUT",
            "/api/v1/admin/volatility",
            {"json": {"value": 20}, "headers": client_headers},
        ),
        ("volatility", "PUT", "/api/v1/admin/volatility", {"json": {"value": 20}, "headers": admin_headers}),
        (
            "events",
            "PUT",
            "/api/v1/admin/events/GME",
            {
                "json": {"events": [{"date": "2030-01-02", "type": "earnings", "risk_factor": 3}]},
                "headers": admin_headers,
            },
        ),
        (
            "availability",
            "POST",
            "/api/v1/admin/availability",
            {
                "content": demo_availability_text().encode(),
                "headers": {**admin_headers, "Content-Type": "text/plain"},
            },
        ),
        (
            "availability 400",
            "POST",
            "/api/v1/admin/availability",
            {"content": b"garbage\n", "headers": {**admin_headers, "Content-Type": "text/plain"}},
        ),
        (
            "stock 400",
            "PUT",
            "/api/v1/admin/stocks/AAPL",
            {"json": {"min_borrow_rate": -1}, "headers": admin_headers},
        ),
        ("unknown path", "GET", "/api/v1/nothing", {"headers": client_headers}),
        ("405", "DELETE", "/api/v1/rates/GME", {"headers": client_headers}),
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        for what, method, path, options in requests:
            direct, routed = await both(split, client, method, path, **options)
            assert_same(direct, routed, what)
            assert routed.headers["x-request-id"] != direct.headers["x-request-id"]

        # A stock created through each (two tickers: a PUT that replaces answers 200): the same record.
        created = []
        for server, ticker in ((split.all, "ZZA"), (split.gateway, "ZZB")):
            response = await client.put(
                f"{server.base_url}/api/v1/admin/stocks/{ticker}",
                json={"min_borrow_rate": 0.03, "borrow_status": "HARD"},
                headers=admin_headers,
            )
            assert response.status_code == 201, response.text
            assert response.json()["ticker"] == ticker
            created.append({k: v for k, v in scrub(response.json()).items() if k != "ticker"})
        assert created[0] == created[1]
        # The read-back of a quote priced through the gateway, through both, the same body as when priced.
        priced = await client.post(
            f"{split.gateway.base_url}/api/v1/calculate-locate", json=quote, headers=client_headers
        )
        split.answered += quote_ids(priced)
        path = f"/api/v1/quotes/{priced.json()['quote_id']}"
        read_routed = await client.get(f"{split.gateway.base_url}{path}", headers=client_headers)
        assert read_routed.status_code == 200, read_routed.text
        assert read_routed.json() == priced.json()
        # Through `all` (another process) once written to the database (normally within a second).
        priced_id = priced.json()["quote_id"]
        assert await audited_quote_ids(split.schema, priced.headers["x-request-id"]) == [priced_id]
        direct, routed = await both(split, client, "GET", path, headers=client_headers)
        assert_same(direct, routed, "read-back")
        assert routed.json() == priced.json()
        # HEAD is GET without the body (priced and audited: its ids are found by request id).
        for server in (split.all, split.gateway):
            head = await client.head(
                f"{server.base_url}/api/v1/calculate-locate?ticker=AAPL&position_value=1&loan_days=1"
                "&client_id=demo_client",
                headers={**client_headers, "X-Request-ID": f"head-{server.base_url[-5:]}"},
            )
            assert head.status_code == 200
            assert head.content == b""
            assert head.headers["content-type"] == "application/json"
            split.answered += await audited_quote_ids(split.schema, f"head-{server.base_url[-5:]}")
        # A client's own request id goes through to the service and back.
        routed = await client.post(
            f"{split.gateway.base_url}/api/v1/calculate-locate",
            json=quote,
            headers={**client_headers, "X-Request-ID": "trace-me-123"},
        )
        split.answered += quote_ids(routed)
        assert routed.headers["x-request-id"] == "trace-me-123"
        assert await audited_quote_ids(split.schema, "trace-me-123") == [routed.json()["quote_id"]]
        async with connect(PG_DSN, split.schema) as connection:
            row = await connection.fetchrow(
                "SELECT key_id, client_id FROM quotes WHERE request_id = $1", "trace-me-123"
            )
        # The audit record names the key the gateway admitted, as `all`'s records do.
        assert (row["key_id"], row["client_id"]) == (split.client_key.split("_")[1], "demo_client")
    # Refusals the services decided are in the gateway's log too (the runbook greps the gateway's).
    assert 'level=WARNING msg="Validation error"' in split.gateway.log()


async def audited_quote_ids(schema: str, request_id: str) -> list[str]:
    """The quote ids audited for a request id, once there are some (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        async with connect(PG_DSN, schema) as connection:
            rows = await connection.fetch("SELECT quote_id FROM quotes WHERE request_id = $1", request_id)
        if rows or time.monotonic() > deadline:
            return [str(row[0]) for row in rows]
        await asyncio.sleep(0.1)


async def test_a_gateway_without_authentication_lets_the_service_charge_the_named_client(
    split: Split,
) -> None:
    """ENABLE_AUTHENTICATION=false (local development): the credential states no principal, the calculation
    service acts as, and charges, the client the body names (RateLimit headers come back through)."""
    env = {
        **{k: v for k, v in split.gateway_env.items() if k != "OTEL_TRACES_EXPORTER"},
        "ENABLE_AUTHENTICATION": "false",
        "AUDIT_SPOOL_DIR": str(split.directory / "spool-open-gateway"),
    }
    server = start_role(split.directory, free_port(), env, "open-gateway")
    split.started.append(server)
    wait_for_health(server)
    quote = {"ticker": "GME", "position_value": 5000.5, "loan_days": 10, "client_id": "xyz123"}
    async with httpx.AsyncClient(timeout=10) as client:
        open_answer = await client.post(f"{server.base_url}/api/v1/calculate-locate", json=quote)
        keyed = await client.post(
            f"{split.gateway.base_url}/api/v1/calculate-locate",
            json=quote,
            headers={"X-API-Key": split.admin_key},  # admin may act for xyz123
        )
    stop_server(server)
    for answer in (open_answer, keyed):
        assert answer.status_code == 200, answer.text
        split.answered += quote_ids(answer)
    assert scrub(open_answer.json()) == scrub(keyed.json())
    assert "ratelimit" in open_answer.headers
    assert open_answer.headers["x-ratelimit-limit"] == keyed.headers["x-ratelimit-limit"]


async def test_a_backend_admits_only_the_gateways_credential(split: Split) -> None:
    quote = {"ticker": "AAPL", "position_value": 100, "loan_days": 30, "client_id": "demo_client"}
    async with httpx.AsyncClient(timeout=10) as client:
        for server, method, path, body in (
            (split.calculation, "POST", "/api/v1/calculate-locate", quote),
            (split.data, "GET", "/api/v1/rates/AAPL", None),
        ):
            for headers in (
                {"X-API-Key": split.client_key},  # a client's own key is no credential here
                {"X-Internal-Credential": "v1.Zm9v.YmFy", "X-API-Key": split.client_key},
                {},
            ):
                response = await client.request(
                    method, f"{server.base_url}{path}", json=body, headers=headers
                )
                assert response.status_code == 401, response.text
                error = response.json()
                assert error["error_code"] == "UNAUTHORIZED"
                assert error["status"] == "error"
                assert error["request_id"] == response.headers["x-request-id"]
                assert "www-authenticate" in response.headers
            for open_path in ("/health", "/health/detailed", "/metrics"):
                assert (await client.get(f"{server.base_url}{open_path}")).status_code == 200
        # Each backend answers only its own routes.
        wrong = await client.get(f"{split.data.base_url}/api/v1/quotes/whatever")
        assert wrong.status_code == 404
        wrong = await client.get(f"{split.calculation.base_url}/api/v1/rates/AAPL")
        assert wrong.status_code == 404


async def test_one_trace_across_gateway_and_calculation_service(split: Split) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{split.gateway.base_url}/api/v1/calculate-locate",
            json={"ticker": "AAPL", "position_value": 100, "loan_days": 30, "client_id": "demo_client"},
            headers={"X-API-Key": split.client_key},
        )
    assert response.status_code == 200, response.text
    split.answered += quote_ids(response)
    deadline = time.monotonic() + 15
    trace_ids: tuple[set[str], set[str]] = (set(), set())
    while time.monotonic() < deadline:
        trace_ids = (
            set(re.findall(r'"trace_id": "(0x[0-9a-f]{32})"', split.gateway.log())),
            set(re.findall(r'"trace_id": "(0x[0-9a-f]{32})"', split.calculation.log())),
        )
        if trace_ids[0] & trace_ids[1]:
            break
        await asyncio.sleep(0.2)
    assert trace_ids[0] & trace_ids[1], "no trace id is shared by the gateway's and the service's spans"
    # Each role names itself in its spans as the runbook names the service.
    assert '"service.name": "calculation-service"' in split.calculation.log()
    assert '"service.name": "api-gateway"' in split.gateway.log()


def status_and_code(response: httpx.Response) -> tuple[int, str | None]:
    body = response.json()
    return response.status_code, body.get("error_code")


async def test_calculation_service_down_502_then_503_then_recovery(split: Split) -> None:
    quote = {"ticker": "AAPL", "position_value": 100, "loan_days": 30, "client_id": "demo_client"}
    headers = {"X-API-Key": split.client_key}
    url = f"{split.gateway.base_url}/api/v1/calculate-locate"
    stop_server(split.calculation)  # SIGTERM: it drains, its audit records are written
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(BREAKER_FAILURES):
            started = time.monotonic()
            response = await client.post(url, json=quote, headers=headers)
            assert status_and_code(response) == (502, "BACKEND_ERROR"), response.text
            # Within the deadline: a refused connection is not waited for.
            assert time.monotonic() - started < TIMEOUT_SECONDS
        assert response.json()["details"] == {"service": "calculation-service"}
        started = time.monotonic()
        refused = await client.post(url, json=quote, headers=headers)
        assert status_and_code(refused) == (503, "SERVICE_UNAVAILABLE"), refused.text
        assert time.monotonic() - started < 0.5  # answered at once, nothing sent
        assert 1 <= int(refused.headers["retry-after"]) <= BREAKER_OPEN_SECONDS + 1
        health = (await client.get(f"{split.gateway.base_url}/health/detailed")).json()
        service = health["dependencies"]["calculation-service"]
        assert service["status"] == "degraded"
        assert service["detail"]["circuit"] == "open"
        assert health["status"] == "degraded"
        assert "127.0.0.1" not in json.dumps(health)
        assert health["dependencies"]["data-service"]["status"] == "healthy"
        # The alert CircuitBreakerOpenCritical reads the gateway's breakers from this gauge.
        exposition = (await client.get(f"{split.gateway.base_url}/metrics")).text
        assert 'circuit_breaker_state{name="calculation-service"} 2.0' in exposition
        assert 'circuit_breaker_state{name="data-service"} 0.0' in exposition
        # Rates do not depend on the calculation service.
        rate = await client.get(f"{split.gateway.base_url}/api/v1/rates/AAPL", headers=headers)
        assert rate.status_code == 200

        split.restart_calculation()
        deadline = time.monotonic() + BREAKER_OPEN_SECONDS + 10
        while True:
            response = await client.post(url, json=quote, headers=headers)
            split.answered += quote_ids(response)
            if response.status_code == 200:
                break
            assert status_and_code(response) == (503, "SERVICE_UNAVAILABLE"), response.text
            assert time.monotonic() < deadline, "no recovery after the calculation service came back"
            await asyncio.sleep(0.1)
        for _ in range(5):  # the half-open breaker closes after its probes
            response = await client.post(url, json=quote, headers=headers)
            split.answered += quote_ids(response)
            assert response.status_code == 200, response.text
        health = (await client.get(f"{split.gateway.base_url}/health/detailed")).json()
        assert health["dependencies"]["calculation-service"]["detail"]["circuit"] == "closed"
        exposition = (await client.get(f"{split.gateway.base_url}/metrics")).text
        assert 'circuit_breaker_state{name="calculation-service"} 0.0' in exposition
    log = split.gateway.log()
    assert 'msg="Circuit breaker state changed" name=calculation-service state=open' in log
    assert 'level=ERROR msg="Backend service error"' in log
    assert "service=calculation-service" in log
    assert "error_code=BACKEND_ERROR" in log


async def test_a_slow_backend_gives_504_at_the_deadline(split: Split) -> None:
    headers = {"X-API-Key": split.client_key}
    os.kill(split.data.process.pid, signal.SIGSTOP)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            started = time.monotonic()
            response = await client.get(f"{split.gateway.base_url}/api/v1/rates/GME", headers=headers)
            elapsed = time.monotonic() - started
    finally:
        os.kill(split.data.process.pid, signal.SIGCONT)
    assert status_and_code(response) == (504, "BACKEND_TIMEOUT"), response.text
    assert (
        TIMEOUT_SECONDS - 0.05 <= elapsed < TIMEOUT_SECONDS + 2.0
    )  # the deadline, plus a loaded machine's lag
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{split.gateway.base_url}/api/v1/rates/GME", headers=headers)
    assert response.status_code == 200, response.text
    assert "error_code=BACKEND_TIMEOUT" in split.gateway.log()


async def test_no_audit_record_is_lost(split: Split) -> None:
    """Every quote answered 200 by any process in this module is a row, and no other row exists."""
    stored = await wait_for_rows(PG_DSN, split.schema, len(split.answered), within=15)
    assert len(split.answered) >= 10
    assert sorted(stored) == sorted(split.answered)
    assert len(set(stored)) == len(stored)
    await asyncio.sleep(0.5)
    assert len(await audited(PG_DSN, split.schema)) == len(stored)  # nothing more arrives later


async def test_the_runbooks_backend_queries_return_data(split: Split) -> None:
    """Under load, with the data service stopped (SIGSTOP) for part of it, the runbook's backend PromQL,
    as written, returns data from the gateway's exposition: the latency of both services and a share of
    errors strictly between 0 and 1."""
    headers = {"X-API-Key": split.client_key}
    quote = {"ticker": "AAPL", "position_value": 100, "loan_days": 30, "client_id": "demo_client"}
    rate_statuses: list[int] = []
    async with httpx.AsyncClient(timeout=10) as client:

        async def load(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                answers = await asyncio.gather(
                    *(
                        client.post(
                            f"{split.gateway.base_url}/api/v1/calculate-locate", json=quote, headers=headers
                        )
                        for _ in range(4)
                    ),
                    client.get(f"{split.gateway.base_url}/api/v1/rates/GME", headers=headers),
                )
                for answer in answers[:-1]:
                    assert answer.status_code == 200, answer.text
                    split.answered += quote_ids(answer)
                rate_statuses.append(answers[-1].status_code)

        await load(1.5)
        os.kill(split.data.process.pid, signal.SIGSTOP)
        try:
            await load(3.0)
        finally:
            os.kill(split.data.process.pid, signal.SIGCONT)
        await asyncio.sleep(BREAKER_OPEN_SECONDS)
        await load(1.5)
    assert {504, 503, 200} <= set(rate_statuses), rate_statuses
    assert rate_statuses[-1] == 200
    latency = split.prometheus.wait_for(BACKEND_QUERIES["Backend service latency (p95)"], timeout=15)
    assert len(latency) == 2, latency
    assert all(0 < value < TIMEOUT_SECONDS * 2 for value in latency), latency
    services = {
        sample["metric"]["service"]
        for sample in split.prometheus.query(
            f"sum(rate(backend_request_duration_seconds_bucket{{{SELECTOR}}}[5m])) by (service)"
        )
    }
    assert services == {"calculation-service", "data-service"}
    errors = split.prometheus.wait_for(BACKEND_QUERIES["Backend service errors"], timeout=15)
    assert len(errors) == 1, errors
    assert 0 < errors[0] < 1, errors
    stored = await wait_for_rows(PG_DSN, split.schema, len(split.answered), within=15)
    assert sorted(stored) == sorted(split.answered)
