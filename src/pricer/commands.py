"""The CLI's database commands: migrations, keys, market-data loads and the demo seed.

They talk to PostgreSQL directly (DATABASE_URL); a market-data load also tells every running replica to
drop its cached rates (Redis pub/sub, with REDIS_URL).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from pricer.auth.keys import KeyHasher, KeyVerifier, make_record, new_key, parse_key
from pricer.errors import InvalidParameter, PricerError, Unauthorized
from pricer.invalidation import InvalidationBus, LocalBus, RedisBus
from pricer.marketdata.loaders import parse_availability, parse_earnings, parse_vix_history
from pricer.marketdata.service import MarketDataWriter
from pricer.models import Scope
from pricer.schemas import (
    AvailabilityUploadResponse,
    ClientBody,
    LoadResult,
    earnings_load_result,
    utc_text,
    vix_load_result,
)
from pricer.settings import Settings
from pricer.stores.cached import CLIENT_TOPIC, KEY_TOPIC
from pricer.stores.protocols import Stores


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def with_database(settings: Settings, work: Callable[[Stores, InvalidationBus], Awaitable[int]]) -> int:
    from pricer.backends import redis_client
    from pricer.stores.postgres.assembly import connect_stores

    assert settings.database_url is not None
    stores, pool = await connect_stores(
        settings.database_url, schema=settings.database_schema, min_size=1, max_size=2
    )
    client = redis_client(settings.redis_url) if settings.redis_url else None
    bus: InvalidationBus = RedisBus(client) if client is not None else LocalBus()
    try:
        return await work(stores, bus)
    finally:
        await pool.close()
        if client is not None:
            await client.aclose()


async def migrate_command(settings: Settings) -> int:
    from pricer.stores.migrate import migrate

    assert settings.database_url is not None
    applied = await migrate(settings.database_url, schema=settings.database_schema)
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


async def check_database(settings: Settings) -> int:
    """The runbook's connectivity check: prints 'Connection successful' or the reason (never the DSN)."""

    async def work(stores: Stores, _bus: InvalidationBus) -> int:
        await stores.clients.get("connectivity-check")
        print("Connection successful")
        return 0

    try:
        return await with_database(settings, work)
    except PricerError as error:
        print(f"Connection failed: {error.message}", file=sys.stderr)
        return 1


async def put_client(settings: Settings, client_id: str, options: dict[str, Any]) -> int:
    """Create or change a client, checked as the admin endpoint's ClientBody is; the options not given keep
    the stored client's values (a new client needs --markup, --fee-type and --fee). Prints its ClientView."""
    from pricer.endpoints.admin import client_from_body, client_view

    async def work(stores: Stores, bus: InvalidationBus) -> int:
        stored = await stores.clients.get(client_id)
        fields: dict[str, Any] = {}
        if stored is not None:
            fields = {
                "markup_percentage": stored.markup_percentage,
                "transaction_fee_type": str(stored.transaction_fee_type),
                "transaction_amount": stored.transaction_amount,
                "day_count": stored.day_count,
                "active": stored.active,
                "rate_limit_per_minute": stored.rate_limit_per_minute,
                "burst": stored.burst,
            }
        fields.update({name: value for name, value in options.items() if value is not None})
        try:
            body = msgspec.convert(fields, ClientBody)
        except msgspec.ValidationError as error:
            print(f"pricer: invalid client: {_option_names(str(error))}", file=sys.stderr)
            return 2
        try:
            client = client_from_body(client_id, body, _utc_now())
        except InvalidParameter as error:
            print(f"pricer: invalid client: {_option_names(error.message)}", file=sys.stderr)
            return 2
        created = await stores.clients.put(client)
        await bus.publish(CLIENT_TOPIC, client_id)  # every replica drops its cached copy
        view = client_view(
            client, default_rate=settings.rate_limit_per_minute, default_burst=settings.effective_burst
        )
        print(("created " if created else "updated ") + client_id)
        print(json.dumps(json.loads(msgspec.json.encode(view)), indent=2))
        return 0

    return await with_database(settings, work)


# The CLI's option for each ClientBody field, so that an error names what the operator typed.
CLIENT_OPTIONS = {
    "markup_percentage": "--markup",
    "transaction_fee_type": "--fee-type",
    "transaction_amount": "--fee",
    "day_count": "--day-count",
    "rate_limit_per_minute": "--per-minute",
    "burst": "--burst",
}


def _option_names(message: str) -> str:
    for field, option in CLIENT_OPTIONS.items():
        message = message.replace(f"`$.{field}`", option).replace(field, option)
    return message


async def list_clients(settings: Settings) -> int:
    async def work(stores: Stores, _bus: InvalidationBus) -> int:
        print(
            f"{'client_id':<22}{'markup':>10}  {'fee_type':<11}{'fee':>14}{'days':>6}{'per_min':>10}"
            f"{'burst':>8}  state"
        )
        for client in await stores.clients.list():
            print(
                f"{client.client_id:<22}{client.markup_percentage:>10}  {client.transaction_fee_type!s:<11}"
                f"{client.transaction_amount:>14}{client.day_count:>6}"
                f"{client.rate_limit_per_minute or settings.rate_limit_per_minute:>10}"
                f"{client.burst or settings.effective_burst:>8}  {'active' if client.active else 'inactive'}"
            )
        return 0

    return await with_database(settings, work)


