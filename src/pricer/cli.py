"""The one console script, `pricer`:

serve                              run the engine (uvicorn; HOST, PORT, WORKERS)
load ibkr|vix|earnings FILE        load market data (into the database with DATABASE_URL, else
                                   through the running engine's admin endpoint)
migrate                            apply the SQL migrations (DATABASE_URL)
clients put|list                   clients in the database (as PUT /api/v1/admin/clients/{client_id})
keys create|list|show|revoke       API keys in the database (secrets shown once, stored as HMACs)
check-db                           database connectivity, as the runbook's check
seed-demo                          the demo clients, market data and keys, into the database
simulate-sources                   the lender, volatility and event-calendar providers of DESIGN §3.1,
                                   simulated on one port with faults switchable at run time
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import os
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from pricer import __version__
from pricer.errors import PricerError
from pricer.settings import Settings, SettingsError, load_settings

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
    clients = commands.add_parser("clients", help="clients in the database (DATABASE_URL)").add_subparsers(
        dest="clients_command", required=True
    )
    put = clients.add_parser(
        "put",
        help="create or change a client, checked as the admin API checks it (options not given keep the "
        "stored values; a new client needs --markup, --fee-type and --fee)",
    )
    put.add_argument("client_id")
    put.add_argument(
        "--markup",
        dest="markup_percentage",
        type=float,
        metavar="PERCENT",
        help="markup in percent (4 decimals)",
    )
    put.add_argument("--fee-type", dest="transaction_fee_type", choices=["FLAT", "PERCENTAGE"])
    put.add_argument(
        "--fee",
        dest="transaction_amount",
        type=float,
        metavar="AMOUNT",
        help="FLAT: dollars (2 decimals); PERCENTAGE: 0-100",
    )
    put.add_argument("--day-count", dest="day_count", type=int, metavar="N", help="360 or 365")
    put.add_argument(
        "--per-minute", dest="rate_limit_per_minute", type=int, metavar="N", help="requests a minute"
    )
    put.add_argument("--burst", dest="burst", type=int, metavar="N", help="requests allowed at once")
    clients.add_parser("list", help="list the clients")
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
    simulate = commands.add_parser(
        "simulate-sources",
        help="serve simulated lender, volatility and event-calendar APIs (DESIGN §3.1), faults switchable",
    )
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8100, help="0 takes any free port (printed)")
    simulate.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data"),
        help="IBKR file, VIX history, earnings calendar",
    )
    simulate.add_argument(
        "--api-key", help="key the provider calls must send as X-API-Key (default: SIMULATOR_API_KEY; none)"
    )
    args = parser.parse_args(argv)

    if args.command == "simulate-sources":
        # The simulator runs none of the engine: the engine's settings are neither read nor needed.
        from pricer.simulator.server import run_simulator

        return run_simulator(host=args.host, port=args.port, data_dir=args.data_dir, api_key=args.api_key)

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
        if args.command == "clients":
            if args.clients_command == "list":
                return await commands.list_clients(settings)
            options = {name: getattr(args, name) for name in commands.CLIENT_OPTIONS}
            return await commands.put_client(settings, args.client_id, options)
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
    from pricer.app import create_app
    from pricer.demo import announce_demo_keys
    from pricer.logs import configure_logging
    from pricer.server import freeze_startup_objects, serve_one, serve_workers

    configure_logging(settings.log_level)
    if settings.workers > 1:
        return serve_workers(settings)
    base_url = f"http://{settings.host}:{settings.port}"
    try:
        app = create_app(
            settings,
            on_demo_keys=lambda keys: announce_demo_keys(keys, settings.demo_keys_file, base_url),
        )
    except SettingsError as error:
        print(f"pricer: configuration error: {error}", file=sys.stderr)
        return 2
    app.lifecycle.startup.append(freeze_startup_objects)
    return serve_one(settings, app)


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
