"""`create_app(settings)`: the engine as one ASGI app.

A request flows (DESIGN §1): the request edge (request id, CORS, route match with 404/405, body limit,
the error envelope, metrics and the request span) -> admission (authentication, the request bucket,
authorization) -> endpoint -> market data -> pricing core -> response.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry.sdk.trace import SpanProcessor
from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.auth.admission import Admission
from pricer.auth.keys import KeyHasher, KeyVerifier, make_record, parse_key
from pricer.auth.tokens import TokenService
from pricer.backends import Backends, build_backends
from pricer.batch_pool import BatchPool
from pricer.demo import ADMIN_CLIENT_ID, DemoKeys, seed_demo
from pricer.endpoints.admin import AdminEndpoints
from pricer.endpoints.auth import AuthEndpoints
from pricer.endpoints.common import utc_now
from pricer.endpoints.health import DependencyCheck, HealthEndpoints, market_data_check
from pricer.endpoints.quotes import QuoteEndpoints
from pricer.endpoints.rates import RateEndpoints
from pricer.gateway.wiring import gateway_wiring
from pricer.marketdata.providers.assembly import build_live_sources, lender_book
from pricer.marketdata.service import MARKET_TOPIC, MarketData, MarketDataWriter
from pricer.marketdata.shared_cache import SharedRateCache
from pricer.middleware.admission import Admit
from pricer.middleware.cors import CorsPolicy
from pricer.middleware.edge import RequestEdge
from pricer.models import Client, FeeType
from pricer.models import Scope as AuthScope
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing, build_tracing
from pricer.pricing.core import RatePolicy
from pricer.ratelimit.limits import ClientLimits
from pricer.roles import SERVICE_NAMES, backend_wiring
from pricer.routes import api_routes
from pricer.routing import ApiRoute, RouteTable
from pricer.schemas import utc_text
from pricer.settings import Role, Settings, SettingsError, development_defaults_in_use
from pricer.stores.protocols import Stores

log = logging.getLogger("pricer.app")


@dataclass
class Lifecycle:
    """What happens at start-up and shutdown, and the state operators see (draining)."""

    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    draining: bool = False


class PricerApp:
    """The ASGI application: lifespan events here, HTTP through the middleware chain."""

    def __init__(self, chain: ASGIApp, lifecycle: Lifecycle, stores: Stores, routes: list[ApiRoute]) -> None:
        self._chain = chain
        self.lifecycle = lifecycle
        self.stores = stores
        self.routes = routes
        self.demo_keys: DemoKeys | None = None
        self.metrics: Metrics | None = None
        self.backends: Backends | None = None
        self.tracing: Tracing | None = None
        self.batch_pool: BatchPool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._chain(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for step in self.lifecycle.startup:
                        await step()
                except Exception as error:
                    log.exception("Start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for step in reversed(self.lifecycle.shutdown):
                    try:
                        await step()
                    except Exception:
                        log.exception("Shutdown step failed")
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(
    settings: Settings,
    *,
    stores: Stores | None = None,
    on_demo_keys: Callable[[DemoKeys], None] | None = None,
    span_processor: SpanProcessor | None = None,
    metrics_dir: str | None = None,
) -> PricerApp:
    """Build the engine. `stores` overrides the configured stores (tests of logic use memory ones);
    `metrics_dir` is where the workers of one server publish their metrics (WORKERS > 1)."""
    backends = build_backends(settings, stores)
    stores = backends.stores
    for name in development_defaults_in_use(settings):
        log.warning("Development default in use", extra={"logfmt_fields": {"variable": name}})

    metrics = Metrics(enabled=settings.enable_metrics, shared_dir=metrics_dir)
    tracing = build_tracing(span_processor, service_name=SERVICE_NAMES[settings.role])
    # What the role (DESIGN §1 Roles) changes: which routes are answered here or forwarded, who is admitted.
    wiring = (
        gateway_wiring(settings, metrics=metrics, tracing=tracing)
        if settings.role is Role.GATEWAY
        else backend_wiring(settings)
    )
    policy = RatePolicy(
        volatility_factor=settings.volatility_factor,
        volatility_threshold=settings.volatility_threshold,
        event_risk_factor=settings.event_risk_factor,
        min_borrow_rate=settings.min_borrow_rate,
        max_borrow_rate=settings.max_borrow_rate,
    )
    shared_rates = (
        SharedRateCache(
            backends.redis,
            backends.bus,
            ttl_seconds=settings.rate_cache_ttl_seconds,
            market_topic=MARKET_TOPIC,
        )
        if backends.redis is not None and settings.rate_cache_ttl_seconds > 0
        else None
    )
    market = MarketData(
        stores,
        policy=policy,
        default_volatility_index=settings.default_volatility_index,
        event_window_days=settings.event_window_days,
        cache_ttl_seconds=settings.rate_cache_ttl_seconds,
        cache_stale_seconds=settings.rate_cache_stale_seconds,
        metrics=metrics,
        shared_cache=shared_rates,
        hears_changes=lambda: backends.bus.connected,
        lender_book=lender_book(settings),
    )
    backends.bus.subscribe(lambda topic, _key: market.invalidate() if topic in (MARKET_TOPIC, "*") else None)
    writer = MarketDataWriter(stores, backends.bus, shared_rates)
    # Live market data over HTTP (DESIGN §3.1): None unless a provider's URL is set.
    live = build_live_sources(
        settings,
        stores=stores,
        sources=backends.sources,
        writer=writer,
        bus=backends.bus,
        book=market.lender_book,
        metrics=metrics,
        invalidate_local=market.invalidate,
    )
    market.live = live
    hasher = KeyHasher(settings.api_key_pepper)
    lifecycle = Lifecycle()

    limiter = backends.limiter
    limits = (
        ClientLimits(
            limiter,
            stores.clients,
            default_per_minute=settings.rate_limit_per_minute,
            default_burst=settings.effective_burst,
            positions_per_minute=settings.positions_limit_per_minute,
            metrics=metrics,
            tracing=tracing,
        )
        if limiter is not None
        else None
    )
    tokens = TokenService(
        stores.keys,
        secret=settings.jwt_secret_key,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_seconds=settings.jwt_ttl_seconds,
    )
    admission = Admission(
        keys=KeyVerifier(stores.keys, hasher),
        tokens=tokens,
        authenticate=settings.enable_authentication,
        limits=limits,
        metrics=metrics,
        tracing=tracing,
        internal=wiring.internal,
    )
    from pricer.quoting import Quoter

    quoter = Quoter(stores, market, metrics=metrics, tracing=tracing)
    pool = BatchPool(settings.batch_workers, inline_max_bytes=settings.batch_inline_max_bytes)
    quoting = QuoteEndpoints(
        quoter,
        stores.quotes,
        admission=admission,
        limits=limits,
        max_batch_size=settings.max_batch_size,
        pool=pool,
    )
    rates = RateEndpoints(market)
    admin = AdminEndpoints(
        stores,
        writer,
        hasher,
        default_rate_limit=settings.rate_limit_per_minute,
        default_burst=settings.effective_burst,
    )
    health = HealthEndpoints(
        wiring.health_checks(
            {
                **backends.checks,
                "market_data": DependencyCheck(
                    market_data_check(market, settings.market_data_stale_after_hours)
                ),
                **(
                    {f"{name}_api": DependencyCheck(live.health_check(name)) for name in live.configured}
                    if live is not None
                    else {}
                ),
            }
        ),
        is_draining=lambda: lifecycle.draining,
    )
    auth_endpoints = AuthEndpoints(tokens, metrics)

    routes = wiring.routes(
        api_routes(
            settings,
            health=health,
            quoting=quoting,
            rates=rates,
            admin=admin,
            auth_endpoints=auth_endpoints,
            metrics=metrics,
        )
    )
    chain: ASGIApp = RequestEdge(
        Admit(admission),
        routes=RouteTable(routes),
        cors=CorsPolicy(settings.cors_origins),
        metrics=metrics,
        tracing=tracing,
        slow_request_ms=settings.slow_request_ms,
    )
    app = PricerApp(chain, lifecycle, stores, routes)
    app.metrics = metrics
    app.backends = backends
    app.tracing = tracing
    lifecycle.shutdown.append(_run_sync(tracing.shutdown))
    lifecycle.shutdown.append(_run_sync(metrics.shutdown))

    async def seed() -> None:
        now = utc_now()
        if settings.seed_demo_data and settings.database_url is None:
            app.demo_keys = await seed_demo(stores, hasher, now)
            if on_demo_keys is not None:
                on_demo_keys(app.demo_keys)
        if settings.bootstrap_admin_key is not None:
            await ensure_bootstrap_admin(stores, hasher, settings.bootstrap_admin_key, now)

    lifecycle.startup += [*backends.startup, seed]
    # Stopped once the server has drained (in-flight batches have answered), before the backends close.
    lifecycle.shutdown.append(pool.stop)
    app.batch_pool = pool
    if shared_rates is not None:
        lifecycle.startup.append(shared_rates.load_version)
    lifecycle.shutdown += backends.shutdown
    if live is not None:
        # Started after the stores and the bus; stopped before them (shutdown runs in reverse).
        lifecycle.startup.append(live.start)
        lifecycle.shutdown.append(live.close)
    lifecycle.startup += wiring.startup
    lifecycle.shutdown[:0] = wiring.shutdown  # runs last: the services' connections outlive every request
    if metrics_dir is not None:
        lifecycle.startup.append(metrics.start_publishing)
        lifecycle.shutdown.insert(0, metrics.stop_publishing)  # runs last: after every request
    return app


async def ensure_bootstrap_admin(stores: Stores, hasher: KeyHasher, key: str, now: dt.datetime) -> None:
    """Make sure an admin key with exactly this value exists, for client `admin` (DESIGN §2.4), unless
    it was revoked: a revoked bootstrap key stays revoked across restarts (a rolling update must not
    reactivate a leaked admin key), with a WARNING naming its id. Set a new BOOTSTRAP_ADMIN_KEY (another
    key id) to get an admin key back."""
    parsed = parse_key(key)
    if parsed is None:
        raise SettingsError("BOOTSTRAP_ADMIN_KEY: expected bre_<8-16 [a-z0-9]>_<32-64 [A-Za-z0-9]>")
    stored = await stores.keys.get(parsed[0])
    if stored is not None and stored.revoked_at is not None:
        log.warning(
            "Bootstrap admin key revoked: not restored",
            extra={"logfmt_fields": {"key_id": stored.key_id, "revoked_at": utc_text(stored.revoked_at)}},
        )
        return
    if await stores.clients.get(ADMIN_CLIENT_ID) is None:
        await stores.clients.put(
            Client(
                client_id=ADMIN_CLIENT_ID,
                markup_percentage=0.0,
                transaction_fee_type=FeeType.FLAT,
                transaction_amount=0.0,
                updated_at=now,
            )
        )
    record = make_record(
        hasher,
        key,
        client_id=ADMIN_CLIENT_ID,
        scopes={AuthScope.ADMIN},
        now=now,
        expires_at=now + dt.timedelta(days=3650),
    )
    await stores.keys.put(record)


def _run_sync(step: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        step()

    return run
