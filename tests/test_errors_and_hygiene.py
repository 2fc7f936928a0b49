"""The error envelope (DESIGN §2.3), request ids, security headers, body limits, and the OpenAPI document
and docs page (DESIGN §2)."""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import Engine, RunningServer, make_settings, start_server, started_app, stop_server

pytestmark = pytest.mark.anyio

QUOTE = "/api/v1/calculate-locate"
BATCH = "/api/v1/calculate-locate/batch"
GOOD_QUOTE = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}
SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
ENVELOPE = {"status", "error", "error_code", "details", "request_id"}

Call = Callable[[Engine], Awaitable[httpx.Response]]


@contextlib.asynccontextmanager
async def custom_engine(**overrides: str) -> AsyncIterator[Engine]:
    app = await started_app(make_settings(**overrides))
    assert app.demo_keys is not None
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine.test"
    ) as client:
        yield Engine(app=app, client=client, keys=app.demo_keys)


def json_headers(engine: Engine, admin: bool = False) -> dict[str, str]:
    return {**(engine.as_admin() if admin else engine.as_client()), "Content-Type": "application/json"}


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b" " * piece


# ---- the envelope --------------------------------------------------------------------------------------

ERROR_CALLS: list[Any] = [
    pytest.param(
        lambda e: e.client.post(QUOTE, content=b"{oops", headers=json_headers(e)),
        400,
        "INVALID_PARAMETER",
        id="400-malformed",
    ),
    pytest.param(
        lambda e: e.client.post(QUOTE, json={**GOOD_QUOTE, "loan_days": 0}, headers=e.as_client()),
        400,
        "INVALID_PARAMETER",
        id="400-range",
    ),
    pytest.param(
        lambda e: e.client.get("/api/v1/rates/A.B.C", headers=e.as_client()),
        400,
        "INVALID_PARAMETER",
        id="400-path",
    ),
    pytest.param(
        lambda e: e.client.post(
            f"{BATCH}?atomic=true",
            json={
                "client_id": "demo_client",
                "positions": [{"ticker": "AAPL", "position_value": 0, "loan_days": 1}],
            },
            headers=e.as_client(),
        ),
        400,
        "INVALID_PARAMETER",
        id="400-atomic",
    ),
    pytest.param(
        lambda e: e.client.post(
            "/api/v1/admin/availability",
            content="#BOF|bad\r\n",
            headers={**e.as_admin(), "Content-Type": "text/plain"},
        ),
        400,
        "INVALID_PARAMETER",
        id="400-file",
    ),
    pytest.param(lambda e: e.client.post(QUOTE, json=GOOD_QUOTE), 401, "UNAUTHORIZED", id="401"),
    pytest.param(
        lambda e: e.client.post(QUOTE, json={**GOOD_QUOTE, "client_id": "xyz123"}, headers=e.as_client()),
        403,
        "FORBIDDEN",
        id="403",
    ),
    pytest.param(lambda e: e.client.get("/no/such/path"), 404, "NOT_FOUND", id="404-path"),
    pytest.param(
        lambda e: e.client.get("/api/v1/rates/ZZZZ", headers=e.as_client()),
        404,
        "TICKER_NOT_FOUND",
        id="404-ticker",
    ),
    pytest.param(
        lambda e: e.client.post(QUOTE, json={**GOOD_QUOTE, "client_id": "nobody"}, headers=e.as_admin()),
        404,
        "CLIENT_NOT_FOUND",
        id="404-client",
    ),
    pytest.param(
        lambda e: e.client.get("/api/v1/quotes/" + "0" * 32, headers=e.as_client()),
        404,
        "NOT_FOUND",
        id="404-quote",
    ),
    pytest.param(lambda e: e.client.delete("/health"), 405, "METHOD_NOT_ALLOWED", id="405"),
    pytest.param(
        lambda e: e.client.post(QUOTE, content=b" " * (2 << 20), headers=json_headers(e)),
        413,
        "PAYLOAD_TOO_LARGE",
        id="413",
    ),
    pytest.param(
        lambda e: e.client.post(
            QUOTE, content=b"{}", headers={**e.as_client(), "Content-Type": "text/plain"}
        ),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        id="415",
    ),
]


