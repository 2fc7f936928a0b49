"""Serving: uvicorn with connection hygiene, a draining shutdown and several workers.

The HTTP protocol with its connection guards is `pricer.protocol.GuardedHttpToolsProtocol`; the draining
shutdown of one server and the supervisor of several workers are in `pricer.draining`. Here: the options,
the listener, one server or several workers (which publish their metrics to a directory the parent makes,
so that `/metrics` on any worker reports the sums over all of them), and the worker's app.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import shutil
import socket
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from pricer.draining import DrainingServer, Supervisor
from pricer.logs import fields
from pricer.protocol import ConnectionHygiene, GuardedHttpToolsProtocol, ServerConfig
from pricer.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from pricer.app import PricerApp

log = logging.getLogger("pricer.server")

# The environment variable through which the parent hands its workers their metrics directory.
WORKER_METRICS_DIR_ENV = "PRICER_WORKER_METRICS_DIR"
# File descriptors kept for everything but client connections (listener, pools, logs, spool, metrics).
RESERVED_FDS = 256

__all__ = ["ConnectionHygiene", "GuardedHttpToolsProtocol", "ServerConfig", "serve_one", "serve_workers"]


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
