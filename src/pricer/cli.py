"""The one console script, `pricer`:

serve                              run the engine (uvicorn; HOST, PORT, WORKERS)
load ibkr|vix|earnings FILE        load market data (into the database with DATABASE_URL, else
                                   through the running engine's admin endpoint)
migrate                            apply the SQL migrations (DATABASE_URL)
keys create|list|show|revoke       API keys in the database (secrets shown once, stored as HMACs)
check-db                           database connectivity, as the runbook's check
seed-demo                          the demo clients, market data and keys, into the database
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import logging
import os
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pricer import __version__
from pricer.errors import PricerError
from pricer.logs import fields
from pricer.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from pricer.app import PricerApp

log = logging.getLogger("pricer.cli")

_LOAD_ENDPOINTS = {
    "ibkr": "/api/v1/admin/availability",
    "vix": "/api/v1/admin/vix-history",
    "earnings": "/api/v1/admin/earnings-calendar",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pricer", description="Borrow Rate & Locate Fee Pricing Engine")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", help="serve the engine with uvicorn (HOST, PORT, WORKERS from the environment)"
    )
    load = commands.add_parser("load", help="load a market-data file into the running engine")
    load.add_argument("kind", choices=sorted(_LOAD_ENDPOINTS))
    load.add_argument("file", type=Path)
    load.add_argument(
        "--url", help="engine base URL (default: PRICER_URL, the demo keys file, or http://HOST:PORT)"
    )
    load.add_argument("--key", help="admin API key (default: PRICER_ADMIN_KEY or the demo keys file)")
    commands.add_parser("migrate", help="apply the database migrations (DATABASE_URL)")
    commands.add_parser("check-db", help="check that the database answers (DATABASE_URL)")
    commands.add_parser("seed-demo", help="load the demo data and print two demo keys (DATABASE_URL)")
    keys = commands.add_parser("keys", help="API keys in the database (DATABASE_URL)").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="issue a key; its secret is printed once")
    create.add_argument("client_id")
    create.add_argument("--scopes", default="quote,rates", help="comma-separated: quote, rates, admin, audit")
    create.add_argument("--expires-in-days", type=int, default=90)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--client", dest="client_id")
    show = keys.add_parser("show", help="a key's record; with the whole key, also verify its secret")
    show.add_argument("key")
    revoke = keys.add_parser("revoke", help="revoke a key (in force on every replica within a second)")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"pricer: configuration error: {error}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    if args.command == "load" and settings.database_url is None:
        return load_file(settings, args.kind, args.file, url=args.url, key=args.key)
    if settings.database_url is None:
        print(
            f"pricer: {args.command} needs DATABASE_URL (the embedded default keeps its data in the "
            "running process: use the admin endpoints)",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_database_command(settings, args))


async def _database_command(settings: Settings, args: argparse.Namespace) -> int:
    from pricer import commands
    from pricer.models import Scope

    try:
        if args.command == "migrate":
            return await commands.migrate_command(settings)
        if args.command == "check-db":
            return await commands.check_database(settings)
        if args.command == "seed-demo":
            return await commands.seed_demo_command(settings)
        if args.command == "load":
            try:
                content = args.file.read_bytes()
            except OSError as error:
                print(f"pricer: cannot read {args.file}: {error.strerror}", file=sys.stderr)
                return 2
            return await commands.load_into_database(settings, args.kind, content)
        if args.keys_command == "create":
            try:
                scopes = [Scope(part.strip()) for part in args.scopes.split(",") if part.strip()]
            except ValueError:
                print("pricer: --scopes takes quote, rates, admin, audit", file=sys.stderr)
                return 2
            return await commands.create_key(settings, args.client_id, scopes, args.expires_in_days)
        if args.keys_command == "list":
            return await commands.list_keys(settings, args.client_id)
        if args.keys_command == "show":
            return await commands.show_key(settings, args.key)
        return await commands.revoke_key(settings, args.key_id)
    except PricerError as error:
        print(f"pricer: {error.message}", file=sys.stderr)
        return 1


def serve(settings: Settings) -> int:
    import uvicorn

    from pricer.app import create_app
    from pricer.demo import announce_demo_keys
    from pricer.logs import configure_logging

    configure_logging(settings.log_level)
    base_url = f"http://{settings.host}:{settings.port}"
    options = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "log_config": None,
        "server_header": False,
        # Nothing here uses the client address (limits and logs go by client id), so uvicorn's
        # X-Forwarded-For middleware would be one more layer on every request for nothing.
        "proxy_headers": False,
        "timeout_graceful_shutdown": max(1, int(settings.shutdown_drain_seconds) + 25),
    }
    if settings.workers > 1:
        # Several processes share the port; each builds its own app (stores and limits are shared through
        # PostgreSQL and Redis, which WORKERS > 1 requires). Kubernetes runs one worker per pod instead,
        # which also keeps the SIGTERM drain of a single server.
        uvicorn.run("pricer.cli:worker_app", factory=True, workers=settings.workers, **options)  # type: ignore[arg-type]
        return 0
    try:
        app = create_app(
            settings,
            on_demo_keys=lambda keys: announce_demo_keys(keys, settings.demo_keys_file, base_url),
        )
    except SettingsError as error:
        print(f"pricer: configuration error: {error}", file=sys.stderr)
        return 2
    app.lifecycle.startup.append(_freeze_startup_objects)
    config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
    server = _draining_server_class()(config, app=app, drain_seconds=settings.shutdown_drain_seconds)
    server.run()
    return 0 if server.started else 1


# Young-generation threshold (CPython's default is 700). A request frees what it allocates, but the
# audit queue holds each priced batch for the writer's few milliseconds of linger: at thousands of quotes
# a second the default threshold then runs a collection every few hundred quotes, each promoting the
# queued batches to older generations that are walked again (4 µs a quote measured with PostgreSQL and
# the audit trail on). At 10,000, most queued batches are written and freed before a collection sees
# them; a young collection walks at most that many objects (about a millisecond).
GC_YOUNG_THRESHOLD = 10_000


async def _freeze_startup_objects() -> None:
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

    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM: /health answers 503 for the drain period while requests are still served (the
        readiness probe takes the pod out), then uvicorn closes the listener, lets in-flight requests
        finish and runs the lifespan shutdown (the audit queue flushes). A second signal stops at once."""

        def __init__(self, config: uvicorn.Config, *, app: PricerApp, drain_seconds: float) -> None:
            super().__init__(config)
            self._app = app
            self._drain_seconds = drain_seconds

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            lifecycle = self._app.lifecycle
            if lifecycle.draining or self._drain_seconds <= 0:
                super().handle_exit(sig, frame)
                return
            lifecycle.draining = True
            log.info("Draining before shutdown", extra=fields(seconds=self._drain_seconds))
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(
                loop.call_later, self._drain_seconds, self._stop_after_drain, sig, frame
            )

        def _stop_after_drain(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # A drained shutdown is a clean exit (status 0): uvicorn would re-raise the signal it recorded.
            self._captured_signals.remove(sig)

    return DrainingServer


def _demo_file_values(settings: Settings) -> dict[str, str]:
    path = settings.demo_keys_file
    if not path or not os.path.exists(path):
        return {}
    values = {}
    for line in Path(path).read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values


def load_file(settings: Settings, kind: str, file: Path, *, url: str | None, key: str | None) -> int:
    """Send the file to the running engine's admin endpoint (the embedded default's way to load)."""
    demo = _demo_file_values(settings)
    base = (
        url
        or os.environ.get("PRICER_URL")
        or demo.get("PRICER_URL")
        or f"http://{settings.host}:{settings.port}"
    )
    admin_key = key or os.environ.get("PRICER_ADMIN_KEY") or demo.get("DEMO_ADMIN_KEY")
    if not admin_key:
        print("pricer: no admin key: pass --key or set PRICER_ADMIN_KEY", file=sys.stderr)
        return 2
    try:
        content = file.read_bytes()
    except OSError as error:
        print(f"pricer: cannot read {file}: {error.strerror}", file=sys.stderr)
        return 2
    target = urllib.parse.urlsplit(base.rstrip("/") + _LOAD_ENDPOINTS[kind])
    if target.scheme not in ("http", "https") or not target.hostname:
        print(f"pricer: not an http(s) URL: {base}", file=sys.stderr)
        return 2
    connection_class = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(target.hostname, target.port, timeout=120)
    headers = {"Content-Type": "text/plain", "X-API-Key": admin_key, "Content-Length": str(len(content))}
    try:
        # The engine may answer (a refusal) and close before reading the whole file: read its answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request("POST", target.path, body=content, headers=headers)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    except OSError as error:
        print(f"pricer: cannot reach the engine at {base}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if response.status >= 400:
        print(f"pricer: {kind} file rejected ({response.status}): {body}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads(body), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
