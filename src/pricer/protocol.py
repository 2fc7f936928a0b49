"""The HTTP protocol of the engine's server: uvicorn's httptools protocol plus what uvicorn lacks against
slow or huge clients: a header read timeout (a connection that has not sent complete request headers in
time is closed: slowloris), a body read timeout (a body that stalls between chunks gets 408), and a limit
on the request line + headers (431). The connection cap is uvicorn's `limit_concurrency` (503 past it).
"""

from __future__ import annotations

import asyncio
import contextlib
from asyncio.events import TimerHandle
from dataclasses import dataclass
from typing import Any

import httptools
import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from pricer.context import BODY_TIMED_OUT_KEY
from pricer.ids import random_hex
from pricer.schemas import ErrorBody

# How long a connection accepted just before the listener closed may take to send its request.
LATE_CONNECTION_GRACE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionHygiene:
    header_read_timeout: float = 10.0
    body_read_timeout: float = 30.0
    max_header_bytes: int = 64 << 10


class ServerConfig(uvicorn.Config):
    """uvicorn's Config plus what the protocol and the server of this engine read (pickled to workers)."""

    def __init__(self, app: Any, *, hygiene: ConnectionHygiene, drain_seconds: float, **options: Any) -> None:
        super().__init__(app, **options)
        self.hygiene = hygiene
        self.drain_seconds = drain_seconds


class DrainingState(ServerState):
    """uvicorn's state shared by a server's connections, plus whether the server is draining."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False


_encoder = msgspec.json.Encoder()


def _error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP response in the DESIGN §2.3 error shape, for answers the protocol gives itself."""
    request_id = random_hex(16).encode()
    body = _encoder.encode(
        ErrorBody(error=message, error_code=code, details=None, request_id=request_id.decode())
    )
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\nx-request-id: ",
            request_id,
            b"\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n\r\n",
            body,
        ]
    )


_JOIN_LIMIT = 64 * 1024


class OneWriteTransport:
    """The connection's transport as a response cycle sees it: a response's header block is held until its
    body is written and both go in one write (one syscall and one TCP segment instead of two; each write
    was a tenth of a single quote's server CPU). Whatever else ends the turn first (a HEAD response has
    no body write, a streaming response awaits between its parts, the connection closes) sends what is
    held: nothing is held past the event-loop turn it was written in."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= _JOIN_LIMIT:
                self._transport.write(held + data)
            else:  # a large body is not copied to join it (a 10^6-position batch's is hundreds of MB)
                self._transport.write(held)
                self._transport.write(data)
        elif data.startswith(b"HTTP/1.1 "):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            # Also while closing, as the write would have been had it not been held (a transport closed
            # after a half-close still sends what was written before it is gone).
            with contextlib.suppress(RuntimeError):  # uvloop: the connection is already gone
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request the protocol refuses."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body read timeouts and a header size limit.

    Between the end of one request's body (or the opening of the connection) and the end of the next
    request's headers the connection is "in headers": the raw bytes received then are counted (memory
    stays bounded by the limit plus one read; the exact size is computed only when that count passes the
    limit, since a read may also hold the start of a body), and the header timer runs from the first of
    them. Timers are armed only when a read leaves headers or a body incomplete: a request that arrives
    in one read costs no timer."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: Any = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._hygiene: ConnectionHygiene = getattr(config, "hygiene", None) or ConnectionHygiene()
        self._in_headers = True
        self._header_bytes = 0  # raw bytes received while in headers
        self._in_body = False
        self._refused = False
        self._header_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._body_seen_at = 0.0
        self._shutting_down = False

    # -- connection -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every write and close of this connection (the response cycles', and the protocol's own 400, 408,
        # 431 and shutdown) goes through one OneWriteTransport, so nothing overtakes a held header block
        # and a close sends it first. Flow control keeps the real transport (uvicorn set it up above).
        self._one_write = OneWriteTransport(transport, self.loop)
        self.transport = self._one_write  # type: ignore[assignment]

    def eof_received(self) -> None:
        # The client half-closed: the transport closes itself after this, so what is held goes first.
        self._one_write.flush()
        self._header_timer = self.loop.call_later(self._hygiene.header_read_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._in_headers:
            self._header_bytes += len(data)
        elif self._body_timer is not None:
            self._body_seen_at = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refused:
                self._refuse_headers()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._in_headers:
            if self._header_bytes > self._hygiene.max_header_bytes:
                self._refused = True
                self._refuse_headers()
            elif self._header_timer is None and self._header_bytes:
                self._header_timer = self.loop.call_later(
                    self._hygiene.header_read_timeout, self._header_timeout
                )
        elif self._in_body and self._body_timer is None:
            self._body_seen_at = self.loop.time()
            self._body_timer = self.loop.call_later(self._hygiene.body_read_timeout, self._body_timeout)

    def shutdown(self) -> None:
        """The listener has closed. A connection between requests, or accepted just before, gets a moment
        to send its request, and one halfway through its headers the header timeout: each is answered,
        with `Connection: close`, instead of reset."""
        self._shutting_down = True
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._in_headers and not self._refused:
            if self._header_bytes == 0:
                self.loop.call_later(LATE_CONNECTION_GRACE_SECONDS, self._close_if_idle)
            return
        super().shutdown()

    def _close_if_idle(self) -> None:
        if self._in_headers and self._header_bytes == 0 and not self.transport.is_closing():
            self.transport.close()

    # -- parser callbacks -------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        if self._header_bytes > self._hygiene.max_header_bytes:
            # The reads held more than the limit; the headers alone may not (a body may follow them).
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self._hygiene.max_header_bytes:
                self._refused = True
                raise _Refused
        self._in_headers = False
        self._header_bytes = 0
        self._in_body = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        draining = self._shutting_down or getattr(self.server_state, "draining", False)
        if draining and self.cycle is not None:
            # Draining: this response tells the client to reconnect (elsewhere) and closes.
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._in_body = False
        self._in_headers = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -- limits -----------------------------------------------------------------------------------
    def _refuse_headers(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(
                _error_response(
                    431,
                    "HEADERS_TOO_LARGE",
                    f"request line and headers exceed {self._hygiene.max_header_bytes} bytes",
                )
            )
            self.transport.close()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._in_headers or self.transport.is_closing():
            return
        if self._header_bytes:
            self.transport.write(
                _error_response(408, "REQUEST_TIMEOUT", "request headers not received in time")
            )
        self.transport.close()

    def _body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if not self._in_body or cycle is None or self.transport.is_closing():
            return
        idle = self.loop.time() - self._body_seen_at
        if idle < self._hygiene.body_read_timeout:
            self._body_timer = self.loop.call_later(
                self._hygiene.body_read_timeout - idle, self._body_timeout
            )
            return
        if not cycle.response_started:
            self.transport.write(_error_response(408, "REQUEST_TIMEOUT", "request body stalled"))
            # So that metrics and logs record the 408 the client got, not a client that went away.
            cycle.scope[BODY_TIMED_OUT_KEY] = True  # type: ignore[literal-required]
        # The application sees the client gone (its receive() answers http.disconnect).
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
