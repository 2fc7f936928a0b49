"""The gateway's call of one backend service (pricer.gateway.service), against real peers on loopback, and
the internal credential backends admit (pricer.auth.internal); the processes themselves are in
tests/test_roles.py.

Retries: a GET once after a failure that is not a timeout; any method once when nothing can have been sent;
a POST whose request may have arrived never; a timeout never. The breaker counts transport failures only.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import socket
import time

import pytest
from starlette.requests import Request
from starlette.responses import Response

from pricer.auth.internal import LIFETIME_SECONDS, InternalCredentials
from pricer.auth.keys import Principal
from pricer.context import PRINCIPAL_KEY, REQUEST_ID_KEY
from pricer.errors import (
    BackendServiceFailed,
    BackendServiceTimeout,
    BackendServiceUnavailable,
    Unauthorized,
)
from pricer.gateway.service import CALCULATION_SERVICE, ServiceClient
from pricer.gateway.wiring import gateway_wiring
from pricer.models import Scope
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import build_tracing
from pricer.outbound.breaker import BreakerState, CircuitBreaker
from pricer.outbound.http import HttpClient
from pricer.routing import ApiRoute
from pricer.settings import SettingsError
from tests.conftest import TEST_SECRETS, make_settings
from tests.test_outbound import answer, read_request, scripted_peer

pytestmark = pytest.mark.anyio


def service(url: str, *, failures_to_open: int = 3) -> tuple[ServiceClient, Metrics]:
    metrics = Metrics()
    breaker = CircuitBreaker(CALCULATION_SERVICE, failures_to_open=failures_to_open, open_seconds=30)
    return ServiceClient(CALCULATION_SERVICE, HttpClient(url), breaker, metrics), metrics


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_a_read_is_retried_once_after_a_broken_answer_a_write_is_not() -> None:
    seen: list[bytes] = []

    async def first_breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            seen.append(request)
            if len(seen) % 2 == 1:  # every other request: closed without an answer
                writer.close()
                return
            writer.write(answer(200, b'{"ok":true}', b"Content-Type: application/json"))
            await writer.drain()

    async with scripted_peer(first_breaks) as url:
        client, metrics = service(url)
        response = await client.call("GET", "/api/v1/quotes/x", headers={}, body=b"", seconds=2)
        assert response.status == 200
        assert len(seen) == 2  # one retry
        with pytest.raises(BackendServiceFailed) as failed:
            await client.call("POST", "/api/v1/calculate-locate", headers={}, body=b"{}", seconds=2)
        assert len(seen) == 3  # the POST may have arrived: not sent again
        assert failed.value.status == 502
        assert failed.value.details == {"service": CALCULATION_SERVICE}
    assert metrics.backend_requests[(CALCULATION_SERVICE, "success")] == 1
    assert metrics.backend_requests[(CALCULATION_SERVICE, "error")] == 1
    series = metrics.backend_duration.series[(CALCULATION_SERVICE,)]
    assert series.count == 2


async def test_a_get_quote_is_not_sent_again_after_a_broken_answer_a_quote_read_back_is() -> None:
    """A GET quote prices and records a quote: the service may have done both before the connection broke,
    so the gateway's forwarding route must not send it again (two audit records for one answer). Found
    in review: every GET was retried, calculate-locate's GET form included."""
    seen: list[bytes] = []
    broken: set[bytes] = set()

    async def first_breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            seen.append(request)
            target = request.split(b" ")[1]
            if target not in broken:  # each target's first request: read, then closed without an answer
                broken.add(target)
                writer.close()
                return
            writer.write(answer(200, b'{"ok":true}', b"Content-Type: application/json"))
            await writer.drain()

    async def unused(_request: Request) -> Response:
        raise AssertionError("the gateway forwards this route")

    async with scripted_peer(first_breaks) as url:
        settings = make_settings(
            ROLE="gateway",
            DATABASE_URL="postgresql://x@127.0.0.1/db",
            INTERNAL_SERVICE_SECRET="s" * 32,
            CALCULATION_SERVICE_URL=url,
            DATA_SERVICE_URL=url,
            **TEST_SECRETS,
        )
        wiring = gateway_wiring(settings, metrics=Metrics(), tracing=build_tracing())
        assert wiring.forward is not None
        forwarded = {
            path: wiring.forward(
                ApiRoute(path, unused, methods=["GET"], scope=Scope.QUOTE, body_limit=1024)
            ).endpoint
            for path in ("/api/v1/calculate-locate", "/api/v1/quotes/{quote_id}")
        }

        def get(path: str, query: bytes) -> Request:
            return Request(
                {
                    "type": "http",
                    "method": "GET",
                    "path": path,
                    "raw_path": path.encode(),
                    "query_string": query,
                    "headers": [],
                    REQUEST_ID_KEY: "req-1",
                    PRINCIPAL_KEY: PRINCIPAL,
                }
            )

        quote = get("/api/v1/calculate-locate", b"ticker=AAPL&position_value=100&loan_days=30")
        with pytest.raises(BackendServiceFailed):
            await forwarded["/api/v1/calculate-locate"](quote)
        assert len(seen) == 1  # priced (maybe) once, not twice
        read_back = await forwarded["/api/v1/quotes/{quote_id}"](get("/api/v1/quotes/q1", b""))
        assert read_back.status_code == 200
        assert len(seen) == 3  # a read-back is safe to send again: one retry
        for shutdown in wiring.shutdown:
            await shutdown()


