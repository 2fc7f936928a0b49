"""The engine's outbound HTTP/1.1 client: gateway -> backend calls and market-data provider calls.

Chosen by measurement (`benchmarks/bench_outbound.py`): an asyncio protocol with httptools' response
parser (the parser uvicorn already serves with) costs a fraction of httpx's or aiohttp's CPU per call, and
the gateway pays that cost on every hop. It does only what those callers need, and does it strictly:

- pooled keep-alive connections per base URL (at most `max_connections`; callers beyond wait, within
  their deadline); idle connections are dropped after `idle_seconds`, before the peer's own keep-alive
  timeout, so that a request is rarely written to a connection the peer is closing;
- one deadline per call covering connect, send and the WHOLE response: a peer that drips its body past
  the deadline is cut (`OutboundTimeout`), the connection closed;
- bodies bounded by `max_response_bytes` (declared or counted); redirects are never followed (a 3xx is
  a response like any other);
- every failure is an `OutboundError` whose `sent` says whether the request may have reached the peer,
  so that callers retry only what is safe to retry.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

import httptools

__all__ = [
    "BadResponse",
    "ConnectFailed",
    "HttpClient",
    "HttpResponse",
    "OutboundError",
    "OutboundTimeout",
    "ResponseTooLarge",
]

DEFAULT_MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
# The status line and headers of a response: httptools sets no bound of its own, and the deadline bounds
# time, not bytes (a peer streaming headers on a fast link would fill memory before it).
MAX_HEAD_BYTES: Final = 64 * 1024
_METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})


class OutboundError(Exception):
    """A call that got no usable response. `sent` is False when no byte of it can have reached the peer."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class ConnectFailed(OutboundError):
    """The connection could not be made (refused, unreachable, name not resolved, connect timeout)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


class OutboundTimeout(OutboundError):
    """The call's deadline passed before the whole response arrived."""


class ResponseTooLarge(OutboundError):
    """The response body is over the client's `max_response_bytes`."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=True)


class BadResponse(OutboundError):
    """Not HTTP, or the peer closed the connection before the response was complete."""


class HttpResponse:
    """A whole response: status, headers, body. `raw_headers` are as received, names lower-cased, in
    order (a relay passes them on as they are); `headers` is the same as text, the last of repeated ones."""

    __slots__ = ("_headers", "body", "raw_headers", "status")

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self.body = body
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {
                name.decode("latin-1"): value.decode("latin-1") for name, value in self.raw_headers
            }
        return self._headers

    def __repr__(self) -> str:
        return f"HttpResponse(status={self.status}, body={len(self.body)} bytes)"


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight on it."""

    __slots__ = (
        "_body",
        "_body_size",
        "_chunked",
        "_content_length",
        "_head_bytes",
        "_headers",
        "_headers_done",
        "_max_body",
        "_parser",
        "_refusal",
        "_response",
        "_status",
        "closed",
        "idle_since",
        "transport",
    )

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._response: asyncio.Future[HttpResponse] | None = None
        self._parser = httptools.HttpResponseParser(self)
        # Names lower-cased as they come; bytes, not text: the gateway relays them without decoding them.
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_length: bytes | None = None
        self._chunked = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._headers_done = False
        self._head_bytes = 0
        self._refusal: OutboundError | None = None
        self._status = 0

    # ---- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._response is None:
            # Bytes nobody asked for: the connection is out of step with its peer and cannot be reused.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            # httptools wraps what a callback raised: the callback left the real reason in _refusal.
            refusal = self._refusal or BadResponse(f"malformed HTTP response: {error}", sent=True)
            self._fail(refusal)
            return
        if not self._headers_done and self._response is not None:
            # Counted only while the head is incomplete: the read that completes it is bounded by the
            # transport's read size, whatever part of it is body.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(BadResponse(f"response head over {MAX_HEAD_BYTES} bytes", sent=True))

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._response is None or self._response.done():
            return
        if self._headers_done and self._ends_at_close():
            self.on_message_complete()
            return
        # The peer may or may not have read the request: only a safe method may be resent.
        error = BadResponse("connection closed before the response was complete", sent=True)
        self._response.set_exception(error)
        self._response = None

    def _ends_at_close(self) -> bool:
        # A response without Content-Length or chunked framing is delimited by the end of the connection.
        return self._content_length is None and not self._chunked

    # ---- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name == b"content-length":
            self._content_length = value
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._status = self._parser.get_status_code()
        declared = self._content_length
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            self._refuse(
                ResponseTooLarge(f"response body of {declared.decode()} bytes is over {self._max_body}")
            )

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._refuse(ResponseTooLarge(f"response body over {self._max_body} bytes"))
        self._body.append(body)

    def _refuse(self, error: OutboundError) -> None:
        self._refusal = error
        raise error

    def on_message_complete(self) -> None:
        response = self._response
        self._response = None
        keep_alive = self._parser.should_keep_alive()
        result = HttpResponse(self._status, self._headers, b"".join(self._body))
        if not keep_alive:
            self.close()
        if response is not None and not response.done():
            response.set_result(result)

    # ---- the client's side -------------------------------------------------------------------------

    def send(self, request: bytes, response: asyncio.Future[HttpResponse]) -> None:
        self._response = response
        self._headers = []
        self._content_length = None
        self._chunked = False
        self._body = []
        self._body_size = 0
        self._headers_done = False
        self._head_bytes = 0
        assert self.transport is not None
        self.transport.write(request)

    def _fail(self, error: OutboundError) -> None:
        response = self._response
        self._response = None
        self.close()
        if response is not None and not response.done():
            response.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _check_header_text(text: str, what: str) -> None:
    # A CR or LF in a value from outside would let it write its own headers or requests (smuggling).
    if "\r" in text or "\n" in text:
        raise ValueError(f"{what} holds a line break")


