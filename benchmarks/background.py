"""Requests sent back to back on a connection of their own while the load generator runs (a scenario's
`[background]`): e.g. 10^6-position batches while single quotes are measured. Each round trip is timed."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any


class BackgroundRequests(threading.Thread):
    def __init__(self, host: str, port: int, request: bytes, *, timeout: float = 300.0) -> None:
        super().__init__(name="background-requests", daemon=True)
        self._address = (host, port)
        self._request = request
        self._timeout = timeout
        self._stop_event = threading.Event()
        self.round_trips: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.response_bytes = 0

    def stop(self) -> None:
        """Stop after the request in flight (waits for it)."""
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                with socket.create_connection(self._address, timeout=self._timeout) as sock:
                    while not self._stop_event.is_set():
                        started = time.perf_counter()
                        sock.sendall(self._request)
                        status, size, close = _read_response(sock)
                        self.round_trips.append(time.perf_counter() - started)
                        self.statuses[status] = self.statuses.get(status, 0) + 1
                        self.response_bytes = size
                        if close:
                            break
            except OSError as error:
                self.errors.append(type(error).__name__)
                time.sleep(0.1)

    def summary(self) -> dict[str, Any]:
        trips = self.round_trips
        return {
            "requests": len(trips),
            "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
            "errors": len(self.errors),
            "round_trip_s": {
                "median": round(statistics.median(trips), 3) if trips else None,
                "max": round(max(trips), 3) if trips else None,
            },
            "response_bytes": self.response_bytes,
        }


def _read_response(sock: socket.socket) -> tuple[int, int, bool]:
    """(status, body size, server closes) of one response with a Content-Length; the body is discarded."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
    }
    length = int(headers.get("content-length", "0"))
    remaining = length - len(rest)
    buffer = bytearray(1 << 20)
    while remaining > 0:
        got = sock.recv_into(buffer, min(len(buffer), remaining))
        if not got:
            raise ConnectionError("closed mid-body")
        remaining -= got
    return status, length, headers.get("connection", "").lower() == "close"