async def test_a_repeated_content_type_is_forwarded_as_role_all_reads_it_the_first() -> None:
    """ROLE=all decodes a body by its first Content-Type (and answers by the first Accept); found in
    review: the gateway forwarded the last one, so a body sent with two types was decoded as the other
    media by the calculation service."""
    seen: list[bytes] = []

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(answer(200, b'{"ok":true}', b"Content-Type: application/json"))
            await writer.drain()

    async def unused(_request: Request) -> Response:
        raise AssertionError("the gateway forwards this route")

    async with scripted_peer(answers) as url:
        settings = make_settings(
            ROLE="gateway",
            DATABASE_URL="postgresql://x@127.0.0.1/db",
            INTERNAL_SERVICE_SECRET="s" * 32,
            CALCULATION_SERVICE_URL=url,
            DATA_SERVICE_URL=url,
            **TEST_SECRETS,
        )
        wiring = gateway_wiring(settings, metrics=Metrics(), tracing=build_tracing())
        assert wiring.forward is not None
        path = "/api/v1/calculate-locate"
        route = ApiRoute(path, unused, methods=["POST"], scope=Scope.QUOTE, body_limit=1024)
        body = b'{"ticker":"AAPL"}'

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(
            {
                "type": "http",
                "method": "POST",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"accept", b"application/json"),
                    (b"content-type", b"application/msgpack"),
                    (b"accept", b"application/msgpack"),
                ],
                REQUEST_ID_KEY: "req-1",
                PRINCIPAL_KEY: PRINCIPAL,
            },
            receive,
        )
        response = await wiring.forward(route).endpoint(request)
        assert response.status_code == 200
        (sent,) = seen
        head = sent.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
        assert [line for line in head if line.startswith((b"content-type:", b"accept:"))] == [
            b"content-type: application/json",
            b"accept: application/json",
        ]
        for shutdown in wiring.shutdown:
            await shutdown()


async def test_refused_connections_retry_once_then_open_the_breaker_which_answers_at_once() -> None:
    client, metrics = service(closed_port_url(), failures_to_open=2)
    for _ in range(2):
        with pytest.raises(BackendServiceFailed):
            await client.call("POST", "/api/v1/calculate-locate", headers={}, body=b"{}", seconds=2)
    assert client.breaker.state is BreakerState.OPEN
    started = time.perf_counter()
    with pytest.raises(BackendServiceUnavailable) as refused:
        await client.call("GET", "/api/v1/quotes/x", headers={}, body=b"", seconds=2)
    assert time.perf_counter() - started < 0.05
    assert refused.value.status == 503
    assert 29 <= refused.value.retry_after <= 30
    assert metrics.backend_requests[(CALCULATION_SERVICE, "error")] == 3


async def test_a_timeout_is_not_retried_and_takes_the_deadline() -> None:
    seen: list[bytes] = []

    async def hangs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        await asyncio.sleep(10)

    async with scripted_peer(hangs) as url:
        client, _ = service(url)
        started = time.perf_counter()
        with pytest.raises(BackendServiceTimeout) as timed_out:
            await client.call("GET", "/api/v1/rates/AAPL", headers={}, body=b"", seconds=0.3)
        elapsed = time.perf_counter() - started
    assert 0.29 <= elapsed < 1.5
    assert len(seen) == 1
    assert timed_out.value.status == 504


async def test_a_service_that_answers_5xx_is_up_its_answer_is_relayed() -> None:
    async def fails_politely(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer(503, b'{"status":"error"}', b"Retry-After: 1"))
            await writer.drain()

    async with scripted_peer(fails_politely) as url:
        client, metrics = service(url, failures_to_open=1)
        for _ in range(3):
            response = await client.call("GET", "/health", headers={}, body=b"", seconds=2)
            assert response.status == 503
            assert response.headers["retry-after"] == "1"
    assert client.breaker.state is BreakerState.CLOSED
    assert metrics.backend_requests[(CALCULATION_SERVICE, "error")] == 3


