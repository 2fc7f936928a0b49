"""Logs, traces and health as operators see them (RUNBOOK "Log Analysis" and "Health Checks", DESIGN §4).

Logs: a real server (`python -m pricer serve`) writes logfmt lines that the runbook's LogQL patterns,
used as plain substrings, find, with the route template, request id and client id; LOG_LEVEL=ERROR
silences the warnings; no secret the server knows or was sent reaches its log.
Traces: an in-process app with an in-memory span exporter gives one trace per request with the pipeline's
spans under the request span; without an exporter tracing is off.
Health: `/health` exactly, `/health/detailed`'s structure, and no hostnames or secrets in it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import pricer
from pricer.app import PricerApp, create_app
from pricer.observability.metrics import Metrics
from tests.conftest import Engine, RunningServer, make_settings, start_server, stop_server
from tests.pg import pg_schema

AUTH_ERROR = 'level=ERROR msg="Authentication error"'
RATE_LIMITED = 'level=WARNING msg="Rate limit exceeded"'
VALIDATION_ERROR = 'level=WARNING msg="Validation error"'
SLOW_REQUEST = 'level=WARNING msg="Slow request"'

JWT_SECRET = "jwt-" + uuid.uuid4().hex + uuid.uuid4().hex
PEPPER = "pepper-" + uuid.uuid4().hex + uuid.uuid4().hex
WRONG_KEY = "bre_wrongkey0001_" + "Qx7" * 12  # well-formed, unknown id
GARBAGE_KEY = "garbage-" + uuid.uuid4().hex
LIMITED_CLIENT = "log_limited_client"
QUOTE = "/api/v1/calculate-locate"


def quote(**overrides: object) -> dict[str, object]:
    return {
        "ticker": "AAPL",
        "position_value": 100000,
        "loan_days": 30,
        "client_id": "demo_client",
        **overrides,
    }


def secret_of(key: str) -> str:
    return key.rsplit("_", 1)[1]


# --- logs of a real server --------------------------------------------------------------------------------
@dataclass
class Provoked:
    """Request ids of the requests sent on purpose, by what they should log, and the secrets used."""

    ids: dict[str, str] = field(default_factory=dict)
    secrets_sent: dict[str, str] = field(default_factory=dict)


def rid(name: str) -> str:
    return f"obs-{name}-{uuid.uuid4().hex[:12]}"


def provoke(server: RunningServer) -> Provoked:
    """A bad key, a wrong secret, a missing key, a bad token, a rate-limited client, validation errors."""
    provoked = Provoked()
    client_key = server.keys["DEMO_CLIENT_KEY"]
    admin_key = server.keys["DEMO_ADMIN_KEY"]
    client = {"X-API-Key": client_key}
    admin = {"X-API-Key": admin_key}
    wrong_secret = client_key.rsplit("_", 1)[0] + "_" + "W" * 40  # the demo key id, a wrong secret

    def send(http: httpx.Client, name: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        request_id = provoked.ids[name] = rid(name)
        headers = {**kwargs.pop("headers", {}), "X-Request-ID": request_id}  # type: ignore[dict-item]
        return http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]

    with httpx.Client(base_url=server.base_url, timeout=5) as http:
        assert send(http, "ok", "POST", QUOTE, json=quote(), headers=client).status_code == 200
        assert (
            send(http, "bad_key", "GET", "/api/v1/rates/AAPL", headers={"X-API-Key": WRONG_KEY}).status_code
            == 401
        )
        wrong = send(http, "wrong_secret", "GET", "/api/v1/rates/MSFT", headers={"X-API-Key": wrong_secret})
        assert wrong.status_code == 401
        assert (
            send(http, "garbage", "GET", "/api/v1/rates/AAPL", headers={"X-API-Key": GARBAGE_KEY}).status_code
            == 401
        )
        assert send(http, "missing", "POST", QUOTE, json=quote()).status_code == 401
        token_response = send(http, "token", "POST", "/api/v1/auth/token", headers=client)
        assert token_response.status_code == 200
        token = token_response.json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}
        assert send(http, "bearer", "GET", "/api/v1/rates/AAPL", headers=bearer).status_code == 200
        tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        tampered_headers = {"Authorization": f"Bearer {tampered}"}
        assert (
            send(http, "bad_token", "GET", "/api/v1/rates/AAPL", headers=tampered_headers).status_code == 401
        )

        # Validation errors: a bad value, and a key pasted into a field by mistake.
        assert (
            send(http, "invalid", "POST", QUOTE, json=quote(loan_days=0), headers=client).status_code == 400
        )
        pasted = send(http, "pasted_key", "POST", QUOTE, json=quote(ticker=client_key), headers=client)
        assert pasted.status_code == 400
        assert (
            send(http, "invalid_query", "GET", QUOTE, params=quote(loan_days=400), headers=client).status_code
            == 400
        )

        # A client with a limit of one request a minute, and a key issued for it.
        put = http.put(
            f"/api/v1/admin/clients/{LIMITED_CLIENT}",
            json={
                "markup_percentage": 1,
                "transaction_fee_type": "FLAT",
                "transaction_amount": 1,
                "rate_limit_per_minute": 1,
                "burst": 1,
            },
            headers=admin,
        )
        assert put.status_code in (200, 201), put.text
        issued = http.post("/api/v1/admin/keys", json={"client_id": LIMITED_CLIENT}, headers=admin)
        assert issued.status_code == 201, issued.text
        limited_key = issued.json()["api_key"]
        limited = {"X-API-Key": limited_key}
        statuses = [
            send(
                http, f"limited{i}", "POST", QUOTE, json=quote(client_id=LIMITED_CLIENT), headers=limited
            ).status_code
            for i in range(3)
        ]
        assert statuses == [200, 429, 429], statuses
        # The last request: once its line is in the log, all the lines before it are too.
        assert send(http, "last", "GET", "/health").status_code == 200

    provoked.secrets_sent = {
        "issued key": limited_key,
        "issued key secret": secret_of(limited_key),
        "bearer token": token,
        "bearer token signature": token.rsplit(".", 1)[1],
        "tampered token": tampered,
        "wrong key": WRONG_KEY,
        "wrong key secret": secret_of(WRONG_KEY),
        "wrong secret of a known key id": secret_of(wrong_secret),
        "garbage key": GARBAGE_KEY,
        "JWT_SECRET_KEY": JWT_SECRET,
        "API_KEY_PEPPER": PEPPER,
    }
    return provoked


def wait_for_log(server: RunningServer, text: str, timeout: float = 5.0) -> str:
    """The server's log once it contains `text` (lines are written after the response goes out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never reached the log:\n{server.log()}")


