"""The outbound HTTP client and the circuit breaker, against real peers on loopback.

The peers are real sockets: a uvicorn server for the well-behaved case (keep-alive, pooling, concurrency),
and a scripted asyncio server for what a hostile or broken peer does (drips, hangs, floods, closes early,
redirects, lies about its length, speaks something else than HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn

from pricer.outbound.breaker import BreakerState, CircuitBreaker
from pricer.outbound.http import (
    BadResponse,
    ConnectFailed,
    HttpClient,
    OutboundTimeout,
    ResponseTooLarge,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    # The engine runs on uvloop, whose transports differ from asyncio's in when they call back.
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_peer(handler: Handler) -> AsyncIterator[str]:
    """A raw TCP peer on a free loopback port that runs `handler` for each connection."""
    connections: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        # uvloop raises RuntimeError, not ConnectionError, for a write after the client hung up.
        with contextlib.suppress(
            ConnectionError, RuntimeError, asyncio.CancelledError, asyncio.IncompleteReadError
        ):
            await handler(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in connections:
            writer.transport.abort()
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


def answer(status: int, body: bytes, *extra: bytes) -> bytes:
    headers = b"".join(line + b"\r\n" for line in extra)
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), headers, body)


@contextlib.asynccontextmanager
async def uvicorn_peer() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A real uvicorn server whose app echoes the request; counts connections and requests."""
    seen: dict[str, int] = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
    clients: set[Any] = set()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen["requests"] += 1
        clients.add(scope["client"])
        seen["connections"] = len(clients)
        seen["in_flight"] += 1
        seen["max_in_flight"] = max(seen["max_in_flight"], seen["in_flight"])
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        delay = dict(scope["headers"]).get(b"x-delay")
        if delay:
            await asyncio.sleep(float(delay))
        seen["in_flight"] -= 1
        reply = b"%s %s %s" % (scope["method"].encode(), scope["raw_path"], body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-echo", b"yes")]})
        await send({"type": "http.response.body", "body": reply})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="error", lifespan="off", loop="asyncio", http="httptools")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        await task


async def test_calls_reuse_pooled_keep_alive_connections_and_carry_bodies() -> None:
    async with uvicorn_peer() as (url, seen):
        client = HttpClient(url + "/prefix", max_connections=4)
        for index in range(20):
            response = await client.request(
                "POST", f"/quote?n={index}", body=b'{"a":1}', headers={"X-Test": "1"}, timeout=5
            )
            assert response.status == 200
            assert response.headers["x-echo"] == "yes"
            assert response.body == b'POST /prefix/quote {"a":1}'
        got = await client.request("GET", "/x", timeout=5)
        assert got.body == b"GET /prefix/x "
        # Sequential calls use one connection; concurrent ones at most max_connections.
        assert seen["connections"] == 1
        # ...with Nagle off: a request written while the peer delays its ACK is not held 40 ms.
        (pooled,) = client._idle
        assert pooled.transport is not None
        pooled_socket = pooled.transport.get_extra_info("socket")
        assert pooled_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        replies = await asyncio.gather(
            *(client.request("GET", "/y", headers={"X-Delay": "0.05"}, timeout=5) for _ in range(16))
        )
        assert {reply.status for reply in replies} == {200}
        assert seen["max_in_flight"] <= 4
        assert seen["connections"] <= 1 + 4
        large = bytes(range(256)) * 1024
        echoed = await client.request("PUT", "/big", body=large, timeout=5)
        assert echoed.body == b"PUT /prefix/big " + large
        await client.aclose()


async def test_a_peer_that_drips_past_the_deadline_times_out_on_time() -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with scripted_peer(drip) as url:
        client = HttpClient(url)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(OutboundTimeout) as caught:
            await client.request("GET", "/", timeout=0.3)
        assert caught.value.sent is True
        assert 0.25 < loop.time() - started < 1.5


async def test_a_hanging_peer_times_out_and_its_connection_is_not_reused() -> None:
    calls = 0

    async def hang_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        while True:
            await read_request(reader)
            calls += 1
            if calls == 1:
                await asyncio.sleep(30)
            writer.write(answer(200, b"ok"))
            await writer.drain()

    async with scripted_peer(hang_then_answer) as url:
        client = HttpClient(url)
        with pytest.raises(OutboundTimeout):
            await client.request("GET", "/", timeout=0.2)
        # The late answer of the first call must never be read as the answer of the second.
        response = await client.request("GET", "/", timeout=2)
        assert (response.status, response.body) == (200, b"ok")


async def test_bodies_over_the_bound_are_refused_declared_or_counted() -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/declared" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(100):
                writer.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with scripted_peer(huge) as url:
        client = HttpClient(url, max_response_bytes=64 * 1024)
        for target in ("/declared", "/counted"):
            with pytest.raises(ResponseTooLarge):
                await client.request("GET", target, timeout=3)


