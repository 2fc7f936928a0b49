"""PostgreSQL stores over an asyncpg pool: the shared backend of a scaled-out deployment (DESIGN §1).

Each class mirrors the semantics of its in-memory twin in `pricer.stores.memory` (the contract tests run
one suite against both). The tables come from `stores/migrations/*.sql`, applied by
`pricer.stores.migrate.migrate`.

Numbers: a float is written as the shortest text that round-trips it (`repr`) into a NUMERIC column and
read back through `::float8` (PostgreSQL converts the exact decimal text with a correctly rounded
`strtod`, the same float as `float(Decimal(...))`), so every figure comes back bit for bit.

Errors: every asyncpg or socket error is translated here (`translate_errors`): an unreachable or
overloaded database becomes `ServiceUnavailable`, a rejected value `InvalidParameter`, a duplicate
`Conflict`, anything else `BackendError`. Messages carry the SQLSTATE and the constraint at most, never the
DSN, a host name or a password.

Hot-path caching: `PgAvailabilityStore.current()` and `PgVolatilityStore.latest()` keep the record in force
in process. A write through the store updates it before the call returns; another replica's write is
picked up by a cheap indexed check made at most once per `refresh_seconds` (default 0.5 s, so a change is
in force everywhere within 1 s), or at the next call after `invalidate()` (for an invalidation message).
If that check fails while a record is cached, the cached record keeps serving (`last_refresh_error` tells)
and the check is retried at the next interval.

The modules, by what they store:
- `common`: error translation, identifier helpers, value converters, the stores' base, the pools' reset;
- `clients`: clients and API keys (`PgClientStore`, `PgKeyStore`);
- `marketdata`: stocks, availability, volatility, market events (the records in force cached in process);
- `audit`: the audit trail (`PgQuoteStore`), its SQL and its writes; `copy_rows`: its rows' binary COPY data;
- `assembly`: `postgres_stores` and `connect_stores`.
This package re-exports the public names.
"""

from pricer.stores.postgres.assembly import connect_stores, postgres_stores
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

__all__ = [
    "DEFAULT_REFRESH_SECONDS",
    "PgAvailabilityStore",
    "PgClientStore",
    "PgEventStore",
    "PgKeyStore",
    "PgQuoteStore",
    "PgStockStore",
    "PgVolatilityStore",
    "connect_stores",
    "keep_session",
    "postgres_stores",
    "quote_identifier",
    "translate_errors",
    "valid_schema_name",
]
