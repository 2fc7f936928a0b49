"""PostgreSQL helpers for tests: a throwaway schema per test on the shared server, and stores on it.

The server is the one at `PRICER_TEST_DATABASE_URL` (default: the local trust-auth server,
`postgresql://postgres@127.0.0.1:5432/test`). Tests never stop it and never skip when it is down: they
fail. Each use gets its own schema `test_<uuid hex>`, dropped (CASCADE) afterwards, so parallel runs and
leftovers of other runs never meet.

    async with pg_schema() as (dsn, schema): ...           # an empty schema
    async with pg_stores() as (stores, pool, dsn, schema): ...   # migrated, with the PostgreSQL stores
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from pricer.stores.migrate import migrate
from pricer.stores.postgres.assembly import connect_stores
from pricer.stores.postgres.common import quote_identifier
from pricer.stores.postgres.marketdata import DEFAULT_REFRESH_SECONDS
from pricer.stores.protocols import Stores

PG_DSN: str = os.environ.get("PRICER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

__all__ = ["PG_DSN", "drop_schema", "new_schema_name", "pg_schema", "pg_stores"]


def new_schema_name() -> str:
    return f"test_{uuid.uuid4().hex}"


async def drop_schema(schema: str, dsn: str = PG_DSN) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE")
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def pg_schema(*, create: bool = True, dsn: str = PG_DSN) -> AsyncIterator[tuple[str, str]]:
    """A fresh schema name on the test server (created unless `create=False`), dropped on exit."""
    schema = new_schema_name()
    if create:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(f"CREATE SCHEMA {quote_identifier(schema)}")
        finally:
            await connection.close()
    try:
        yield dsn, schema
    finally:
        await drop_schema(schema, dsn)


@contextlib.asynccontextmanager
async def pg_stores(
    *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS, max_size: int = 4
) -> AsyncIterator[tuple[Stores, Any, str, str]]:
    """A migrated throwaway schema and the PostgreSQL stores on it: (stores, pool, dsn, schema)."""
    async with pg_schema() as (dsn, schema):
        await migrate(dsn, schema=schema)
        stores, pool = await connect_stores(
            dsn, schema=schema, min_size=1, max_size=max_size, refresh_seconds=refresh_seconds
        )
        try:
            yield stores, pool, dsn, schema
        finally:
            await pool.close()
