"""`create_app(settings)`: the engine as one ASGI app.

A request flows (DESIGN §1): request context -> error envelope -> route match (404/405) -> body limit
-> authentication -> endpoint -> market data -> pricing core -> response.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.resources import files

from opentelemetry.sdk.trace import SpanProcessor
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.auth.keys import KeyHasher, KeyVerifier, make_record, parse_key
from pricer.auth.tokens import TokenService
from pricer.backends import Backends, build_backends
from pricer.demo import ADMIN_CLIENT_ID, DemoKeys, seed_demo
from pricer.endpoints.admin import AdminEndpoints
from pricer.endpoints.auth import AuthEndpoints
from pricer.endpoints.common import json_response, utc_now
from pricer.endpoints.health import DependencyCheck, HealthEndpoints, market_data_check
from pricer.endpoints.quotes import QuoteEndpoints
from pricer.endpoints.rates import RateEndpoints
from pricer.marketdata.service import MARKET_TOPIC, MarketData, MarketDataWriter
from pricer.marketdata.shared_cache import SharedRateCache
from pricer.middleware.authentication import Authentication
from pricer.middleware.authorization import Authorization
from pricer.middleware.body_limit import BodyLimit
from pricer.middleware.cors import CORS
from pricer.middleware.errors import ErrorEnvelope
from pricer.middleware.rate_limit import ClientLimits, RateLimit
from pricer.middleware.request_context import RequestContext
from pricer.middleware.route_match import Dispatch, RouteMatch
from pricer.middleware.telemetry import RequestTelemetry
from pricer.models import Client, FeeType
from pricer.models import Scope as AuthScope
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing, build_tracing
from pricer.openapi import build_openapi
from pricer.pricing.core import RatePolicy
from pricer.routing import ApiRoute
from pricer.schemas import (
    AvailabilityUploadResponse,
    BatchQuery,
    BatchRequest,
    BatchResponse,
    ClientBody,
    ClientView,
    DetailedHealth,
    EventsBody,
    EventsView,
    Health,
    IssuedKey,
    KeyBody,
    LoadResult,
    QuoteRequest,
    QuoteResponse,
    RateListResponse,
    RateResponse,
    RatesQuery,
    StockBody,
    StockView,
    TokenResponse,
    VolatilityBody,
    VolatilityView,
    utc_text,
)
from pricer.settings import Settings, SettingsError, development_defaults_in_use
from pricer.stores.protocols import Stores

log = logging.getLogger("pricer.app")

QUOTE_SCOPES = frozenset({AuthScope.QUOTE, AuthScope.AUDIT})
ANY_SCOPE = frozenset(AuthScope)


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
    tracing = build_tracing(span_processor)
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
    )
    backends.bus.subscribe(lambda topic, _key: market.invalidate() if topic in (MARKET_TOPIC, "*") else None)
    writer = MarketDataWriter(stores, backends.bus, shared_rates)
    hasher = KeyHasher(settings.api_key_pepper)
    lifecycle = Lifecycle()

    from pricer.quoting import Quoter

    quoter = Quoter(stores, market, metrics=metrics, tracing=tracing)
    quoting = QuoteEndpoints(quoter, stores.quotes, max_batch_size=settings.max_batch_size)
    rates = RateEndpoints(market)
    admin = AdminEndpoints(
        stores,
        writer,
        hasher,
        default_rate_limit=settings.rate_limit_per_minute,
        default_burst=settings.effective_burst,
    )
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
    health = HealthEndpoints(
        {
            **backends.checks,
            "market_data": DependencyCheck(market_data_check(market, settings.market_data_stale_after_hours)),
        },
        is_draining=lambda: lifecycle.draining,
    )
    auth_endpoints = AuthEndpoints(tokens, metrics)

    small = settings.max_body_bytes
    large = settings.max_batch_body_bytes
    text_media = ("text/plain",)
    routes: list[ApiRoute] = [
        ApiRoute(
            "/health",
            health.health,
            methods=["GET"],
            scope=None,
            body_limit=small,
            summary="Liveness",
            responses={200: Health},
        ),
        ApiRoute(
            "/health/detailed",
            health.detailed,
            methods=["GET"],
            scope=None,
            body_limit=small,
            summary="Dependencies and their state",
            responses={200: DetailedHealth},
        ),
        ApiRoute(
            "/api/v1/calculate-locate",
            quoting.calculate_locate,
            methods=["GET", "POST"],
            scope=AuthScope.QUOTE,
            body_limit=small,
            summary="One locate-fee quote",
            request_body=QuoteRequest,
            query=QuoteRequest,
            responses={200: QuoteResponse},
        ),
        ApiRoute(
            "/api/v1/calculate-locate/batch",
            quoting.calculate_batch,
            methods=["POST"],
            scope=AuthScope.QUOTE,
            body_limit=large,
            summary="Many quotes in one call (?atomic=true)",
            request_body=BatchRequest,
            request_media=("application/json", "application/msgpack"),
            query=BatchQuery,
            responses={200: BatchResponse},
        ),
        ApiRoute(
            "/api/v1/auth/token",
            auth_endpoints.token,
            methods=["POST"],
            scope=ANY_SCOPE,
            body_limit=small,
            summary="Exchange an API key (X-API-Key) for a short-lived bearer token",
            responses={200: TokenResponse},
        ),
        ApiRoute(
            "/api/v1/rates/{ticker}",
            rates.rate,
            methods=["GET"],
            scope=AuthScope.RATES,
            body_limit=small,
            summary="Current borrow rate of a ticker",
            responses={200: RateResponse},
        ),
        ApiRoute(
            "/api/v1/rates",
            rates.rates,
            methods=["GET"],
            scope=AuthScope.RATES,
            body_limit=small,
            summary="Rates of up to 1,000 tickers (?tickers=A,B)",
            query=RatesQuery,
            responses={200: RateListResponse},
        ),
        ApiRoute(
            "/api/v1/quotes/{quote_id}",
            quoting.get_quote,
            methods=["GET"],
            scope=QUOTE_SCOPES,
            body_limit=small,
            summary="An audited quote",
            responses={200: QuoteResponse},
        ),
        ApiRoute(
            "/api/v1/admin/clients/{client_id}",
            admin.put_client,
            methods=["PUT"],
            scope=AuthScope.ADMIN,
            body_limit=small,
            summary="Create or replace a client",
            request_body=ClientBody,
            responses={200: ClientView, 201: ClientView},
        ),
        ApiRoute(
            "/api/v1/admin/stocks/{ticker}",
            admin.put_stock,
            methods=["PUT"],
            scope=AuthScope.ADMIN,
            body_limit=small,
            summary="Create or replace a stock",
            request_body=StockBody,
            responses={200: StockView, 201: StockView},
        ),
        ApiRoute(
            "/api/v1/admin/availability",
            admin.upload_availability,
            methods=["POST"],
            scope=AuthScope.ADMIN,
            body_limit=large,
            request_media=text_media,
            summary="Upload an IBKR-format availability file (text/plain body)",
            responses={200: AvailabilityUploadResponse},
        ),
        ApiRoute(
            "/api/v1/admin/vix-history",
            admin.upload_vix,
            methods=["POST"],
            scope=AuthScope.ADMIN,
            body_limit=large,
            request_media=text_media,
            summary="Upload a Cboe VIX history CSV; its last close becomes the volatility index",
            responses={200: LoadResult},
        ),
        ApiRoute(
            "/api/v1/admin/earnings-calendar",
            admin.upload_earnings,
            methods=["POST"],
            scope=AuthScope.ADMIN,
            body_limit=large,
            request_media=text_media,
            summary="Upload an Alpha Vantage earnings calendar CSV (replaces those tickers' events)",
            responses={200: LoadResult},
        ),
        ApiRoute(
            "/api/v1/admin/volatility",
            admin.put_volatility,
            methods=["PUT"],
            scope=AuthScope.ADMIN,
            body_limit=small,
            summary="Set the market volatility index",
            request_body=VolatilityBody,
            responses={200: VolatilityView},
        ),
        ApiRoute(
            "/api/v1/admin/events/{ticker}",
            admin.put_events,
            methods=["PUT"],
            scope=AuthScope.ADMIN,
            body_limit=small,
            summary="Replace a ticker's events",
            request_body=EventsBody,
            responses={200: EventsView},
        ),
        ApiRoute(
            "/api/v1/admin/keys",
            admin.issue_key,
            methods=["POST"],
            scope=AuthScope.ADMIN,
            body_limit=small,
            summary="Issue an API key (the secret is shown once)",
            request_body=KeyBody,
            responses={201: IssuedKey},
        ),
        ApiRoute(
            "/api/v1/admin/keys/{key_id}",
            admin.revoke_key,
            methods=["DELETE"],
            scope=AuthScope.ADMIN,
            body_limit=small,
            summary="Revoke an API key",
            responses={204: None},
        ),
    ]
    openapi_body = json_response(build_openapi(routes)).body
    docs_body = files("pricer.endpoints").joinpath("static/docs.html").read_bytes()

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    async def docs(request: Request) -> Response:
        return Response(docs_body, media_type="text/html")

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes += [
        ApiRoute(
            "/openapi.json", openapi, methods=["GET"], scope=None, body_limit=small, summary="This document"
        ),
        ApiRoute(
            "/metrics",
            prometheus,
            methods=["GET"],
            scope=None,
            body_limit=small,
            summary="Prometheus exposition",
        ),
        ApiRoute(
            "/docs", docs, methods=["GET"], scope=None, body_limit=small, summary="API documentation page"
        ),
    ]

    chain: ASGIApp = Dispatch()
    chain = Authorization(chain)
    chain = RateLimit(chain, limits=limits)
    chain = Authentication(
        chain,
        keys=KeyVerifier(stores.keys, hasher),
        tokens=tokens,
        enabled=settings.enable_authentication,
        metrics=metrics,
        tracing=tracing,
    )
    chain = BodyLimit(chain)
    chain = RouteMatch(chain, routes)
    chain = ErrorEnvelope(chain)
    chain = CORS(chain, origins=settings.cors_origins)
    chain = RequestTelemetry(
        chain, metrics=metrics, tracing=tracing, slow_request_ms=settings.slow_request_ms
    )
    chain = RequestContext(chain)
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
    if shared_rates is not None:
        lifecycle.startup.append(shared_rates.load_version)
    lifecycle.shutdown += backends.shutdown
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