def lines_with(log: str, *parts: str) -> list[str]:
    return [line for line in log.splitlines() if all(part in line for part in parts)]


@dataclass
class LoggedServer:
    server: RunningServer
    provoked: Provoked
    log: str


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    server = start_server(
        tmp_path_factory.mktemp("logs"),
        SLOW_REQUEST_MS="0",
        RATE_LIMIT_PER_MINUTE="1000",
        JWT_SECRET_KEY=JWT_SECRET,
        API_KEY_PEPPER=PEPPER,
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    try:
        provoked = provoke(server)
        log = wait_for_log(server, f"request_id={provoked.ids['last']}")
        yield LoggedServer(server, provoked, log)
    finally:
        stop_server(server)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("name", "pattern", "endpoint"),
    [
        ("bad_key", AUTH_ERROR, "/api/v1/rates/{ticker}"),
        ("wrong_secret", AUTH_ERROR, "/api/v1/rates/{ticker}"),
        ("garbage", AUTH_ERROR, "/api/v1/rates/{ticker}"),
        ("missing", AUTH_ERROR, QUOTE),
        ("bad_token", AUTH_ERROR, "/api/v1/rates/{ticker}"),
        ("invalid", VALIDATION_ERROR, QUOTE),
        ("pasted_key", VALIDATION_ERROR, QUOTE),
        ("invalid_query", VALIDATION_ERROR, QUOTE),
        ("limited1", RATE_LIMITED, QUOTE),
        ("limited2", RATE_LIMITED, QUOTE),
    ],
)
def test_runbook_log_pattern_with_its_fields(
    logged: LoggedServer, name: str, pattern: str, endpoint: str
) -> None:
    request_id = logged.provoked.ids[name]
    found = lines_with(logged.log, pattern, f"request_id={request_id}")
    assert len(found) == 1, (pattern, request_id, logged.log)
    (line,) = found
    assert line.startswith(pattern), line  # `level=... msg="..."` first, adjacent
    assert f'endpoint="{endpoint}"' in line, line
    if pattern == RATE_LIMITED:
        assert f'client_id="{LIMITED_CLIENT}"' in line, line
    if pattern == VALIDATION_ERROR:
        assert 'client_id="demo_client"' in line, line
    # The raw path never replaces the template.
    assert "/api/v1/rates/AAPL" not in line
    assert "/api/v1/rates/MSFT" not in line