@pytest.mark.parametrize(("call", "status", "code"), ERROR_CALLS)
async def test_every_error_uses_the_envelope(engine: Engine, call: Call, status: int, code: str) -> None:
    response = await call(engine)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json"
    body = response.json()
    assert set(body) >= ENVELOPE
    assert body["status"] == "error"
    assert body["error_code"] == code
    assert isinstance(body["error"], str)
    assert body["error"]
    assert body["details"] is None or isinstance(body["details"], dict)
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    assert engine.keys.client_key not in response.text
    assert engine.keys.admin_key not in response.text
    if code == "INVALID_PARAMETER":
        assert set(body) == ENVELOPE | {"validation_errors", "valid_params"}
        assert body["validation_errors"]
        for problem in body["validation_errors"]:
            assert set(problem) == {"field", "location", "message"}
            assert all(isinstance(value, str) and value for value in problem.values())
        assert isinstance(body["valid_params"], list)
    else:
        assert set(body) == ENVELOPE


# ---- request ids and headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id", ["abc-123", "req_1.2:3", "A" * 128, "0f8fad5b-d9cb-469f-a165-70867728950e"]
)
async def test_a_sane_request_id_is_echoed(engine: Engine, request_id: str) -> None:
    for response in (
        await engine.client.get("/health", headers={"X-Request-ID": request_id}),
        await engine.client.post(
            QUOTE, json=GOOD_QUOTE, headers={**engine.as_client(), "X-Request-ID": request_id}
        ),
        await engine.client.get("/nowhere", headers={"X-Request-ID": request_id}),
    ):
        assert response.headers["x-request-id"] == request_id
        assert response.headers["x-correlation-id"] == request_id
        if response.status_code >= 400:
            assert response.json()["request_id"] == request_id


@pytest.mark.parametrize(
    "request_id", ["x" * 300, "has spaces in it", "<script>alert(1)</script>", 'a"b', "semi;colon", "A" * 129]
)
async def test_an_insane_request_id_is_replaced(engine: Engine, request_id: str) -> None:
    for response in (
        await engine.client.get("/health", headers={"X-Request-ID": request_id}),
        await engine.client.get(
            "/api/v1/rates/ZZZZ", headers={**engine.as_client(), "X-Request-ID": request_id}
        ),
    ):
        replaced = response.headers["x-request-id"]
        assert replaced != request_id
        assert SANE_ID.fullmatch(replaced)
        assert response.headers["x-correlation-id"] == replaced
        if response.status_code >= 400:
            assert response.json()["request_id"] == replaced


async def test_request_ids_are_generated_and_distinct(engine: Engine) -> None:
    seen = set()
    for _ in range(5):
        response = await engine.client.get("/health")
        assert SANE_ID.fullmatch(response.headers["x-request-id"])
        assert response.headers["x-correlation-id"] == response.headers["x-request-id"]
        seen.add(response.headers["x-request-id"])
    assert len(seen) == 5


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.client.get("/health"),
        lambda e: e.client.get("/docs"),
        lambda e: e.client.post(QUOTE, json=GOOD_QUOTE, headers=e.as_client()),
        lambda e: e.client.get("/api/v1/rates/AAPL", headers=e.as_client()),
        lambda e: e.client.post(QUOTE, json=GOOD_QUOTE),
        lambda e: e.client.get("/missing"),
    ],
)
async def test_security_headers_on_every_response(engine: Engine, call: Call) -> None:
    response = await call(engine)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "no-store" in response.headers["cache-control"]
    assert response.headers.get("referrer-policy")
    assert "server" not in response.headers or "uvicorn" not in response.headers["server"].lower()


# ---- body limits -----------------------------------------------------------------------------------------


async def test_body_over_the_default_limit_is_413_with_and_without_content_length(engine: Engine) -> None:
    over = (1 << 20) + 1
    declared = await engine.client.post(QUOTE, content=b" " * over, headers=json_headers(engine))
    assert declared.status_code == 413, declared.text
    assert declared.json()["error_code"] == "PAYLOAD_TOO_LARGE"
    request = engine.client.build_request("POST", QUOTE, content=chunks(over), headers=json_headers(engine))
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    streamed = await engine.client.send(request)
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["error_code"] == "PAYLOAD_TOO_LARGE"
    # Just under the limit is read (and then judged on its content).
    under = await engine.client.post(
        QUOTE,
        content=msgspec.json.encode(GOOD_QUOTE) + b" " * ((1 << 20) - 200),
        headers=json_headers(engine),
    )
    assert under.status_code == 200, under.text


