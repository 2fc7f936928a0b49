"""Schema migrations of the PostgreSQL stores: plain SQL files applied in order, each exactly once.

The files are `stores/migrations/NNN_name.sql` (package data); a file's version is its name without
`.sql`. `schema_migrations(version, applied_at)` records what ran. A run takes a session-level advisory
lock (one per database and target schema) before it looks at anything, so that replicas starting together
serialise: the first applies the pending files, the others then find nothing left to do. Each file runs in
its own transaction together with its `schema_migrations` row, so a failing file leaves no trace and the
run stops there (the error names the file). A recorded version whose file is no longer shipped is left
alone; files are never edited once released: a change is a new file. A file must be able to run inside a
transaction (no `CREATE INDEX CONCURRENTLY`, no `VACUUM`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from pricer.errors import PricerError
from pricer.stores.postgres.common import quote_identifier, translate_errors, valid_schema_name

__all__ = [
    "Migration",
    "applied_versions",
    "migrate",
    "migration_lock_key",
    "migrations",
    "pending_migrations",
]

_FILE_NAME = re.compile(r"^([0-9]{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str


def migrations() -> list[Migration]:
    """The shipped migration files, in the order they apply."""
    folder = resources.files("pricer.stores").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            if _FILE_NAME.match(entry.name) is None:
                raise PricerError(f"Migration file name {entry.name!r} is not NNN_name.sql")
            found.append(Migration(version=entry.name[: -len(".sql")], sql=entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    numbers = [migration.version[:3] for migration in found]
    if len(set(numbers)) != len(numbers):
        raise PricerError("Two migration files share a number")
    return found


def migration_lock_key(schema: str | None) -> int:
    """The advisory lock (a signed 64-bit key) a migration run of `schema` holds; the default search
    path's schema is `None`."""
    digest = hashlib.sha256(f"pricer.migrate:{schema or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(dsn: str, *, schema: str | None = None, through: str | None = None) -> list[str]:
    """Apply the pending migrations to `schema` (created if missing; default: the first schema of the
    connection's search path) and return the versions applied by this call, in order ([] when the
    schema was up to date). Safe to run from several processes at once. `through` stops after that
    version (a schema as an older release left it, for upgrade tests)."""
    if schema is not None and not valid_schema_name(schema):
        raise PricerError(f"Schema name {schema!r} is not a plain identifier")
    files = migrations()
    if through is not None:
        versions = [migration.version for migration in files]
        if through not in versions:
            raise PricerError(f"No migration {through!r} (shipped: {', '.join(versions)})")
        files = files[: versions.index(through) + 1]
    with translate_errors("migrate"):
        connection = await asyncpg.connect(dsn)
    try:
        with translate_errors("migrate"):
            return await _migrate(connection, schema, files)
    finally:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await connection.close()


async def applied_versions(connection: Any) -> list[str]:
    """The versions recorded in `schema_migrations` of the connection's search path, in order."""
    rows = await connection.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [str(row["version"]) for row in rows]


async def pending_migrations(pool: Any) -> list[str]:
    """The shipped versions not yet applied in the schema a pool (or connection) works in: a start-up or
    readiness check (`connect_stores` does not migrate)."""
    with translate_errors("migrations.pending"):
        exists = await pool.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = set(await applied_versions(pool)) if exists else set()
    return [migration.version for migration in migrations() if migration.version not in done]


async def _migrate(connection: Any, schema: str | None, files: list[Migration]) -> list[str]:
    key = migration_lock_key(schema)
    await connection.execute("SELECT pg_advisory_lock($1)", key)
    try:
        if schema is not None:
            await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}")
            await connection.execute("SELECT set_config('search_path', $1, false)", quote_identifier(schema))
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = set(await applied_versions(connection))
        applied: list[str] = []
        for migration in files:
            if migration.version in done:
                continue
            try:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())",
                        migration.version,
                    )
            except asyncpg.PostgresError as exc:
                raise PricerError(
                    f"Migration {migration.version} failed: {type(exc).__name__} "
                    f"(SQLSTATE {exc.sqlstate}): {exc.args[0] if exc.args else ''}"
                ) from exc
            applied.append(migration.version)
        return applied
    finally:
        if not connection.is_closed():
            # Best effort: if the connection broke, the server has released the lock with the session.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await connection.execute("SELECT pg_advisory_unlock($1)", key)
