"""The PostgreSQL stores of clients and their API keys: `PgClientStore` (table `clients`) and
`PgKeyStore` (table `api_keys`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from pricer.models import ApiKeyRecord, Client, FeeType, Scope
from pricer.stores.postgres.common import _float, _num, _opt_utc, _PgStore, _utc, translate_errors

# ---- clients -------------------------------------------------------------------------------------

_SELECT_CLIENTS = (
    "SELECT client_id, markup_percentage::float8 AS markup_percentage, transaction_fee_type,"
    " transaction_amount::float8 AS transaction_amount, day_count, active, rate_limit_per_minute, burst,"
    " updated_at FROM clients"
)
_SELECT_CLIENT = _SELECT_CLIENTS + " WHERE client_id = $1"


def _client(row: Any) -> Client:
    return Client(
        client_id=str(row["client_id"]),
        markup_percentage=_float(row["markup_percentage"]),
        transaction_fee_type=FeeType(row["transaction_fee_type"]),
        transaction_amount=_float(row["transaction_amount"]),
        day_count=int(row["day_count"]),
        active=bool(row["active"]),
        rate_limit_per_minute=row["rate_limit_per_minute"],
        burst=row["burst"],
        updated_at=_opt_utc(row["updated_at"]),
    )


class PgClientStore(_PgStore):
    async def get(self, client_id: str) -> Client | None:
        with translate_errors("clients.get"):
            row = await self._pool.fetchrow(_SELECT_CLIENT, client_id)
        return None if row is None else _client(row)

    async def put(self, client: Client) -> bool:
        """Store the client whole; True when it was created, False when it replaced one."""
        with translate_errors("clients.put"):
            created = await self._pool.fetchval(
                """
                INSERT INTO clients AS c (
                    client_id, markup_percentage, transaction_fee_type, transaction_amount,
                    day_count, active, rate_limit_per_minute, burst, updated_at)
                VALUES ($1, $2::numeric, $3, $4::numeric, $5, $6, $7, $8, $9)
                ON CONFLICT (client_id) DO UPDATE SET
                    markup_percentage = EXCLUDED.markup_percentage,
                    transaction_fee_type = EXCLUDED.transaction_fee_type,
                    transaction_amount = EXCLUDED.transaction_amount,
                    day_count = EXCLUDED.day_count,
                    active = EXCLUDED.active,
                    rate_limit_per_minute = EXCLUDED.rate_limit_per_minute,
                    burst = EXCLUDED.burst,
                    updated_at = EXCLUDED.updated_at,
                    stored_at = now()
                RETURNING (c.xmax = 0) AS created
                """,
                client.client_id,
                _num(client.markup_percentage),
                str(client.transaction_fee_type),
                _num(client.transaction_amount),
                client.day_count,
                client.active,
                client.rate_limit_per_minute,
                client.burst,
                client.updated_at,
            )
        return bool(created)

    async def list(self) -> Sequence[Client]:
        with translate_errors("clients.list"):
            rows = await self._pool.fetch(_SELECT_CLIENTS + " ORDER BY client_id")
        return [_client(row) for row in rows]


# ---- API keys ------------------------------------------------------------------------------------

_SELECT_KEYS = (
    "SELECT key_id, client_id, secret_hash, scopes, created_at, expires_at, revoked_at FROM api_keys"
)


def _key(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=str(row["key_id"]),
        client_id=str(row["client_id"]),
        secret_hash=bytes(row["secret_hash"]),
        scopes=frozenset(Scope(scope) for scope in row["scopes"]),
        created_at=_utc(row["created_at"]),
        expires_at=_utc(row["expires_at"]),
        revoked_at=_opt_utc(row["revoked_at"]),
    )


class PgKeyStore(_PgStore):
    """API keys by id; only the secret's HMAC is stored (the record holds nothing else secret)."""

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        with translate_errors("keys.get"):
            row = await self._pool.fetchrow(_SELECT_KEYS + " WHERE key_id = $1", key_id)
        return None if row is None else _key(row)

    async def put(self, record: ApiKeyRecord) -> None:
        """Insert or replace the key, but a revoked key stays revoked (its first revocation time is kept):
        replacing a key's secret (BOOTSTRAP_ADMIN_KEY at every start) never brings a revoked key back."""
        with translate_errors("keys.put"):
            await self._pool.execute(
                """
                INSERT INTO api_keys (
                    key_id, client_id, secret_hash, scopes, created_at, expires_at, revoked_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                ON CONFLICT (key_id) DO UPDATE SET
                    client_id = EXCLUDED.client_id,
                    secret_hash = EXCLUDED.secret_hash,
                    scopes = EXCLUDED.scopes,
                    created_at = EXCLUDED.created_at,
                    expires_at = EXCLUDED.expires_at,
                    revoked_at = coalesce(api_keys.revoked_at, EXCLUDED.revoked_at)
                """,
                record.key_id,
                record.client_id,
                bytes(record.secret_hash),
                sorted(str(scope) for scope in record.scopes),
                record.created_at,
                record.expires_at,
                record.revoked_at,
            )

    async def revoke(self, key_id: str, at: dt.datetime) -> bool:
        """Mark the key revoked (the first revocation's time stays); False when there is no such key."""
        with translate_errors("keys.revoke"):
            found = await self._pool.fetchval(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2) WHERE key_id = $1 RETURNING true",
                key_id,
                at,
            )
        return found is not None

    async def list(self, client_id: str | None = None) -> Sequence[ApiKeyRecord]:
        with translate_errors("keys.list"):
            rows = await self._pool.fetch(
                _SELECT_KEYS + " WHERE $1::text IS NULL OR client_id = $1 ORDER BY created_at, key_id",
                client_id,
            )
        return [_key(row) for row in rows]