async def test_declared_oversized_body_is_413_before_authentication(engine: Engine) -> None:
    response = await engine.client.post(
        QUOTE, content=b" " * ((1 << 20) + 1), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text


async def test_configured_limits_for_single_and_batch_routes() -> None:
    async with custom_engine(MAX_BODY_BYTES="2048", MAX_BATCH_BODY_BYTES="8192") as engine:
        quote = msgspec.json.encode(GOOD_QUOTE)
        fits = await engine.client.post(
            QUOTE, content=quote + b" " * (2048 - len(quote)), headers=json_headers(engine)
        )
        assert fits.status_code == 200, fits.text
        for content in (quote + b" " * 2000, chunks(3000, size=500)):
            response = await engine.client.post(QUOTE, content=content, headers=json_headers(engine))
            assert response.status_code == 413, response.text

        row = {"ticker": "AAPL", "position_value": 10, "loan_days": 1}
        batch = msgspec.json.encode({"client_id": "demo_client", "positions": [row] * 80})
        assert 2048 < len(batch) <= 8192
        ok = await engine.client.post(BATCH, content=batch, headers=json_headers(engine))
        assert ok.status_code == 200, ok.text
        assert ok.json()["priced"] == 80
        big = msgspec.json.encode({"client_id": "demo_client", "positions": [row] * 200})
        assert len(big) > 8192

        async def stream(data: bytes) -> AsyncIterator[bytes]:
            for start in range(0, len(data), 1000):
                yield data[start : start + 1000]

        for content in (big, stream(big)):
            response = await engine.client.post(BATCH, content=content, headers=json_headers(engine))
            assert response.status_code == 413, response.text
            assert response.json()["details"]["max_bytes"] == 8192


# ---- OpenAPI and docs ---------------------------------------------------------------------------------

DESIGN_OPERATIONS = {
    "/health": {"get"},
    "/health/detailed": {"get"},
    "/api/v1/calculate-locate": {"get", "post"},
    "/api/v1/calculate-locate/batch": {"post"},
    "/api/v1/rates/{ticker}": {"get"},
    "/api/v1/rates": {"get"},
    "/api/v1/quotes/{quote_id}": {"get"},
    "/api/v1/auth/token": {"post"},
    "/api/v1/admin/clients/{client_id}": {"put"},
    "/api/v1/admin/stocks/{ticker}": {"put"},
    "/api/v1/admin/availability": {"post"},
    "/api/v1/admin/vix-history": {"post"},
    "/api/v1/admin/earnings-calendar": {"post"},
    "/api/v1/admin/volatility": {"put"},
    "/api/v1/admin/events/{ticker}": {"put"},
    "/api/v1/admin/keys": {"post"},
    "/api/v1/admin/keys/{key_id}": {"delete"},
}
SCHEMAS = {
    "QuoteRequest", "QuoteResponse", "ErrorBody", "ValidationProblem", "BatchRequest", "BatchResponse",
    "BatchQuote", "RowError", "RateResponse", "RateListResponse", "ClientBody", "ClientView", "StockBody",
    "VolatilityBody", "EventsBody", "KeyBody", "IssuedKey", "TokenResponse", "Health", "DetailedHealth",
}  # fmt: skip
OPEN_PATHS = {"/health", "/health/detailed"}


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


async def test_openapi_document(engine: Engine) -> None:
    response = await engine.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert document["info"]["version"] == (await engine.client.get("/health")).json()["version"]
    paths = document["paths"]
    for path, methods in DESIGN_OPERATIONS.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    for route in engine.app.routes:
        if route.path not in {"/openapi.json", "/docs", "/metrics"}:
            assert route.path in paths, route.path
    schemas = document["components"]["schemas"]
    assert set(schemas) >= SCHEMAS
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref
    quote_request = schemas["QuoteRequest"]
    assert set(quote_request["required"]) == {"ticker", "position_value", "loan_days", "client_id"}
    assert set(quote_request["properties"]) == {"ticker", "position_value", "loan_days", "client_id"}
    assert set(schemas["ErrorBody"]["properties"]) >= ENVELOPE | {"validation_errors", "valid_params"}
    # Requests and responses are wired to their schemas.
    post_quote = paths["/api/v1/calculate-locate"]["post"]
    assert post_quote["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/QuoteRequest"
    )
    assert post_quote["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/QuoteResponse"
    )
    assert post_quote["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorBody"
    )
    get_quote = paths["/api/v1/calculate-locate"]["get"]
    assert {p["name"] for p in get_quote["parameters"] if p["in"] == "query"} == set(
        quote_request["required"]
    )
    batch_media = set(paths["/api/v1/calculate-locate/batch"]["post"]["requestBody"]["content"])
    assert batch_media == {"application/json", "application/msgpack"}
    assert paths["/api/v1/rates/{ticker}"]["get"]["parameters"][0]["name"] == "ticker"
    # Security: protected operations say so; open ones do not.
    schemes = document["components"]["securitySchemes"]
    assert any(s.get("type") == "apiKey" and s.get("name") == "X-API-Key" for s in schemes.values())
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path in OPEN_PATHS:
                assert not operation.get("security"), (path, method)
            else:
                assert operation.get("security"), (path, method)
                assert "401" in operation["responses"], (path, method)


async def test_docs_page_works_offline(engine: Engine) -> None:
    response = await engine.client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "openapi.json" in html
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", html, flags=re.IGNORECASE)
    for tag in tags:
        assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", tag, flags=re.IGNORECASE), tag
    assert not re.search(r"@import|url\(\s*[\"']?(?:https?:)?//", html, flags=re.IGNORECASE)
    assert not re.search(r"(?:import|fetch)\s*\(\s*[\"'](?:https?:)?//", html, flags=re.IGNORECASE)
    external = re.findall(r"https?://[^\s\"'<>]+", html)
    assert not [url for url in external if "engine.test" not in url and "localhost" not in url], external


# ---- faults at the edge: a client that goes away, a dependency down, values that would forge log lines ----


def metric_lines(server: RunningServer, endpoint: str) -> list[str]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return [
        line
        for line in text.splitlines()
        if line.startswith("http_requests_total{") and f'endpoint="{endpoint}"' in line
    ]


@pytest.mark.e2e
def test_a_client_that_disconnects_mid_body_is_not_a_server_error(tmp_path: Path) -> None:
    """Headers announcing 100,000 bytes, half of them, then the socket closes: the engine reads
    http.disconnect. That is the client's doing: counted as 499 (not 500), no ERROR line, no traceback."""
    server = start_server(tmp_path, SHUTDOWN_DRAIN_SECONDS="0", SLOW_REQUEST_MS="60000")
    try:
        port = int(server.base_url.rsplit(":", 1)[1])
        head = (
            f"POST {QUOTE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {server.keys['DEMO_CLIENT_KEY']}\r\nX-Request-ID: gone-mid-body\r\n"
            "Content-Length: 100000\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + b" " * 50_000)
            time.sleep(0.3)  # let the engine start reading the body before the client goes
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any('status_code="499"' in line for line in metric_lines(server, QUOTE)):
                break
            time.sleep(0.1)
        lines = metric_lines(server, QUOTE)
        assert any('status_code="499"' in line for line in lines), lines
        assert not any('status_code="500"' in line for line in lines), lines
        log = server.log()
        assert "Traceback" not in log, log
        assert "level=ERROR" not in log, log
        gone = [line for line in log.split("\n") if "request_id=gone-mid-body" in line]
        assert len(gone) == 1, gone
        assert gone[0].startswith('level=INFO msg="Client disconnected"'), gone
        # The engine goes on serving.
        client = {"X-API-Key": server.keys["DEMO_CLIENT_KEY"]}
        ok = httpx.post(f"{server.base_url}{QUOTE}", json=GOOD_QUOTE, headers=client)
        assert ok.status_code == 200, ok.text
    finally:
        stop_server(server)


# Names that a 503 must not show: the store operations, the exception classes a dead database raises.
INTERNAL_NAMES = (
    "keys.get",
    "operation",
    "cause",
    "sqlstate",
    "Error",
    "Exception",
    "ServiceUnavailable",
    "asyncpg",
    "Refused",
)


@pytest.mark.e2e
def test_a_503_names_the_dependency_not_internals(tmp_path: Path) -> None:
    """A private PostgreSQL is stopped; a key the engine never saw needs the key store: 503, naming the
    database as the dependency and nothing of how the engine reached it. /health/detailed neither."""
    from tests.private_postgres import PrivatePostgres
    from tests.test_postgres_engine import start_engine

    with PrivatePostgres() as pg:
        server = start_engine(
            tmp_path,
            {
                "DATABASE_URL": pg.dsn,
                "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
                "SHUTDOWN_DRAIN_SECONDS": "0",
                "JWT_SECRET_KEY": "jwt-" + secrets.token_hex(32),
                "API_KEY_PEPPER": "pepper-" + secrets.token_hex(32),
            },
        )
        try:
            pg.stop("fast")
            uncached = "bre_neverseen0001_" + secrets.token_hex(20)
            response = httpx.get(
                f"{server.base_url}/api/v1/rates/AAPL", headers={"X-API-Key": uncached}, timeout=30
            )
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["error_code"] == "SERVICE_UNAVAILABLE"
            assert body["error"] == "The key store (database) is unavailable", body
            assert body["details"] == {"dependency": "database"}, body
            for name in INTERNAL_NAMES:
                assert name not in response.text, (name, response.text)
            assert response.headers["retry-after"] == "1"

            # What the body leaves out is logged for operators: once a second, with a count of the rest.
            started = time.monotonic()
            for n in range(20):
                again = httpx.get(
                    f"{server.base_url}/api/v1/rates/AAPL",
                    headers={"X-API-Key": f"bre_neverseen{n:04d}_" + secrets.token_hex(20)},
                    timeout=30,
                )
                assert again.status_code == 503, again.text
            seconds = time.monotonic() - started
            lines = [line for line in server.log().split("\n") if 'msg="Backend service error"' in line]
            assert lines, server.log()
            assert len(lines) <= 2 + seconds, lines  # one a second, not one per request
            assert "service=database" in lines[0]
            assert "operation=keys.get" in lines[0]
            assert "cause=" in lines[0]

            detailed = httpx.get(f"{server.base_url}/health/detailed", timeout=30)
            assert detailed.status_code == 503, detailed.text
            assert detailed.json()["dependencies"]["database"]["status"] == "unhealthy", detailed.text
            for name in INTERNAL_NAMES:
                assert name not in detailed.text, (name, detailed.text)
        finally:
            stop_server(server)


@pytest.mark.e2e
def test_control_characters_from_a_client_are_escaped_in_the_log(tmp_path: Path) -> None:
    """A field name with \\r, \\n, NUL, ESC and U+2028 reaches the `Validation error` line (msgspec names the
    unknown field): it stays one line, every control character written as an escape, none raw."""
    server = start_server(tmp_path, SHUTDOWN_DRAIN_SECONDS="0")
    try:
        forged = 'x\rlevel=ERROR msg="Forged"\nlevel=ERROR msg="Forged2"\x00\x1b[2J\u2028end'
        body = msgspec.json.encode({**GOOD_QUOTE, forged: 1})
        response = httpx.post(
            f"{server.base_url}{QUOTE}",
            content=body,
            headers={
                "X-API-Key": server.keys["DEMO_CLIENT_KEY"],
                "Content-Type": "application/json",
                "X-Request-ID": "log-injection-1",
            },
        )
        assert response.status_code == 400, response.text
        deadline = time.monotonic() + 10
        while "request_id=log-injection-1" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log_path.read_bytes().decode()  # as written: read_text() would turn a raw \r into \n
        for raw in ("\r", "\x00", "\x1b", "\u2028"):
            assert raw not in log, (raw, log)
        lines = [line for line in log.split("\n") if "Forged" in line]
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith('level=WARNING msg="Validation error"'), line
        assert "request_id=log-injection-1" in line
        assert '\\rlevel=ERROR msg=\\"Forged\\"\\nlevel=ERROR' in line, line
        assert "\\x00\\x1b[2J\\u2028end" in line, line
        assert not any(line.startswith('level=ERROR msg="Forged') for line in log.split("\n"))
    finally:
        stop_server(server)
