"""The backends chosen by configuration (DESIGN §1): in-memory, or PostgreSQL and Redis.

With `DATABASE_URL` the stores are PostgreSQL (keys and clients behind in-process caches, the audit
trail behind a background writer with a spool); with `REDIS_URL` the rate limits are shared through Redis
and invalidation messages travel on Redis pub/sub. Any mix works.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from pricer.audit import AuditTrail, Spool
from pricer.endpoints.health import DependencyCheck, limiter_check, memory_check
from pricer.invalidation import InvalidationBus, LocalBus, RedisBus
from pricer.ratelimit.buckets import RateLimiter
from pricer.ratelimit.memory import MemoryLimiter
from pricer.ratelimit.redis import RedisLimiter
from pricer.schemas import DependencyHealth
from pricer.settings import Settings
from pricer.stores.cached import CachedClientStore, CachedKeyStore
from pricer.stores.memory import MemorySourceStore, memory_stores
from pricer.stores.pool import DeferredPool
from pricer.stores.protocols import SourceStore, Stores

Step = Callable[[], Awaitable[None]]


@dataclass
class Backends:
    stores: Stores
    bus: InvalidationBus
    limiter: RateLimiter | None
    redis: aioredis.Redis | None
    audit: AuditTrail | None = None
    pool: DeferredPool | None = None
    startup: list[Step] = field(default_factory=list)
    shutdown: list[Step] = field(default_factory=list)
    checks: dict[str, DependencyCheck] = field(default_factory=dict)
    sources: SourceStore = field(default_factory=MemorySourceStore)  # the live providers' answers (§3.1)


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=0.25, socket_timeout=1.0, health_check_interval=0
    )


def build_limiter(settings: Settings, client: aioredis.Redis | None = None) -> RateLimiter:
    """Redis token buckets with REDIS_URL, else in-process ones."""
    if settings.redis_url is None:
        return MemoryLimiter()
    return RedisLimiter(
        client or redis_client(settings.redis_url),
        expected_replicas=settings.expected_replicas,
        workers=settings.workers,  # every worker decides locally on its own: each gets its part of the share
    )


def build_backends(settings: Settings, stores: Stores | None = None) -> Backends:
    client = redis_client(settings.redis_url) if settings.redis_url is not None else None
    bus: InvalidationBus = RedisBus(client) if client is not None else LocalBus()
    limiter = build_limiter(settings, client) if settings.enable_rate_limiting else None
    backends = Backends(
        redis=client,
        stores=stores or memory_stores(max_quote_rows=settings.memory_quotes_max_rows),
        bus=bus,
        limiter=limiter,
    )
    backends.checks["database"] = DependencyCheck(memory_check("memory"))
    backends.checks["audit"] = DependencyCheck(memory_check("memory"))
    if stores is None and settings.database_url is not None:
        _use_postgres(backends, settings)
    if client is not None:
        backends.startup.append(bus.start)
    if isinstance(limiter, RedisLimiter):
        backends.startup.append(limiter.warm_up)
        backends.checks["redis"] = DependencyCheck(limiter_check(limiter))
    else:
        backends.checks["redis"] = DependencyCheck(
            _redis_ping_check(client) if client is not None else memory_check("memory")
        )
    # Shutdown runs in reverse order: the bus stops listening before the Redis client closes.
    if limiter is not None:
        backends.shutdown.insert(0, limiter.close)
    elif client is not None:
        backends.shutdown.insert(0, client.aclose)
    if client is not None:
        backends.shutdown.append(bus.close)
    return backends


def _use_postgres(backends: Backends, settings: Settings) -> None:
    from pricer.stores.migrate import migrate
    from pricer.stores.postgres.assembly import postgres_stores
    from pricer.stores.postgres.sources import PgSourceStore

    assert settings.database_url is not None
    pool = DeferredPool(
        settings.database_url, schema=settings.database_schema, max_size=settings.database_pool_size
    )
    pg = postgres_stores(pool)
    spool_dir = Path(settings.audit_spool_dir or Path(tempfile.gettempdir()) / "pricer-audit-spool")
    # One spool directory per process under spool_dir (its own, locked): workers and replicas sharing the
    # directory never write into each other's files, and adopt the ones of processes that died.
    audit = AuditTrail(
        pg.quotes,  # type: ignore[arg-type]  # PgQuoteStore.write
        spool=Spool(spool_dir),
        durability=settings.audit_durability,
    )
    bus = backends.bus
    cache_ttl, cache_stale = settings.key_cache_ttl_seconds, settings.key_cache_stale_seconds
    backends.stores = Stores(
        clients=CachedClientStore(pg.clients, bus, ttl=cache_ttl, stale=cache_stale),
        stocks=pg.stocks,
        availability=pg.availability,
        volatility=pg.volatility,
        events=pg.events,
        keys=CachedKeyStore(pg.keys, bus, ttl=cache_ttl, stale=cache_stale),
        quotes=audit,
    )
    backends.pool = pool
    backends.audit = audit
    backends.sources = PgSourceStore(pool)

    def on_market_change(topic: str, _key: str) -> None:
        if topic in ("market", "*"):
            for store in (pg.availability, pg.volatility):
                invalidate = getattr(store, "invalidate", None)
                if invalidate is not None:
                    invalidate()

    bus.subscribe(on_market_change)

    async def open_database() -> None:
        if settings.migrate_on_start:
            await migrate(settings.database_url or "", schema=settings.database_schema)
        await pool.open()

    async def start_audit() -> None:
        audit.start()

    backends.startup += [open_database, start_audit]
    # Shutdown runs in reverse: the audit trail drains to the database before the pool closes.
    backends.shutdown += [pool.close, audit.close]
    backends.checks["database"] = DependencyCheck(_database_check(pool), critical=True)
    backends.checks["audit"] = DependencyCheck(_audit_check(audit))


def _database_check(pool: DeferredPool) -> Callable[[], Awaitable[DependencyHealth]]:
    async def check() -> DependencyHealth:
        started = time.perf_counter()
        await pool.fetchval("SELECT 1")
        return DependencyHealth(
            status="healthy",
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            detail={"backend": "postgresql", "pool_size": pool.get_size(), "pool_idle": pool.get_idle_size()},
        )

    return check


def _audit_check(audit: AuditTrail) -> Callable[[], Awaitable[DependencyHealth]]:
    async def check() -> DependencyHealth:
        degraded = audit.spool_pending or not audit.database_up
        return DependencyHealth(
            status="degraded" if degraded else "healthy",
            latency_ms=0.0,
            detail={
                "queue_depth": audit.queue_depth,
                "spool_pending": audit.spool_pending,
                "written_rows": audit.written_rows,
                "spooled_rows": audit.spooled_rows,
                "durability": audit.durability.value,
                "dead_lettered_rows": audit.dead_lettered_rows,
                "unreadable_bytes": audit.unreadable_bytes,
                "adopted_spools": audit.adopted_spools,
            },
        )

    return check


def _redis_ping_check(client: aioredis.Redis) -> Callable[[], Awaitable[DependencyHealth]]:
    async def check() -> DependencyHealth:
        started = time.perf_counter()
        await client.ping()
        return DependencyHealth(
            status="healthy",
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            detail={"backend": "redis"},
        )

    return check