async def create_key(settings: Settings, client_id: str, scopes: list[Scope], expires_in_days: int) -> int:
    async def work(stores: Stores, _bus: InvalidationBus) -> int:
        if await stores.clients.get(client_id) is None:
            print(
                f"pricer: unknown client {client_id!r}: create it first (pricer clients put {client_id} ...)",
                file=sys.stderr,
            )
            return 1
        now = _utc_now()
        key_id, key = new_key()
        record = make_record(
            KeyHasher(settings.api_key_pepper),
            key,
            client_id=client_id,
            scopes=scopes,
            now=now,
            expires_at=now + dt.timedelta(days=expires_in_days),
        )
        await stores.keys.put(record)
        print(
            f"key_id:     {key_id}\nclient_id:  {client_id}\nscopes:     {','.join(sorted(scopes))}\n"
            f"expires_at: {utc_text(record.expires_at)}\napi_key:    {key}\n"
            "(the api_key is shown only now; only its HMAC is stored)"
        )
        return 0

    return await with_database(settings, work)


async def list_keys(settings: Settings, client_id: str | None) -> int:
    async def work(stores: Stores, _bus: InvalidationBus) -> int:
        records = sorted(await stores.keys.list(client_id), key=lambda record: record.created_at)
        now = _utc_now()
        print(f"{'key_id':<18}{'client_id':<22}{'scopes':<24}{'expires_at':<27}state")
        for record in records:
            state = "revoked" if record.revoked_at else ("expired" if record.expires_at <= now else "active")
            print(
                f"{record.key_id:<18}{record.client_id:<22}{','.join(sorted(record.scopes)):<24}"
                f"{utc_text(record.expires_at.replace(microsecond=0)):<27}{state}"
            )
        return 0

    return await with_database(settings, work)


async def show_key(settings: Settings, key_or_id: str) -> int:
    """The runbook's "check API key in database": a full key is also verified against its stored hash."""

    async def work(stores: Stores, _bus: InvalidationBus) -> int:
        parsed = parse_key(key_or_id)
        key_id = parsed[0] if parsed else key_or_id
        record = await stores.keys.get(key_id)
        if record is None:
            print(f"no key with id {key_id!r}")
            return 1
        now = _utc_now()
        verdict = "not checked (give the whole key to verify it)"
        if parsed is not None:
            try:
                await KeyVerifier(stores.keys, KeyHasher(settings.api_key_pepper)).verify(key_or_id, now)
                verdict = "valid"
            except Unauthorized as error:
                verdict = f"refused ({error.reason})"
        print(
            f"key_id:     {record.key_id}\nclient_id:  {record.client_id}\n"
            f"scopes:     {','.join(sorted(record.scopes))}\ncreated_at: {utc_text(record.created_at)}\n"
            f"expires_at: {utc_text(record.expires_at)}\n"
            f"revoked_at: {utc_text(record.revoked_at) if record.revoked_at else '-'}\n"
            f"secret:     {verdict}"
        )
        return 0

    return await with_database(settings, work)


async def revoke_key(settings: Settings, key_id: str) -> int:
    async def work(stores: Stores, bus: InvalidationBus) -> int:
        if not await stores.keys.revoke(key_id, _utc_now()):
            print(f"no key with id {key_id!r}", file=sys.stderr)
            return 1
        await bus.publish(KEY_TOPIC, key_id)
        print(f"revoked {key_id}")
        return 0

    return await with_database(settings, work)


async def load_into_database(settings: Settings, kind: str, content: bytes) -> int:
    async def work(stores: Stores, bus: InvalidationBus) -> int:
        shared = None
        if settings.redis_url is not None:
            from pricer.backends import redis_client
            from pricer.marketdata.service import MARKET_TOPIC
            from pricer.marketdata.shared_cache import SharedRateCache

            # The replicas' shared rate cache moves to a new version with this write.
            shared = SharedRateCache(
                redis_client(settings.redis_url),
                bus,
                ttl_seconds=settings.rate_cache_ttl_seconds,
                market_topic=MARKET_TOPIC,
            )
        writer = MarketDataWriter(stores, bus, shared)
        # The same response structs as the admin endpoints, so `pricer load` prints the same JSON either way.
        result: AvailabilityUploadResponse | LoadResult
        if kind == "ibkr":
            snapshot = parse_availability(content, loaded_at=_utc_now())
            in_force = await writer.add_availability(snapshot)
            result = AvailabilityUploadResponse(
                rows=len(snapshot.entries), as_of=snapshot.as_of, in_force=in_force
            )
        elif kind == "vix":
            history = parse_vix_history(content)
            await writer.add_volatility(history.reading)
            result = vix_load_result(history.reading.value, history.reading.as_of, history.rows)
        else:
            calendar = parse_earnings(content)
            await writer.replace_events_many(calendar.events)
            result = earnings_load_result(calendar.rows, len(calendar.events), len(calendar.skipped))
        print(json.dumps(json.loads(msgspec.json.encode(result)), indent=2))
        return 0

    try:
        return await with_database(settings, work)
    except PricerError as error:
        print(f"pricer: {kind} file rejected: {error.message}", file=sys.stderr)
        return 1


async def seed_demo_command(settings: Settings) -> int:
    from pricer.demo import announce_demo_keys, seed_demo

    async def work(stores: Stores, _bus: InvalidationBus) -> int:
        keys = await seed_demo(stores, KeyHasher(settings.api_key_pepper), _utc_now())
        announce_demo_keys(keys, settings.demo_keys_file, f"http://{settings.host}:{settings.port}")
        return 0

    return await with_database(settings, work)