@pytest.mark.e2e
def test_the_runbooks_logql_line_filters_find_lines(logged: LoggedServer) -> None:
    """Each `|= "..."` filter of the runbook's LogQL queries (but the backend one) matches some line."""
    log = logged.log
    for needle in (
        "level=ERROR",
        "Authentication error",
        "Rate limit exceeded",
        "Validation error",
        "Slow request",
    ):
        assert lines_with(log, needle), needle
    # "Errors for specific endpoint": the quoted template filter combined with the level.
    assert lines_with(log, 'endpoint="/api/v1/calculate-locate"', "level=ERROR")
    # "Errors for specific client" filters on a quoted client_id.
    assert lines_with(log, f'client_id="{LIMITED_CLIENT}"', "level=WARNING")
    # Every logfmt line is a single line starting with its level and message.
    for line in log.splitlines():
        if line.startswith("level="):
            assert ' msg="' in line, line


@pytest.mark.e2e
def test_every_request_logs_a_slow_request_line_at_zero_threshold(logged: LoggedServer) -> None:
    for name, request_id in logged.provoked.ids.items():
        found = lines_with(logged.log, SLOW_REQUEST, f"request_id={request_id}")
        assert len(found) == 1, (name, logged.log)
        (line,) = found
        assert line.startswith(SLOW_REQUEST)
        for part in ('endpoint="', "duration_ms=", "status_code="):
            assert part in line, line
    ok = lines_with(logged.log, SLOW_REQUEST, f"request_id={logged.provoked.ids['ok']}")[0]
    assert f'endpoint="{QUOTE}"' in ok
    assert 'client_id="demo_client"' in ok
    assert "status_code=200" in ok
    limited = lines_with(logged.log, SLOW_REQUEST, f"request_id={logged.provoked.ids['limited1']}")[0]
    assert "status_code=429" in limited
    assert f'client_id="{LIMITED_CLIENT}"' in limited


@pytest.mark.e2e
def test_no_secret_reaches_the_log(logged: LoggedServer) -> None:
    log = logged.server.log()
    lines = log.splitlines()
    # The demo keys are printed once at start-up, by design; nowhere else.
    for name in ("DEMO_CLIENT_KEY", "DEMO_ADMIN_KEY"):
        key = logged.server.keys[name]
        holding = [line for line in lines if secret_of(key) in line]
        assert len(holding) == 1, (name, holding)
        assert holding[0].lstrip().startswith("client "), holding
        assert key in holding[0], holding
        assert not holding[0].startswith("level="), holding
    for name, secret in logged.provoked.secrets_sent.items():
        assert secret not in log, name


