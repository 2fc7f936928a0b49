"""The PostgreSQL stores assembled: `postgres_stores` over an existing pool, `connect_stores` opening the
pool too."""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]

from pricer.errors import PricerError
from pricer.stores.postgres.audit import PgQuoteStore
from pricer.stores.postgres.clients import PgClientStore, PgKeyStore
from pricer.stores.postgres.common import keep_session, quote_identifier, translate_errors, valid_schema_name
from pricer.stores.postgres.marketdata import (
    DEFAULT_REFRESH_SECONDS,
    PgAvailabilityStore,
    PgEventStore,
    PgStockStore,
    PgVolatilityStore,
)
from pricer.stores.protocols import Stores


def postgres_stores(pool: Any, *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> Stores:
    """The PostgreSQL stores over an existing pool (whose connections' search path holds the tables)."""
    return Stores(
        clients=PgClientStore(pool),
        stocks=PgStockStore(pool),
        availability=PgAvailabilityStore(pool, refresh_seconds=refresh_seconds),
        volatility=PgVolatilityStore(pool, refresh_seconds=refresh_seconds),
        events=PgEventStore(pool),
        keys=PgKeyStore(pool),
        quotes=PgQuoteStore(pool),
    )


async def connect_stores(
    dsn: str,
    *,
    schema: str | None = None,
    min_size: int = 2,
    max_size: int = 10,
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
) -> tuple[Stores, asyncpg.Pool]:
    """Open a pool on `dsn` (tables in `schema`, default: the server's search path) and build the stores
    on it. The caller closes the pool (`await pool.close()`). Raises ServiceUnavailable when the database
    cannot be reached. Migrations are not run here: see `pricer.stores.migrate.migrate`."""
    if schema is not None and not valid_schema_name(schema):
        raise PricerError(f"Schema name {schema!r} is not a plain identifier")
    server_settings = {"application_name": "pricer", "jit": "off"}
    if schema is not None:
        server_settings["search_path"] = quote_identifier(schema)
    with translate_errors("connect"):
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, server_settings=server_settings, reset=keep_session
        )
    return postgres_stores(pool, refresh_seconds=refresh_seconds), pool
