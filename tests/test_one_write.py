"""A response's header block and its body leave in one write (pricer.protocol.OneWriteTransport), and
nothing is ever held past the event-loop turn it was written in."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest

from pricer.protocol import OneWriteTransport
from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.anyio


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


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


async def test_headers_and_body_go_in_one_write_at_the_end_of_the_turn() -> None:
    raw = RecordingTransport()
    one = OneWriteTransport(raw, asyncio.get_running_loop())
    one.write(HEAD)
    assert raw.writes == []
    one.write(b"{}")
    assert raw.writes == []  # held with the other responses of this turn
    await asyncio.sleep(0)
    assert raw.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)
    assert raw.writes == [HEAD + b"{}"]


async def test_the_responses_of_one_turn_leave_after_all_of_them_are_written() -> None:
    raws = [RecordingTransport() for _ in range(3)]
    loop = asyncio.get_running_loop()
    ones = [OneWriteTransport(raw, loop) for raw in raws]
    for one in ones:
        one.write(HEAD)
        one.write(b"{}")
    assert all(raw.writes == [] for raw in raws)
    await asyncio.sleep(0)
    assert all(raw.writes == [HEAD + b"{}"] for raw in raws)


async def test_a_large_body_is_not_copied_to_join_its_headers() -> None:
    raw = RecordingTransport()
    one = OneWriteTransport(raw, asyncio.get_running_loop())
    body = b"x" * (1 << 20)
    one.write(HEAD)
    one.write(body)
    assert raw.writes == [HEAD, body]


async def test_a_header_block_alone_leaves_at_the_end_of_the_turn() -> None:
    raw = RecordingTransport()
    one = OneWriteTransport(raw, asyncio.get_running_loop())
    one.write(HEAD)  # a HEAD response: no body write follows
    await asyncio.sleep(0)
    assert raw.writes == [HEAD]
    one.write(b"5\r\nhello\r\n")  # a streaming response's later chunk goes straight through
    assert raw.writes == [HEAD, b"5\r\nhello\r\n"]


async def test_close_sends_what_is_held_first() -> None:
    raw = RecordingTransport()
    one = OneWriteTransport(raw, asyncio.get_running_loop())
    one.write(HEAD)
    one.close()
    assert raw.writes == [HEAD]
    assert raw.closed
    assert one.is_closing()


def test_a_real_server_answers_pipelined_keep_alive_requests_and_head(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        host, port = server.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            head = f"HEAD /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            connection.sendall(request + head + request)
            received = b""
            while received.count(b"HTTP/1.1 200") < 3 or not received.endswith(b"}"):  # two bodies, one HEAD
                chunk = connection.recv(65536)
                assert chunk, received
                received += chunk
        assert received.count(b"HTTP/1.1 200") == 3
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            assert client.head("/health").status_code == 200
            assert client.get("/health").json()["status"] in ("healthy", "ok", "degraded")
    finally:
        stop_server(server)


def test_a_response_is_not_lost_when_the_client_half_closes(tmp_path: Path) -> None:
    """A HEAD response's header block (no body write follows it) is held to the end of the event-loop
    turn; a client that sends its request and shuts its side down still gets it, as GET's does."""
    server = start_server(tmp_path)
    try:
        host, port = server.base_url.removeprefix("http://").split(":")
        for method in ("HEAD", "GET") * 10:
            with socket.create_connection((host, int(port)), timeout=10) as connection:
                connection.sendall(f"{method} /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                connection.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := connection.recv(65536):
                    received += chunk
            assert received.startswith(b"HTTP/1.1 200"), (method, received)
    finally:
        stop_server(server)
