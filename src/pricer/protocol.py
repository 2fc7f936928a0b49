"""The HTTP protocol of the engine's server: uvicorn's httptools protocol plus what uvicorn lacks against
slow or huge clients: a header read timeout (a connection that has not sent complete request headers in
time is closed: slowloris), a body read timeout (a body that stalls between chunks gets 408), and a limit
on the request line + headers (431). The connection cap is uvicorn's `limit_concurrency` (503 past it).

And what uvicorn does per request that can be done once or in C: the response cycle is
`pricer.response_cycle.ResponseCycle`, one keep-alive timer serves a connection's whole life, request targets
are parsed once, and a connection's responses leave in one write at the end of their event-loop turn
(`OneWriteTransport`).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from asyncio.events import TimerHandle
from dataclasses import dataclass
from typing import Any

import httptools
import msgspec
import uvicorn
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from pricer.context import BODY_TIMED_OUT_KEY
from pricer.ids import random_hex
from pricer.response_cycle import MessageEvent, ResponseCycle
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

# Request targets as uvicorn parses them into the scope (path, raw path, query string), by target: most
# requests name one of a few targets, and parsing one costs more than a dictionary lookup. Bounded: the
# dictionary is emptied when full (a client sending only new targets gets uvicorn's cost, no more).
_PARSED_URLS: dict[bytes, tuple[str, bytes, bytes]] = {}
_PARSED_URLS_KEPT = 1024


class OneWriteTransport:
    """The connection's transport as a response cycle sees it: a response, from its header block on, is held
    until the end of the event-loop turn it was written in and leaves in one write (one syscall and one TCP
    segment instead of two; each write was a tenth of a single quote's server CPU), after every request of
    that turn was answered, so that the client's reader is woken once for all of them. A large body is
    not copied to join what is held (both are written at once), and a close sends what is held first:
    nothing is held past the turn it was written in."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            if len(held) + len(data) <= _JOIN_LIMIT:
                # The whole response waits for the end of the turn (with the other responses of the turn):
                # the client's side is woken once for all of them, not once per response (on loopback
                # each write runs the receiver's TCP path and wakes its reader).
                self._held = held + data
                return
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
            # A try costs nothing when nothing is raised; contextlib.suppress is an object and two calls
            # on every response.
            try:  # noqa: SIM105
                self._transport.write(held)
            except RuntimeError:  # uvloop: the connection is already gone
                pass

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
        self._idle_since: float | None = None  # when the last response ended, None while a request runs

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
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    # -- keep-alive -------------------------------------------------------------------------------
    # uvicorn arms a keep-alive timer after every response and cancels it at the next read: two timer
    # operations per request. Here the connection notes when it went idle, and one timer, armed when none
    # is, checks the idle time when it fires (and re-arms for what is left): the same timeout, a timer
    # operation per timeout period instead of two per request.
    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_check
            )

    def _keep_alive_check(self) -> None:
        idle_since = self._idle_since
        if idle_since is None:  # a request is under way: look again a whole timeout later
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_check
            )
            return
        left = idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_check)
            return
        self.timeout_keep_alive_task = None
        self.timeout_keep_alive_handler()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._idle_since = None
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
        self._start_cycle()

    def _start_cycle(self) -> None:
        """uvicorn's `on_headers_complete` (its steps in its order), with this engine's response cycle."""
        parser = self.parser
        http_version = parser.get_http_version()
        scope = self.scope
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        url = self.url
        parsed = _PARSED_URLS.get(url)
        if parsed is None:
            parsed_url = httptools.parse_url(url)
            raw_path = parsed_url.path
            path = raw_path.decode("ascii")
            if "%" in path:
                path = urllib.parse.unquote(path)
            parsed = (path, raw_path, parsed_url.query or b"")
            if len(_PARSED_URLS) >= _PARSED_URLS_KEPT:
                _PARSED_URLS.clear()
            _PARSED_URLS[url] = parsed
        path, raw_path, scope["query_string"] = parsed
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path if self.root_path else raw_path
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing_cycle = self.cycle
        draining = self._shutting_down or getattr(self.server_state, "draining", False)
        self.cycle = ResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=MessageEvent(),  # type: ignore[arg-type]
            expect_100_continue=self.expect_100_continue,
            # Draining: this response tells the client to reconnect (elsewhere) and closes.
            keep_alive=http_version != "1.0" and parser.should_keep_alive() and not draining,
            on_response=self.on_response_complete,
        )
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined requests wait for the response before them
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

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