# ---- the internal credential --------------------------------------------------------------------------

PRINCIPAL = Principal(
    key_id="abcd1234", client_id="demo_client", scopes=frozenset({Scope.QUOTE, Scope.RATES})
)


def test_a_credential_states_the_principal_for_its_request_only() -> None:
    credentials = InternalCredentials("s" * 32)
    header = credentials.sign(PRINCIPAL, "req-1").encode()
    assert credentials.verify(header, "req-1") == PRINCIPAL
    assert credentials.verify(header, "req-1") == PRINCIPAL  # cached
    with pytest.raises(Unauthorized):
        credentials.verify(header, "req-2")
    anonymous = credentials.sign(None, "req-3").encode()
    assert credentials.verify(anonymous, "req-3") is None


def test_the_credential_mac_is_hmac_sha256_of_the_secret() -> None:
    # A gateway and a backend of different versions sign and check the same bytes; the MAC is built from
    # precomputed keyed states, so it is compared with the standard library's for short and long secrets.
    for secret in ("s" * 32, "a much longer secret than one SHA-256 block of sixty-four bytes, so hashed"):
        credentials = InternalCredentials(secret)
        for payload in (b"", b"x", b"payload" * 40):
            assert credentials.mac(payload) == hmac.digest(secret.encode(), payload, "sha256")
    credentials = InternalCredentials("s" * 32)
    header = credentials.sign(PRINCIPAL, "req-1")
    payload, signature = header.split(".")[1:]
    expected = base64.urlsafe_b64encode(hmac.digest(b"s" * 32, payload.encode(), "sha256")).rstrip(b"=")
    assert signature == expected.decode()


def test_forged_tampered_expired_or_missing_credentials_are_refused() -> None:
    now = [1_000_000.0]
    credentials = InternalCredentials("s" * 32, clock=lambda: now[0])
    header = credentials.sign(PRINCIPAL, "req-1")
    forged = InternalCredentials("t" * 32).sign(PRINCIPAL, "req-1")
    version, payload, signature = header.split(".")
    admin = InternalCredentials("t" * 32).sign(
        Principal(key_id=None, client_id="admin", scopes=frozenset({Scope.ADMIN})), "req-1"
    )
    tampered = f"{version}.{admin.split('.')[1]}.{signature}"
    for bad in (forged, tampered, "v1.x.y", "v2." + payload + "." + signature, "garbage", ""):
        with pytest.raises(Unauthorized) as refused:
            credentials.verify(bad.encode(), "req-1")
        assert refused.value.status == 401
    with pytest.raises(Unauthorized):
        credentials.verify(None, "req-1")
    assert credentials.verify(header.encode(), "req-1") == PRINCIPAL
    # Its principal's parse is cached now; the signature is still checked on every call.
    resigned = f"{version}.{payload}.{forged.split('.')[2]}"
    with pytest.raises(Unauthorized):
        credentials.verify(resigned.encode(), "req-1")
    now[0] += LIFETIME_SECONDS + 1
    with pytest.raises(Unauthorized):
        credentials.verify(header.encode(), "req-1")  # expired, though its check is cached


# ---- settings -------------------------------------------------------------------------------------------


def test_split_roles_need_their_urls_the_secret_and_the_database() -> None:
    database = {"DATABASE_URL": "postgresql://x@127.0.0.1/db", **TEST_SECRETS}
    secret = {"INTERNAL_SERVICE_SECRET": "x" * 16}
    urls = {"CALCULATION_SERVICE_URL": "http://calc:80", "DATA_SERVICE_URL": "http://data:80"}
    refusals = {
        "CALCULATION_SERVICE_URL": {"ROLE": "gateway", **database, **secret},
        "DATA_SERVICE_URL": {
            "ROLE": "gateway",
            **database,
            **secret,
            "CALCULATION_SERVICE_URL": "http://calc:80",
        },
        "INTERNAL_SERVICE_SECRET": {"ROLE": "calculation", **database},
        "DATABASE_URL": {"ROLE": "data", **secret},
    }
    for variable, env in refusals.items():
        with pytest.raises(SettingsError, match=variable):
            make_settings(**env)
    with pytest.raises(SettingsError, match="INTERNAL_SERVICE_SECRET: at least 16"):
        make_settings(ROLE="data", **database, INTERNAL_SERVICE_SECRET="short")
    with pytest.raises(SettingsError, match="CALCULATION_SERVICE_URL: expected http"):
        make_settings(ROLE="gateway", **database, **secret, **{**urls, "CALCULATION_SERVICE_URL": "calc:80"})
    assert make_settings(ROLE="gateway", **database, **secret, **urls).role == "gateway"
    assert make_settings(ROLE="calculation", **database, **secret).role == "calculation"
    assert make_settings().role == "all"
