"""Serving: uvicorn with connection hygiene, a draining shutdown and several workers.

- `GuardedHttpToolsProtocol`: uvicorn's httptools protocol plus what uvicorn lacks against slow or huge
  clients: a header read timeout (a connection that has not sent complete request headers in time is
  closed: slowloris), a body read timeout (a body that stalls between chunks gets 408), and a limit on the
  request line + headers (431). The connection cap is uvicorn's `limit_concurrency` (503 past it).
- `DrainingServer`: on SIGTERM /health answers 503 for SHUTDOWN_DRAIN_SECONDS while requests are served,
  every response in that time carries `Connection: close` (clients reconnect elsewhere before the listener
  closes), then the listener closes, in-flight requests finish and the lifespan shutdown runs (exit 0).
  A repeat of the stop signal is ignored; the other stop signal ends the drain early, never the shutdown.
- `Supervisor`: uvicorn's multiprocess supervisor (a dead worker is replaced) whose workers are
  `DrainingServer`s; on SIGTERM (SIGINT) every worker gets the same signal and drains. Workers publish
  their metrics to a directory the parent makes, so that `/metrics` on any worker reports the sums over
  all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
from asyncio.events import TimerHandle
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import httptools
import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from pricer.context import BODY_TIMED_OUT_KEY
from pricer.ids import random_hex
from pricer.logs import fields
from pricer.schemas import ErrorBody
from pricer.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from pricer.app import PricerApp

log = logging.getLogger("pricer.server")

# The environment variable through which the parent hands its workers their metrics directory.
WORKER_METRICS_DIR_ENV = "PRICER_WORKER_METRICS_DIR"
# File descriptors kept for everything but client connections (listener, pools, logs, spool, metrics).
RESERVED_FDS = 256
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


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or SIGINT): /health answers 503 for the drain period while requests are still served
    (the readiness probe takes the pod out) and every response closes its connection; then uvicorn closes
    the listener, lets in-flight requests finish and runs the lifespan shutdown (the audit queue flushes).

    Once stopping, a repeat of the signal that started the stop is ignored: the same stop delivered twice
    (an init that signals the process group, such as `tini -g`, plus the supervisor's forward; Ctrl+C on a
    terminal reaching the whole group) must not cut the drain short. The other stop signal during the
    drain ends the drain at once (a way to hurry a stop); the shutdown after it is still graceful:
    in-flight requests finish and the lifespan shutdown runs. No signal skips the lifespan shutdown
    (uvicorn's force exit on a second SIGINT would leave the audit queue unflushed): SIGKILL is the way
    to force, at the cost of what is still in memory."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.server_state: DrainingState = DrainingState()
        self._drain_seconds: float = getattr(config, "drain_seconds", 0.0)
        self._draining = False
        self._stop_signal: int | None = None  # the signal that started the stop
        self._drain_timer: TimerHandle | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_signal is not None:
            self._repeated(sig)
            return
        self._stop_signal = sig
        if self._drain_seconds <= 0 or not self.started:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.server_state.draining = True
        app = self.config.loaded_app
        lifecycle = getattr(app, "lifecycle", None)
        if lifecycle is not None:
            lifecycle.draining = True
        log.info("Draining before shutdown", extra=fields(seconds=self._drain_seconds))
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        # Requests already past their headers close their connection after their response too.
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_started:
                cycle.keep_alive = False
        if not self.should_exit:
            loop = asyncio.get_event_loop()
            self._drain_timer = loop.call_later(self._drain_seconds, self._stop_after_drain)

    def _stop_after_drain(self) -> None:
        """The drain is over (or cut short): uvicorn's shutdown runs. Not through `handle_exit`: a
        drained shutdown is a clean exit (status 0; uvicorn would re-raise a signal it recorded), and a
        SIGINT recorded there would turn into a force exit that skips the lifespan shutdown."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self.should_exit = True

    def _repeated(self, sig: int) -> None:
        """A signal after the one that started the stop (run as a signal handler: loop work is deferred)."""
        name = signal.Signals(sig).name
        if sig == self._stop_signal or not self._draining or self.should_exit:
            log.info("Stop signal repeated: ignored", extra=fields(signal=name))
            return
        log.info("Drain ended early by a second signal", extra=fields(signal=name))
        asyncio.get_event_loop().call_soon_threadsafe(self._stop_after_drain)


