"""Connection hygiene against a real server process over real loopback sockets (issue 16, item 5).

Slowloris clients are closed after HEADER_READ_TIMEOUT_SECONDS while /health keeps answering; a header
over MAX_HEADER_BYTES is refused (431); a stalled body gets 408 after BODY_READ_TIMEOUT_SECONDS; past
MAX_CONNECTIONS requests get 503; the soft open-file limit is raised to the hard one.
"""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pricer.settings import SettingsError, load_settings
from tests.conftest import RunningServer, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HEADER_TIMEOUT = 2.0
SLOW_CLIENTS = 200


@contextlib.contextmanager
def server(tmp_path: Path, **env: str) -> Iterator[RunningServer]:
    running = start_server(tmp_path, LOG_LEVEL="WARNING", **env)
    try:
        yield running
    finally:
        stop_server(running)


def address(running: RunningServer) -> tuple[str, int]:
    host, port = running.base_url.removeprefix("http://").split(":")
    return host, int(port)


def read_response(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (or the deadline)."""
    received = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        received += chunk
    return received


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> dict[str, object]:
    document: dict[str, object] = json.loads(response.split(b"\r\n\r\n", 1)[1])
    return document


def test_slowloris_connections_are_closed_after_the_header_timeout_while_health_answers(
    tmp_path: Path,
) -> None:
    with server(tmp_path, HEADER_READ_TIMEOUT_SECONDS=str(HEADER_TIMEOUT)) as running:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        slow: dict[socket.socket, int] = {}  # open slow connection -> bytes sent
        closed_after: list[float] = []
        opened_at = time.monotonic()
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection(address(running), timeout=5)
            sock.setblocking(False)
            sock.send(request[:1])
            slow[sock] = 1
        health: list[tuple[int | None, float]] = []
        deadline = opened_at + HEADER_TIMEOUT + 15
        try:
            while slow and time.monotonic() < deadline:  # one byte a second on each connection
                for sock in list(slow):
                    ready, _, _ = select.select([sock], [], [], 0)
                    gone = bool(ready)  # an answer (408) or EOF: the server is closing it
                    if not gone:
                        try:
                            sock.send(request[slow[sock] : slow[sock] + 1])
                            slow[sock] += 1
                        except OSError:
                            gone = True
                    if gone:
                        closed_after.append(time.monotonic() - opened_at)
                        del slow[sock]
                        sock.close()
                started = time.monotonic()
                try:
                    status: int | None = httpx.get(f"{running.base_url}/health", timeout=5).status_code
                except httpx.HTTPError:
                    status = None
                health.append((status, time.monotonic() - started))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        finally:
            for sock in slow:
                sock.close()
        assert not slow, (
            f"{len(slow)} of {SLOW_CLIENTS} slow connections still open after {deadline - opened_at:.0f} s"
        )
        assert min(closed_after) >= HEADER_TIMEOUT - 0.5, sorted(closed_after)[:5]
        assert all(status == 200 for status, _ in health), health
        assert all(seconds < 3.0 for _, seconds in health), health
        assert running.process.poll() is None


def test_a_huge_header_is_refused_and_a_normal_one_served(tmp_path: Path) -> None:
    with server(tmp_path) as running:
        with socket.create_connection(address(running), timeout=10) as sock:
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
            with contextlib.suppress(OSError):  # the server may close before it has read it all
                sock.sendall(head + b"a" * (1 << 20) + b"\r\n\r\n")
            response = read_response(sock, time.monotonic() + 10)
        assert status_of(response) in (431, None), response[:200]
        if response:
            body = body_of(response)
            assert body["error_code"] == "HEADERS_TOO_LARGE"
            assert body["status"] == "error"
        # 32 KiB of headers (under the 64 KiB default) are fine.
        ok = httpx.get(f"{running.base_url}/health", headers={"X-Big": "a" * (32 << 10)}, timeout=10)
        assert ok.status_code == 200


def test_a_stalled_body_gets_408(tmp_path: Path) -> None:
    with server(tmp_path, BODY_READ_TIMEOUT_SECONDS="1.5") as running:
        key = running.keys["DEMO_CLIENT_KEY"]
        with socket.create_connection(address(running), timeout=10) as sock:
            sock.sendall(
                b"POST /api/v1/calculate-locate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"X-API-Key: {key}\r\nContent-Length: 200\r\n\r\n".encode()
                + b'{"ticker": "AAPL", '
            )
            started = time.monotonic()
            response = read_response(sock, started + 15)
            waited = time.monotonic() - started
        assert status_of(response) == 408, response[:300]
        assert waited >= 1.0, waited
        body = body_of(response)
        assert body["error_code"] == "REQUEST_TIMEOUT"
        assert set(body) == {"status", "error", "error_code", "details", "request_id"}
        assert b"connection: close" in response.lower()
        # The server goes on serving.
        assert httpx.get(f"{running.base_url}/health", timeout=5).status_code == 200


def locate_counts(running: RunningServer) -> dict[str, float]:
    """http_requests_total of POST /api/v1/calculate-locate by status code."""
    text = httpx.get(f"{running.base_url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "http_requests_total" and labels.get("endpoint") == "/api/v1/calculate-locate":
                counts[labels["status_code"]] = counts.get(labels["status_code"], 0) + sample.value
    return counts


def test_a_stalled_body_is_counted_and_logged_as_the_408_it_got(tmp_path: Path) -> None:
    """The 408 is written by the server protocol; the application only sees the client gone. Metrics and
    the log line must say 408 (what the client got), not 499 (a client that went away)."""
    running = start_server(tmp_path, BODY_READ_TIMEOUT_SECONDS="1", LOG_LEVEL="INFO")
    try:
        key = running.keys["DEMO_CLIENT_KEY"]
        with socket.create_connection(address(running), timeout=10) as sock:
            sock.sendall(
                b"POST /api/v1/calculate-locate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"X-API-Key: {key}\r\nContent-Length: 200\r\n\r\n".encode()
                + b'{"ticker": "AAPL", '
            )
            response = read_response(sock, time.monotonic() + 15)
        assert status_of(response) == 408, response[:300]
        deadline = time.monotonic() + 10
        while (counts := locate_counts(running)).get("408") != 1:
            assert time.monotonic() < deadline, counts
            time.sleep(0.1)
        assert "499" not in counts, counts
        log = running.log()
        assert 'msg="Request body timed out"' in log, log
        assert "Client disconnected" not in log, log
    finally:
        stop_server(running)


def test_requests_past_the_connection_cap_get_503_and_the_file_limit_is_raised(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(hard, 1024)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))  # the server inherits this soft limit
    try:
        running = start_server(
            tmp_path, LOG_LEVEL="ERROR", MAX_CONNECTIONS="16", HEADER_READ_TIMEOUT_SECONDS="60"
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{running.process.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3] == line.split()[4], line  # soft == hard
        idle = [socket.create_connection(address(running), timeout=5) for _ in range(16)]
        try:
            deadline = time.monotonic() + 10  # until the server has accepted them all
            while httpx.get(f"{running.base_url}/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "no 503 past MAX_CONNECTIONS"
                time.sleep(0.1)
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{running.base_url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the cap did not release its connections"
            time.sleep(0.1)
    finally:
        stop_server(running)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HEADER_READ_TIMEOUT_SECONDS", "0"),
        ("HEADER_READ_TIMEOUT_SECONDS", "soon"),
        ("BODY_READ_TIMEOUT_SECONDS", "-1"),
        ("MAX_HEADER_BYTES", "100"),
        ("MAX_CONNECTIONS", "2"),
        ("METRICS_MULTIPROC_DIR", "/no/such/directory"),
    ],
)
def test_bad_hygiene_settings_stop_start_up_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: value})


def test_headers_under_the_limit_followed_by_a_large_body_are_served(tmp_path: Path) -> None:
    """A read may hold the headers and the start of the body: only the headers count."""
    with server(tmp_path) as running:
        body = (
            b" " * (200 << 10)
            + json.dumps(
                {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}
            ).encode()
        )
        with socket.create_connection(address(running), timeout=10) as sock:
            sock.sendall(
                b"POST /api/v1/calculate-locate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"X-API-Key: {running.keys['DEMO_CLIENT_KEY']}\r\nX-Pad: {'p' * (40 << 10)}\r\n".encode()
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            response = read_response(sock, time.monotonic() + 15)
        assert status_of(response) == 200, response[:300]
