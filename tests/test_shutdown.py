"""Graceful shutdown under traffic (DESIGN §4 "Shutdown", RUNBOOK rolling updates with zero failed requests).

On SIGTERM `/health` answers 503 for SHUTDOWN_DRAIN_SECONDS while quotes are still served, then the
listener closes, in-flight requests finish, the lifespan shutdown runs and the process exits by itself.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DRAIN_SECONDS = 2.0
WORKERS = 4
EXIT_DEADLINE = 20.0
QUOTE = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}


@dataclass
class Outcome:
    started: float
    finished: float
    status: int | None = None  # None: no answer
    error: str | None = None


@dataclass
class Recorder:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def quote_worker(server: RunningServer, recorder: Recorder, stop: threading.Event) -> None:
    """Quotes back to back on one keep-alive connection (reconnecting after an error), until told."""
    headers = {"X-API-Key": server.keys["DEMO_CLIENT_KEY"]}
    while not stop.is_set():
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post("/api/v1/calculate-locate", json=QUOTE, headers=headers)
                except httpx.HTTPError as error:
                    recorder.add(Outcome(started, time.monotonic(), error=type(error).__name__))
                    time.sleep(0.02)
                    break  # a fresh connection
                recorder.add(Outcome(started, time.monotonic(), status=response.status_code))
                if response.status_code == 200:
                    assert response.json()["status"] == "success"


def poll_health(server: RunningServer, until: float) -> list[Outcome]:
    """GET /health on a fresh connection every 50 ms (as a readiness probe does)."""
    polls: list[Outcome] = []
    while time.monotonic() < until and server.process.poll() is None:
        started = time.monotonic()
        try:
            response = httpx.get(f"{server.base_url}/health", timeout=2)
            polls.append(Outcome(started, time.monotonic(), status=response.status_code))
            if response.status_code == 503:
                assert response.json()["status"] in ("draining", "unhealthy")
        except httpx.HTTPError as error:
            polls.append(Outcome(started, time.monotonic(), error=type(error).__name__))
        time.sleep(0.05)
    return polls


def test_sigterm_drains_then_exits_without_failing_requests(tmp_path: Path) -> None:
    server = start_server(
        tmp_path,
        SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        RATE_LIMIT_PER_MINUTE="10000000",
        LOG_LEVEL="INFO",
    )
    recorder = Recorder()
    stop = threading.Event()
    threads = [
        threading.Thread(target=quote_worker, args=(server, recorder, stop), daemon=True)
        for _ in range(WORKERS)
    ]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.7)  # steady traffic first
        assert httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200
        sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        polls = poll_health(server, until=sigterm_at + EXIT_DEADLINE)
        try:
            returncode = server.process.wait(timeout=max(0.1, sigterm_at + EXIT_DEADLINE - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {EXIT_DEADLINE} s of SIGTERM:\n{server.log()}")
        exited_at = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        stop_server(server)

    drain_end = sigterm_at + DRAIN_SECONDS
    outcomes = sorted(recorder.outcomes, key=lambda outcome: outcome.started)
    answered = [o for o in outcomes if o.status is not None]
    failed = [o for o in outcomes if o.status is None]

    # /health: 503 through the drain window (a probe racing the signal's delivery may still see 200),
    # then no listener.
    timeline = [(round(p.started - sigterm_at, 3), p.status, p.error) for p in polls]
    draining = [p for p in polls if p.status == 503]
    assert draining, timeline
    assert all(p.status in (503, None) for p in polls if p.started >= sigterm_at + 0.5), timeline
    assert all(p.status in (200, 503, None) for p in polls), timeline
    assert draining[-1].finished >= drain_end - 0.6, "503 stopped well before the drain window closed"
    unreachable = [p for p in polls if p.status is None]
    assert all(p.started >= drain_end - 0.25 for p in unreachable), "the listener closed during the drain"
    if unreachable:  # once closed, it stays closed
        assert all(p.status is None for p in polls if p.started >= unreachable[0].started)

    # Quotes: every answer complete and never a server error; still served during the drain.
    assert answered
    assert {o.status for o in answered} == {200}, sorted({o.status or 0 for o in answered})
    served_while_draining = [o for o in answered if sigterm_at <= o.started < drain_end]
    assert len(served_while_draining) >= 3, len(served_while_draining)
    assert any(o.finished >= drain_end - 0.6 for o in served_while_draining)
    # Connection errors only for requests sent once the drain window had closed.
    early = [(round(o.started - sigterm_at, 3), o.error) for o in failed if o.started < drain_end - 0.25]
    assert not early, early
    # The process stopped by itself, after the drain and with a graceful lifespan shutdown.
    assert exited_at - sigterm_at >= DRAIN_SECONDS
    assert returncode == 0, returncode
    log = server.log()
    assert "Application shutdown complete." in log, log
    assert "Traceback" not in log, log
    ok_before_exit = sum(1 for o in answered if o.finished <= exited_at)
    print(
        f"\n200s before exit: {ok_before_exit} ({len(served_while_draining)} sent while draining), "
        f"connection errors after the drain: {len(failed)}, exit {exited_at - sigterm_at:.2f} s after SIGTERM"
    )


def test_a_graceful_sigterm_shutdown_exits_with_status_zero(tmp_path: Path) -> None:
    server = start_server(tmp_path, SHUTDOWN_DRAIN_SECONDS="0.5", LOG_LEVEL="WARNING")
    try:
        headers = {"X-API-Key": server.keys["DEMO_CLIENT_KEY"]}
        response = httpx.post(
            f"{server.base_url}/api/v1/calculate-locate",
            json=QUOTE,
            headers=headers,
            timeout=5,
        )
        assert response.status_code == 200
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(timeout=EXIT_DEADLINE)
    finally:
        stop_server(server)
    assert returncode == 0, returncode


# ---- keep-alive clients through the drain ----------------------------------------------------------------


@dataclass
class Exchange:
    started: float
    finished: float
    reused: bool  # sent on a connection that had already answered a request
    status: int | None = None
    closes: bool = False  # the response said `Connection: close`
    error: str | None = None
    connect_failed: bool = False


@dataclass
class Exchanges:
    items: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, exchange: Exchange) -> None:
        with self.lock:
            self.items.append(exchange)


def keepalive_client(
    base_url: str,
    request: tuple[str, str, bytes | None, dict[str, str]],
    exchanges: Exchanges,
    stop: threading.Event,
    deadline: float,
) -> None:
    """Requests back to back on one keep-alive connection; a new connection only after the server said
    `Connection: close` (as a client behind a load balancer does) or after an error."""
    host, port = base_url.removeprefix("http://").split(":")
    method, path, body, headers = request
    connection: http.client.HTTPConnection | None = None
    while not stop.is_set() and time.monotonic() < deadline:
        started = time.monotonic()
        reused = connection is not None
        if connection is None:
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                connection.connect()
            except OSError as error:
                exchanges.add(
                    Exchange(
                        started, time.monotonic(), False, error=type(error).__name__, connect_failed=True
                    )
                )
                connection = None
                time.sleep(0.05)
                continue
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            exchanges.add(Exchange(started, time.monotonic(), reused, error=type(error).__name__))
            connection.close()
            connection = None
            time.sleep(0.02)
            continue
        closes = (response.getheader("connection") or "").lower() == "close"
        exchanges.add(Exchange(started, time.monotonic(), reused, status=response.status, closes=closes))
        if closes:
            connection.close()
            connection = None
        time.sleep(0.005)
    if connection is not None:
        connection.close()


def run_through_sigterm(
    server: RunningServer,
    request: tuple[str, str, bytes | None, dict[str, str]],
    *,
    drain_seconds: float,
    clients: int = 6,
    stop_with: Callable[[RunningServer], None] | None = None,
) -> tuple[list[Exchange], list[Outcome], float, int, float]:
    """Keep-alive load, then SIGTERM to the server process (or what `stop_with` sends); returns the
    exchanges, the /health polls, the time of the signal, the exit status and the time of the exit."""
    exchanges = Exchanges()
    stop = threading.Event()
    deadline = time.monotonic() + EXIT_DEADLINE + 10
    threads = [
        threading.Thread(
            target=keepalive_client, args=(server.base_url, request, exchanges, stop, deadline), daemon=True
        )
        for _ in range(clients)
    ]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # steady traffic first
        sigterm_at = time.monotonic()
        if stop_with is None:
            server.process.send_signal(signal.SIGTERM)
        else:
            stop_with(server)
        polls = poll_health(server, until=sigterm_at + EXIT_DEADLINE)
        try:
            returncode = server.process.wait(timeout=max(0.1, sigterm_at + EXIT_DEADLINE - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {EXIT_DEADLINE} s of SIGTERM:\n{server.log()}")
        exited_at = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        stop_server(server)
    return sorted(exchanges.items, key=lambda e: e.started), polls, sigterm_at, returncode, exited_at


def check_drain(
    exchanges: list[Exchange], polls: list[Outcome], sigterm_at: float, drain_seconds: float
) -> None:
    drain_end = sigterm_at + drain_seconds
    timeline = [(round(p.started - sigterm_at, 3), p.status, p.error) for p in polls]
    assert any(p.status == 503 for p in polls), timeline
    assert all(p.status in (503, None) for p in polls if p.started >= sigterm_at + 0.5), timeline
    answered = [e for e in exchanges if e.status is not None]
    assert answered
    assert {e.status for e in answered} == {200}, sorted({e.status or 0 for e in answered})
    # Every answer during the drain tells its client to reconnect (elsewhere) and closes.
    during = [e for e in answered if sigterm_at + 0.3 <= e.started]
    assert len([e for e in during if e.started < drain_end]) >= 3
    kept_open = [(round(e.started - sigterm_at, 3), e.status) for e in during if not e.closes]
    assert not kept_open, kept_open
    # No request on an existing connection fails; a new connection may find the listener closed only
    # once the drain is over (a load balancer sends nothing new by then).
    failed_reused = [(round(e.started - sigterm_at, 3), e.error) for e in exchanges if e.error and e.reused]
    assert not failed_reused, failed_reused
    failed_new = [
        (round(e.started - sigterm_at, 3), e.error, e.connect_failed)
        for e in exchanges
        if e.error and not e.reused and e.started < drain_end - 0.25
    ]
    assert not failed_new, failed_new


def test_sigterm_closes_keepalive_connections_during_the_drain_and_fails_none(tmp_path: Path) -> None:
    server = start_server(
        tmp_path,
        SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        RATE_LIMIT_PER_MINUTE="10000000",
        LOG_LEVEL="INFO",
    )
    body = json.dumps(QUOTE).encode()
    headers = {"X-API-Key": server.keys["DEMO_CLIENT_KEY"], "Content-Type": "application/json"}
    exchanges, polls, sigterm_at, returncode, exited_at = run_through_sigterm(
        server, ("POST", "/api/v1/calculate-locate", body, headers), drain_seconds=DRAIN_SECONDS
    )
    check_drain(exchanges, polls, sigterm_at, DRAIN_SECONDS)
    assert returncode == 0, returncode
    assert exited_at - sigterm_at >= DRAIN_SECONDS
    log = server.log()
    assert "Application shutdown complete." in log, log
    assert "Traceback" not in log, log
    print(
        f"\nexchanges: {len(exchanges)}, reconnects: {sum(1 for e in exchanges if not e.reused)}, "
        f"refused after the drain: {sum(1 for e in exchanges if e.connect_failed)}"
    )


def test_a_keepalive_connection_idle_through_the_drain_is_answered_not_reset(tmp_path: Path) -> None:
    """The race behind most failed requests in a rolling update: a pooled connection, idle while the
    pod drained, is reused just as the listener closes. It gets its answer (and `Connection: close`)."""
    server = start_server(tmp_path, SHUTDOWN_DRAIN_SECONDS="1", LOG_LEVEL="WARNING")
    host, port = server.base_url.removeprefix("http://").split(":")
    pooled = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        pooled.request("GET", "/health")
        first = pooled.getresponse()
        first.read()
        assert first.status == 200
        assert (first.getheader("connection") or "").lower() != "close"
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + EXIT_DEADLINE
        while True:  # until the listener has closed (new connections refused)
            assert time.monotonic() < deadline, "the listener never closed"
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                break
            time.sleep(0.01)
        pooled.request("GET", "/openapi.json")
        reused = pooled.getresponse()
        reused.read()
        assert reused.status == 200
        assert (reused.getheader("connection") or "").lower() == "close"
        assert server.process.wait(timeout=EXIT_DEADLINE) == 0
    finally:
        pooled.close()
        stop_server(server)


# ---- signals repeated or mixed during the drain (issue 16 review, finding 8) -----------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_repeated_stop_signal_does_not_cut_the_drain_short(tmp_path: Path, sig: signal.Signals) -> None:
    """The same stop delivered twice (an init that signals the process group, such as `tini -g`, and a
    forward; Ctrl+C reaching the whole group): the second is ignored, the drain runs its full length,
    no connection fails, the lifespan shutdown runs and the exit status is 0."""
    server = start_server(
        tmp_path,
        SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        RATE_LIMIT_PER_MINUTE="10000000",
        LOG_LEVEL="INFO",
    )

    def twice(running: RunningServer) -> None:
        running.process.send_signal(sig)
        time.sleep(0.2)
        running.process.send_signal(sig)

    exchanges, polls, sigterm_at, returncode, exited_at = run_through_sigterm(
        server, ("GET", "/openapi.json", None, {}), drain_seconds=DRAIN_SECONDS, stop_with=twice
    )
    log = server.log()
    check_drain(exchanges, polls, sigterm_at, DRAIN_SECONDS)
    assert exited_at - sigterm_at >= DRAIN_SECONDS, log
    assert returncode == 0, f"{returncode}\n{log}"
    assert "Stop signal repeated: ignored" in log, log
    assert "Application shutdown complete." in log, log
    assert "Traceback" not in log, log


def test_the_other_stop_signal_ends_the_drain_but_not_the_graceful_shutdown(tmp_path: Path) -> None:
    """SIGINT starts the drain, SIGTERM ends it early: the listener closes at once, yet a request still
    in flight (its body stalled) is answered (408 at the body timeout, later than the drain would have
    ended) and the lifespan shutdown runs. The drain's timer must not fire into that shutdown as a
    second SIGINT (uvicorn's force exit, which skips the lifespan shutdown)."""
    server = start_server(
        tmp_path,
        SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        BODY_READ_TIMEOUT_SECONDS="5",
        LOG_LEVEL="INFO",
    )
    host, port = server.base_url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)), timeout=20)
    try:
        stalled.sendall(
            b"POST /api/v1/calculate-locate HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {server.keys['DEMO_CLIENT_KEY']}\r\nContent-Length: 200\r\n\r\n".encode()
            + b'{"ticker": "AAPL"'
        )
        time.sleep(0.3)  # the request is in the application, waiting for the rest of its body
        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        answer = b""
        while chunk := stalled.recv(65536):
            answer += chunk
        returncode = server.process.wait(timeout=EXIT_DEADLINE)
        exited_at = time.monotonic()
    finally:
        stalled.close()
        stop_server(server)
    log = server.log()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert exited_at - signalled_at > DRAIN_SECONDS, "the shutdown did not wait for the request in flight"
    assert "Drain ended early by a second signal" in log, log
    assert "Application shutdown complete." in log, log
    assert returncode == 0, f"{returncode}\n{log}"