class _DrainingProcess(Process):
    """A worker process whose server drains on SIGTERM."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's supervisor (workers pinged every half second; a dead or hung one is replaced) with
    draining workers. On SIGTERM/SIGINT every worker gets the same signal and drains; the parent closes
    its copy of the listening socket at once, so that the listener closes when the last worker closes it."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.failed = False
        self._signalled: set[int] = set()
        # uvicorn queues signals for a loop that looks every half second; SIGTERM/SIGINT also reach the
        # workers at once, so that every worker starts its drain when the pod is told to stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward_stop)

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = _DrainingProcess(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == 3:  # uvicorn's STARTUP_FAILURE: would fail again on every restart
                log.error("Worker failed to start, stopping", extra=fields(pid=process.pid))
                self.failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning(
                "Worker died, starting another", extra=fields(pid=process.pid, exitcode=process.exitcode)
            )
            replacement = _DrainingProcess(self.config, self.sockets)
            replacement.start()
            self.processes[index] = replacement

    def _forward_stop(self, sig: int, frame: FrameType | None) -> None:
        """The same signal, once per worker: a worker that also got it directly (an init signalling the
        process group, Ctrl+C on a terminal) takes the forward for a repeat and ignores it."""
        self.signal_queue.append(sig)
        for process in self.processes:
            pid = process.pid
            if pid is not None and pid not in self._signalled and process.exitcode is None:
                self._signalled.add(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)

    def terminate_all(self) -> None:
        log.info("Stopping workers", extra=fields(workers=len(self.processes)))
        # The parent's copy of the listening socket closes now; the listener closes when the last
        # draining worker closes its own copy.
        for sock in self.sockets:
            sock.close()
        for process in self.processes:
            if process.pid not in self._signalled:  # already told (a repeat would be ignored anyway)
                process.terminate()

    def handle_hup(self) -> None:
        log.warning("SIGHUP ignored: restart the pod (or the process) to reload")

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN ignored: the number of workers is WORKERS")

    def handle_ttou(self) -> None:
        log.warning("SIGTTOU ignored: the number of workers is WORKERS")


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(settings: Settings, file_limit: int) -> int:
    """MAX_CONNECTIONS, lowered (with a warning) when the file limit could not hold it."""
    room = max(16, file_limit - RESERVED_FDS)
    if settings.max_connections > room:
        log.warning(
            "MAX_CONNECTIONS lowered to fit the open-file limit",
            extra=fields(max_connections=settings.max_connections, file_limit=file_limit, cap=room),
        )
        return room
    return settings.max_connections


def uvicorn_options(settings: Settings, cap: int) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": GuardedHttpToolsProtocol,
        "lifespan": "on",
        "access_log": False,
        "log_config": None,
        "server_header": False,
        # Nothing here uses the client address (limits and logs go by client id), so uvicorn's
        # X-Forwarded-For middleware would be one more layer on every request for nothing.
        "proxy_headers": False,
        "limit_concurrency": cap,
        "timeout_graceful_shutdown": max(1, int(settings.shutdown_drain_seconds) + 25),
        "hygiene": ConnectionHygiene(
            header_read_timeout=settings.header_read_timeout_seconds,
            body_read_timeout=settings.body_read_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
        ),
        "drain_seconds": settings.shutdown_drain_seconds,
    }


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound (as uvicorn binds it) before the app starts: a port already in use then
    stops start-up before the lifespan runs, so a second `pricer serve` does not seed demo keys and overwrite
    the running server's `.demo-keys.env` only to fail to bind afterwards.

    Raises `OSError` when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve_one(settings: Settings, app: PricerApp) -> int:
    """One worker: this process serves, on a socket bound before the app's start-up (`bind_listener`)."""
    config = ServerConfig(app, **uvicorn_options(settings, connection_cap(settings, raise_file_limit())))
    try:
        sock = bind_listener(settings.host, settings.port)
    except OSError as error:
        print(
            f"pricer: cannot listen on {settings.host}:{settings.port}: {error.strerror or error} "
            "(another server on this port? set PORT)",
            file=sys.stderr,
        )
        return 1
    server = DrainingServer(config)
    try:
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", settings.host, sock.getsockname()[1]
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def serve_workers(settings: Settings) -> int:
    """WORKERS > 1: the parent binds the socket and supervises; each worker builds its own app (stores
    and limits are shared through PostgreSQL and Redis, which WORKERS > 1 requires)."""
    cap = connection_cap(settings, raise_file_limit())
    try:
        metrics_dir = tempfile.mkdtemp(prefix="pricer-metrics-", dir=settings.metrics_multiproc_dir)
    except OSError as error:
        print(f"pricer: configuration error: METRICS_MULTIPROC_DIR: {error.strerror}", file=sys.stderr)
        return 2
    os.environ[WORKER_METRICS_DIR_ENV] = metrics_dir
    try:
        config = ServerConfig(
            "pricer.server:worker_app",
            factory=True,
            workers=settings.workers,
            **uvicorn_options(settings, cap),
        )
        sock = config.bind_socket()
        supervisor = Supervisor(config, sockets=[sock])
        try:
            supervisor.run()
        finally:
            sock.close()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if supervisor.failed else 0


# Young-generation threshold (CPython's default is 700). A request frees what it allocates, but the
# audit queue holds each priced batch for the writer's few milliseconds of linger: at thousands of quotes
# a second the default threshold then runs a collection every few hundred quotes, each promoting the
# queued batches to older generations that are walked again (4 µs a quote measured with PostgreSQL and
# the audit trail on). At 10,000, most queued batches are written and freed before a collection sees
# them; a young collection walks at most that many objects (about a millisecond).
GC_YOUNG_THRESHOLD = 10_000


async def freeze_startup_objects() -> None:
    """What start-up built lives as long as the process: keep it out of every later collection, so
    that full collections (pauses in the latency tail) only walk what requests create."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def worker_app() -> PricerApp:
    """The app of one worker process when WORKERS > 1."""
    from pricer.app import create_app
    from pricer.logs import configure_logging

    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"pricer: configuration error: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    configure_logging(settings.log_level)
    app = create_app(settings, metrics_dir=os.environ.get(WORKER_METRICS_DIR_ENV))
    app.lifecycle.startup.append(freeze_startup_objects)
    return app