class HttpClient:
    """Pooled HTTP/1.1 calls to one base URL (`http://host:port[/prefix]` or `https://...`)."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 32,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        connect_timeout: float = 1.0,
        idle_seconds: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("base_url must be http://host[:port][/prefix] or https://...")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("base_url must not hold a query, a fragment or credentials")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        default_port = self._port == (443 if self._ssl else 80)
        host_header = self._host if ":" not in self._host else f"[{self._host}]"
        self._host_header = host_header if default_port else f"{host_header}:{self._port}"
        self._prefix = parts.path.rstrip("/")
        self._max_connections = max_connections
        self._max_body = max_response_bytes
        self._connect_timeout = connect_timeout
        self._idle_seconds = idle_seconds
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://{self._host_header}{self._prefix}"

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        timeout: float,  # noqa: ASYNC109 - one timer per call is cheaper than asyncio.timeout's context
    ) -> HttpResponse:
        """Send one request and read its whole response within `timeout` seconds."""
        if method not in _METHODS:
            raise ValueError(f"unsupported method {method!r}")
        _check_header_text(target, "target")
        if not target.startswith("/") or " " in target:
            raise ValueError("target must be a path starting with / and without spaces")
        lines = [f"{method} {self._prefix}{target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        if headers:
            for name, value in headers.items():
                _check_header_text(name, "a header name")
                _check_header_text(value, f"header {name}")
                lines.append(f"{name}: {value}\r\n")
        if body or method in {"POST", "PUT", "PATCH"}:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        request = head + body if len(body) < 65536 else head

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection = await self._acquire(loop, deadline)
        response: asyncio.Future[HttpResponse] = loop.create_future()
        timer = loop.call_at(deadline, _expire, connection, response)
        try:
            connection.send(request, response)
            if request is head:
                assert connection.transport is not None
                connection.transport.write(body)
            result = await response
        except BaseException:
            connection.close()
            self._release(connection)
            raise
        finally:
            timer.cancel()
        connection.idle_since = loop.time()
        self._release(connection)
        return result

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        if self._closed:
            raise ConnectFailed("client is closed")
        while True:
            now = loop.time()
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed and now - connection.idle_since < self._idle_seconds:
                    return connection
                connection.close()
                self._open -= 1
            if self._open < self._max_connections:
                self._open += 1
                try:
                    return await self._connect(loop, deadline)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - now))
            except TimeoutError:
                raise OutboundTimeout("no connection free before the deadline", sent=False) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        max_body = self._max_body
        budget = min(self._connect_timeout, deadline - loop.time())
        if budget <= 0:
            raise OutboundTimeout("deadline passed before connecting", sent=False)
        try:
            transport, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(max_body),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                ),
                budget,
            )
        except TimeoutError:
            if budget < self._connect_timeout:
                raise OutboundTimeout("deadline passed while connecting", sent=False) from None
            raise ConnectFailed(f"connect timed out after {self._connect_timeout} s") from None
        except (OSError, ssl.SSLError) as error:
            raise ConnectFailed(f"cannot connect: {error.__class__.__name__}") from None
        # uvloop may return before calling connection_made.
        connection.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Each request goes out in one write and waits for its answer: Nagle's algorithm would hold a
            # write behind the peer's delayed ACK (40 ms). asyncio and uvloop set it today; said here, it
            # does not depend on the loop.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or self._closed:
            if not connection.closed:
                connection.close()
            self._open -= 1
        else:
            self._idle.append(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._open -= 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("client is closed"))
        self._waiters.clear()


def _expire(connection: _Connection, response: asyncio.Future[HttpResponse]) -> None:
    if not response.done():
        response.set_exception(
            OutboundTimeout("deadline passed before the whole response arrived", sent=True)
        )
    connection.close()