async def test_a_response_head_over_the_bound_is_refused_before_the_deadline() -> None:
    """Found in review: only the body was bounded; a peer (a provider, a compromised backend) streaming
    headers without end was read into memory until the deadline, as fast as the link allowed."""

    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        if b"/one-long-value" in request:
            writer.write(b"X-Long: ")
        with contextlib.suppress(RuntimeError):  # uvloop: writing after the client closed
            for index in range(1_000_000):
                long_value = b"/one-long-value" in request
                writer.write(b"x" * 1000 if long_value else b"X-H%d: %s\r\n" % (index, b"v" * 1000))
                await writer.drain()

    async with scripted_peer(endless_head) as url:
        client = HttpClient(url)
        for target in ("/many-headers", "/one-long-value"):
            started = time.perf_counter()
            with pytest.raises(BadResponse, match="head over"):
                await client.request("GET", target, timeout=20)
            assert time.perf_counter() - started < 10  # refused on size, not at the deadline
        await client.aclose()


async def test_redirects_are_answers_not_followed_and_chunked_and_close_delimited_bodies_are_read() -> None:
    async def various(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/redirect" in request:
            writer.write(answer(302, b"", b"Location: http://169.254.169.254/", b"X-Twice: 1", b"x-TWICE: 2"))
        elif b"/chunked" in request:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-the-end")
            await writer.drain()
            writer.close()
            return
        await writer.drain()
        await various(reader, writer)

    async with scripted_peer(various) as url:
        client = HttpClient(url)
        redirect = await client.request("GET", "/redirect", timeout=2)
        assert redirect.status == 302
        assert redirect.headers["location"] == "http://169.254.169.254/"
        # Raw headers as received (names lower-cased, repeats kept, in order: a relay passes them on);
        # as text, the last of repeated ones.
        assert redirect.raw_headers == [
            (b"content-length", b"0"),
            (b"location", b"http://169.254.169.254/"),
            (b"x-twice", b"1"),
            (b"x-twice", b"2"),
        ]
        assert redirect.headers["x-twice"] == "2"
        chunked = await client.request("GET", "/chunked", timeout=2)
        assert chunked.body == b"abcde"
        ending = await client.request("GET", "/close", timeout=2)
        assert ending.body == b"until-the-end"


async def test_broken_peers_give_errors_that_say_whether_the_request_may_have_arrived() -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if b"/garbage" in request:
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        elif b"/half" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        writer.close()

    async with scripted_peer(broken) as url:
        client = HttpClient(url)
        for target in ("/garbage", "/half", "/nothing"):
            with pytest.raises(BadResponse) as caught:
                await client.request("POST", target, body=b"{}", timeout=2)
            assert caught.value.sent is True

    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
    client = HttpClient(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectFailed) as refused:
        await client.request("POST", "/", body=b"{}", timeout=2)
    assert refused.value.sent is False


async def test_line_breaks_in_targets_or_headers_are_refused_before_anything_is_sent() -> None:
    client = HttpClient("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="line break"):
        await client.request("GET", "/a\r\nHost: evil", timeout=1)
    with pytest.raises(ValueError, match="line break"):
        await client.request("GET", "/a", headers={"X-Request-ID": "x\r\nX-Admin: 1"}, timeout=1)
    with pytest.raises(ValueError):
        HttpClient("ftp://example.com")


async def test_waiting_for_a_free_connection_counts_against_the_deadline() -> None:
    async with uvicorn_peer() as (url, _):
        client = HttpClient(url, max_connections=1)
        slow = asyncio.create_task(client.request("GET", "/", headers={"X-Delay": "1"}, timeout=5))
        await asyncio.sleep(0.1)
        with pytest.raises(OutboundTimeout) as caught:
            await client.request("GET", "/", timeout=0.2)
        assert caught.value.sent is False
        assert (await slow).status == 200
        assert (await client.request("GET", "/", timeout=2)).status == 200
        await client.aclose()


def test_breaker_opens_after_failures_in_the_window_probes_then_closes() -> None:
    now = [0.0]
    changes: list[tuple[str, BreakerState]] = []
    breaker = CircuitBreaker(
        "lender", clock=lambda: now[0], on_change=lambda name, state: changes.append((name, state))
    )
    for _ in range(4):
        breaker.record_failure()
        now[0] += 10.0
    # Failures spread over more than the window never open it.
    assert breaker.state is BreakerState.CLOSED
    for _ in range(5):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(30.0)
    now[0] += 30.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # one probe at a time
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    now[0] += 30.0
    for _ in range(3):
        assert breaker.allow()
        breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert changes == [
        ("lender", BreakerState.OPEN),
        ("lender", BreakerState.HALF_OPEN),
        ("lender", BreakerState.OPEN),
        ("lender", BreakerState.HALF_OPEN),
        ("lender", BreakerState.CLOSED),
    ]
