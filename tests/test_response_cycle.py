"""The engine's response cycle writes what uvicorn's would, byte for byte, and refuses what it refuses; the
protocol's one keep-alive timer closes an idle connection after the keep-alive timeout, never a busy one."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from pricer.protocol import ConnectionHygiene, GuardedHttpToolsProtocol, ServerConfig
from pricer.response_cycle import MessageEvent, ResponseCycle
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

DATE = [(b"date", b"Fri, 04 Dec 2026 23:00:00 GMT")]


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def respond(
    cycle_class: type[RequestResponseCycle],
    headers: list[Any],
    *,
    method: str = "POST",
    keep_alive: bool = True,
    status: int = 200,
    body: bytes = b"{}",
    more: tuple[bytes, ...] = (),
) -> tuple[bytes, bool] | str:
    """What a cycle of `cycle_class` writes for one response (and whether it closed), or its error."""
    transport = RecordingTransport()
    cycle = cycle_class(
        scope={"type": "http", "method": method},  # type: ignore[typeddict-item]
        transport=transport,
        flow=FlowControl(transport),
        logger=None,  # type: ignore[arg-type]
        access_logger=None,  # type: ignore[arg-type]
        access_log=False,
        default_headers=DATE,
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )
    try:
        await cycle.send({"type": "http.response.start", "status": status, "headers": headers})
        parts = (*more, body)
        for index, part in enumerate(parts):
            await cycle.send(
                {"type": "http.response.body", "body": part, "more_body": index < len(parts) - 1}
            )
    except RuntimeError as error:
        return str(error)
    return b"".join(transport.writes), transport.closed


CASES: list[tuple[str, dict[str, Any]]] = [
    ("json", {"headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]}),
    (
        "many headers",
        {
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"2"),
                (b"x-request-id", b"abc-123"),
                (b"ratelimit", b'"default";r=9;t=1'),
                (b"x-frame-options", b"DENY"),
            ]
        },
    ),
    ("not kept alive", {"headers": [(b"content-length", b"2")], "keep_alive": False}),
    ("head", {"headers": [(b"content-length", b"2")], "method": "HEAD"}),
    ("no content", {"headers": [(b"content-length", b"0")], "status": 204, "body": b""}),
    ("upper-case name", {"headers": [(b"Content-Type", b"text/plain"), (b"content-length", b"2")]}),
    (
        "repeated name",
        {"headers": [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"content-length", b"2")]},
    ),
    ("chunked", {"headers": [(b"content-type", b"text/plain")]}),
    ("connection close", {"headers": [(b"content-length", b"2"), (b"connection", b"close")]}),
    ("date set by the app", {"headers": [(b"date", b"yesterday"), (b"content-length", b"2")]}),
    ("bad value", {"headers": [(b"content-length", b"2"), (b"x-evil", b"a\r\nset-cookie: b")]}),
    ("bad name", {"headers": [(b"content-length", b"2"), (b"x evil", b"a")]}),
    ("body too long", {"headers": [(b"content-length", b"1")]}),
    ("body too short", {"headers": [(b"content-length", b"3")]}),
    ("body in parts", {"headers": [(b"content-length", b"6")], "more": (b"ab", b"cd"), "body": b"ef"}),
    ("chunked parts", {"headers": [(b"content-type", b"text/plain")], "more": (b"ab",), "body": b"cd"}),
    ("parts too long", {"headers": [(b"content-length", b"3")], "more": (b"ab",), "body": b"cd"}),
    ("head in parts", {"headers": [(b"content-length", b"4")], "method": "HEAD", "more": (b"ab",)}),
]


@pytest.mark.parametrize(("name", "case"), CASES, ids=[name for name, _ in CASES])
async def test_the_cycle_writes_what_uvicorns_writes(name: str, case: dict[str, Any]) -> None:
    ours = await respond(ResponseCycle, **case)
    theirs = await respond(RequestResponseCycle, **case)
    assert ours == theirs, name


async def _serve(timeout_keep_alive: float) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    port = free_port()
    config = ServerConfig(
        app,
        hygiene=ConnectionHygiene(),
        drain_seconds=0,
        host="127.0.0.1",
        port=port,
        http=GuardedHttpToolsProtocol,
        lifespan="off",
        log_config=None,
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # up to 5 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    return server, task, port


def _ask(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock.recv(4096)


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_and_a_busy_one_is_not() -> None:
    server, task, port = await _serve(timeout_keep_alive=0.4)
    loop = asyncio.get_running_loop()
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as busy,
            socket.create_connection(("127.0.0.1", port)) as idle,
        ):
            assert (await loop.run_in_executor(None, _ask, idle)).startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            # The busy connection asks every 0.15 s for three keep-alive timeouts: never closed.
            while time.monotonic() - started < 1.2:
                assert (await loop.run_in_executor(None, _ask, busy)).startswith(b"HTTP/1.1 200 ")
                await asyncio.sleep(0.15)
            # The idle one was closed by the server (its read sees the end of the stream).
            idle.settimeout(2)
            assert await loop.run_in_executor(None, idle.recv, 4096) == b""
    finally:
        server.should_exit = True
        await task


async def test_the_message_event_behaves_as_asyncio_event() -> None:
    for event in (MessageEvent(), asyncio.Event()):
        assert not event.is_set()
        waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(waiter.done() for waiter in waiters)
        event.set()
        assert event.is_set()
        assert await asyncio.gather(*waiters) == [True, True, True]
        assert await event.wait()  # already set: no wait
        event.clear()
        assert not event.is_set()
        late = asyncio.create_task(event.wait())
        await asyncio.sleep(0.01)
        assert not late.done()
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        event.set()  # the cancelled waiter is gone; nothing raises