@pytest.mark.e2e
def test_log_level_error_silences_the_warnings(tmp_path: Path) -> None:
    server = start_server(
        tmp_path,
        LOG_LEVEL="ERROR",
        SLOW_REQUEST_MS="0",
        RATE_LIMIT_PER_MINUTE="2",
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    try:
        client = {"X-API-Key": server.keys["DEMO_CLIENT_KEY"]}
        with httpx.Client(base_url=server.base_url, timeout=5) as http:
            statuses = [http.post(QUOTE, json=quote(), headers=client).status_code for _ in range(3)]
            assert 429 in statuses, statuses
            assert http.post(QUOTE, json=quote(loan_days=0), headers=client).status_code in (400, 429)
            last = rid("bad_key_last")
            response = http.get("/api/v1/rates/AAPL", headers={"X-API-Key": WRONG_KEY, "X-Request-ID": last})
            assert response.status_code == 401
        log = wait_for_log(server, f"request_id={last}")
    finally:
        stop_server(server)
    assert lines_with(log, AUTH_ERROR, f"request_id={last}")
    leveled = [line for line in log.splitlines() if line.startswith("level=")]
    assert leveled
    assert all(line.startswith(("level=ERROR", "level=CRITICAL")) for line in leveled), leveled


# --- traces -----------------------------------------------------------------------------------------------
@pytest.fixture
async def traced() -> AsyncIterator[tuple[PricerApp, InMemorySpanExporter, httpx.AsyncClient]]:
    exporter = InMemorySpanExporter()
    app = create_app(make_settings(), span_processor=SimpleSpanProcessor(exporter))
    for step in app.lifecycle.startup:
        await step()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
            yield app, exporter, client
    finally:
        for step in reversed(app.lifecycle.shutdown):
            await step()


def one_root(spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    roots = [span for span in spans if span.parent is None]
    assert len(roots) == 1, [(span.name, span.parent) for span in spans]
    return roots[0]


@pytest.mark.anyio
async def test_a_quote_is_one_trace_with_the_pipeline_spans_under_the_request(
    traced: tuple[PricerApp, InMemorySpanExporter, httpx.AsyncClient],
) -> None:
    app, exporter, client = traced
    assert app.tracing is not None
    assert app.tracing.enabled
    assert app.demo_keys is not None
    exporter.clear()
    response = await client.post(QUOTE, json=quote(), headers={"X-API-Key": app.demo_keys.client_key})
    assert response.status_code == 200, response.text

    spans = exporter.get_finished_spans()
    root = one_root(spans)
    assert root.name == "POST /api/v1/calculate-locate"
    assert root.attributes is not None
    assert root.attributes["http.route"] == "/api/v1/calculate-locate"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["http.request.method"] == "POST"
    assert root.context is not None
    trace_id = root.context.trace_id

    children = {span.name: span for span in spans if span is not root}
    assert set(children) == {"authenticate", "rate_limit", "market_data", "pricing"}, list(children)
    for span in children.values():
        assert span.context is not None, span.name
        assert span.context.trace_id == trace_id, span.name
        assert span.parent is not None, span.name
        assert span.parent.span_id == root.context.span_id, span.name
        assert span.start_time is not None
        assert root.start_time is not None
        assert span.end_time is not None
        assert root.end_time is not None
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time, span.name
    # In pipeline order.
    ordered = sorted(children.values(), key=lambda span: span.start_time or 0)
    assert [span.name for span in ordered] == ["authenticate", "rate_limit", "market_data", "pricing"]
    assert root.resource.attributes.get("service.name")


@pytest.mark.anyio
async def test_each_request_is_its_own_trace_and_refusals_are_traced(
    traced: tuple[PricerApp, InMemorySpanExporter, httpx.AsyncClient],
) -> None:
    app, exporter, client = traced
    assert app.demo_keys is not None
    exporter.clear()
    assert (await client.get("/api/v1/rates/AAPL", headers={"X-API-Key": WRONG_KEY})).status_code == 401
    refused = exporter.get_finished_spans()
    root = one_root(refused)
    assert root.name == "GET /api/v1/rates/{ticker}"
    assert root.attributes is not None
    assert root.attributes["http.response.status_code"] == 401
    assert [span.name for span in refused if span is not root] == ["authenticate"]

    exporter.clear()
    assert (await client.get(f"/no/such/{uuid.uuid4().hex}")).status_code == 404
    unmatched = one_root(exporter.get_finished_spans())
    assert unmatched.attributes is not None
    assert unmatched.attributes["http.route"] == "unmatched"
    assert unmatched.name == "GET unmatched"

    exporter.clear()
    headers = {"X-API-Key": app.demo_keys.client_key}
    for _ in range(2):
        assert (await client.get("/api/v1/rates/AAPL", headers=headers)).status_code == 200
    spans = exporter.get_finished_spans()
    roots = [span for span in spans if span.parent is None]
    assert len(roots) == 2
    assert len({span.context.trace_id for span in roots if span.context is not None}) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("exporter_setting", [None, "none", ""])
async def test_without_a_traces_exporter_tracing_is_off(
    monkeypatch: pytest.MonkeyPatch, exporter_setting: str | None
) -> None:
    if exporter_setting is None:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", exporter_setting)
    app = create_app(make_settings())
    assert app.tracing is not None
    assert app.tracing.enabled is False
    assert app.tracing.provider is None
    # The hot path gets one shared no-op context manager.
    assert app.tracing.span("a") is app.tracing.span("b", {"x": 1})
    for step in app.lifecycle.startup:
        await step()
    try:
        assert app.demo_keys is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
            response = await client.post(QUOTE, json=quote(), headers={"X-API-Key": app.demo_keys.client_key})
            assert response.status_code == 200
    finally:
        for step in reversed(app.lifecycle.shutdown):
            await step()


# --- metrics labels in-process ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_wrong_method_on_a_known_route_keeps_its_template(engine: Engine) -> None:
    assert (await engine.client.delete("/api/v1/rates/AAPL", headers=engine.as_client())).status_code == 405
    assert engine.app.metrics is not None
    recorded = {key for key in engine.app.metrics.requests if key[2] == "405"}
    assert recorded == {("DELETE", "/api/v1/rates/{ticker}", "405")}, recorded


# --- health -----------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_health_is_exactly_status_and_version(engine: Engine) -> None:
    response = await engine.client.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "healthy", "version": pricer.__version__}
    assert json.loads(response.content) == {"status": "healthy", "version": pricer.__version__}


def assert_detailed_structure(body: dict[str, object]) -> dict[str, dict[str, object]]:
    assert set(body) == {"status", "version", "dependencies"}, body
    assert body["status"] in ("healthy", "degraded", "unhealthy")
    assert body["version"] == pricer.__version__
    dependencies = body["dependencies"]
    assert isinstance(dependencies, dict)
    assert {"database", "redis", "market_data", "audit"} <= set(dependencies), dependencies
    for name, dependency in dependencies.items():
        assert isinstance(dependency, dict), name
        assert dependency["status"] in ("healthy", "degraded", "unhealthy"), (name, dependency)
        latency = dependency["latency_ms"]
        assert isinstance(latency, int | float), (name, dependency)
        assert latency >= 0, (name, dependency)
        assert set(dependency) <= {"status", "latency_ms", "detail", "reason"}, (name, dependency)
    # Market data that is not healthy says why in a sentence; healthy, it says nothing.
    market = dependencies["market_data"]
    assert ("reason" in market) == (market["status"] != "healthy"), market
    return dependencies


def assert_no_locations_or_secrets(text: str, *secrets: str) -> None:
    for forbidden in ("127.0.0.1", "localhost", "postgresql://", "postgres://", "redis://", "@", *secrets):
        assert forbidden not in text, forbidden


@pytest.mark.anyio
async def test_detailed_health_on_embedded_defaults(engine: Engine) -> None:
    response = await engine.client.get("/health/detailed")
    assert response.status_code == 200
    dependencies = assert_detailed_structure(response.json())
    # The demo availability is stamped long ago: stale market data degrades, it does not fail.
    market = dependencies["market_data"]
    assert market["status"] == "degraded"
    assert response.json()["status"] == "degraded"
    assert_no_locations_or_secrets(response.text, engine.keys.client_key, engine.keys.admin_key)
    # ... and says so: the snapshot's date (UTC, as `Z`) and MARKET_DATA_STALE_AFTER_HOURS (36 by default).
    as_of = market["detail"]["availability_as_of"]
    assert as_of.endswith("Z"), market
    assert market["reason"] == f"availability snapshot as of {as_of} is older than 36 h", market


@pytest.mark.anyio
async def test_detailed_health_with_postgres_and_redis_names_no_host_or_secret(tmp_path: Path) -> None:
    password = "pw" + uuid.uuid4().hex  # trust authentication ignores it; it must not leak either
    async with pg_schema() as (dsn, schema):
        with_password = dsn.replace("postgres@", f"postgres:{password}@", 1)
        assert password in with_password
        settings = make_settings(
            DATABASE_URL=with_password,
            DATABASE_SCHEMA=schema,
            MIGRATE_ON_START="true",
            REDIS_URL="redis://127.0.0.1:6379/14",
            AUDIT_SPOOL_DIR=str(tmp_path / "spool"),
            JWT_SECRET_KEY=JWT_SECRET,
            API_KEY_PEPPER=PEPPER,
        )
        app = create_app(settings)
        for step in app.lifecycle.startup:
            await step()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
                response = await client.get("/health/detailed")
        finally:
            for step in reversed(app.lifecycle.shutdown):
                await step()
    dependencies = assert_detailed_structure(response.json())
    assert dependencies["database"]["status"] == "healthy", dependencies
    assert dependencies["redis"]["status"] == "healthy", dependencies
    assert_no_locations_or_secrets(response.text, password, JWT_SECRET, PEPPER)


def test_children_of_a_dropped_trace_are_not_made() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    from pricer.observability.tracing import NO_SPAN, Tracing

    exporter = InMemorySpanExporter()
    dropping = TracerProvider(sampler=ALWAYS_OFF)
    dropping.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(dropping)
    with tracing.span("POST /api/v1/calculate-locate") as root:
        assert root is not None
        assert not root.is_recording()
        assert tracing.span("pricing") is NO_SPAN
    keeping = TracerProvider(sampler=ALWAYS_ON)
    keeping.add_span_processor(SimpleSpanProcessor(exporter))
    sampled = Tracing(keeping)
    with sampled.span("POST /api/v1/calculate-locate"), sampled.span("pricing") as child:
        assert child.is_recording()
    finished = [span.name for span in exporter.get_finished_spans()]
    assert finished == ["pricing", "POST /api/v1/calculate-locate"]


def test_every_logged_value_is_one_line_with_controls_escaped() -> None:
    """Any field, the message and a traceback: C0/C1 controls, DEL and U+2028/2029 escaped, never raw."""
    import logging
    import sys

    from pricer.logs import LogfmtFormatter, fields

    nasty = 'a\rb\nc\td\x00e\x1bf\x7fg\x85h\u2028i\u2029j"k\\l'
    try:
        raise ValueError(nasty)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("pricer.test", logging.WARNING, __file__, 1, nasty, None, exc_info)
    record.logfmt_fields = fields(endpoint=nasty, other=nasty, client_id="ok")["logfmt_fields"]
    line = LogfmtFormatter().format(record)
    assert line.splitlines() == [line]
    for raw in ("\r", "\n", "\t", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"):
        assert raw not in line, repr(raw)
    escaped = '"a\\rb\\nc\\td\\x00e\\x1bf\\x7fg\\x85h\\u2028i\\u2029j\\"k\\\\l"'
    assert f"msg={escaped}" in line
    assert f"endpoint={escaped}" in line
    assert f"other={escaped}" in line
    assert "exc=" in line


def _requests_total(metrics: Metrics) -> float:
    families = text_string_to_metric_families(metrics.exposition().decode())
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "http_requests_total"
    )


def test_a_worker_that_reuses_a_dead_workers_pid_keeps_its_counts(tmp_path: Path) -> None:
    """With WORKERS > 1 a worker killed outright is replaced, and the replacement may get the dead
    worker's pid (both live in this process here: the same pid). Its metrics file must not overwrite the
    dead worker's last publication, or the sums over workers go backwards (rate() sees a reset)."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    dead = Metrics(shared_dir=str(shared))
    replacement = None
    try:
        for _ in range(5):
            dead.observe_request("GET", "/health", 200, 0.001)
        assert _requests_total(dead) == 5  # published: the dead worker's last word
        replacement = Metrics(shared_dir=str(shared))
        replacement.observe_request("GET", "/health", 200, 0.001)
        assert _requests_total(replacement) == 6
        assert len(list(shared.glob("worker-*.msgpack"))) == 2
    finally:
        dead.shutdown()
        if replacement is not None:
            replacement.shutdown()
