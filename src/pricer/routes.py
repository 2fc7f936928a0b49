"""The route table: every path, the endpoint that answers it, the scopes that admit a request (None: an
open route), its body limit and what the OpenAPI document says of it."""

from __future__ import annotations

from importlib.resources import files

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from pricer.endpoints.admin import AdminEndpoints
from pricer.endpoints.auth import AuthEndpoints
from pricer.endpoints.common import json_response
from pricer.endpoints.health import HealthEndpoints
from pricer.endpoints.quotes import QuoteEndpoints
from pricer.endpoints.rates import RateEndpoints
from pricer.models import Scope as AuthScope
from pricer.observability.metrics import Metrics
from pricer.openapi import build_openapi
from pricer.routing import ApiRoute
from pricer.schemas import (
    AvailabilityUploadResponse,
    BatchQuery,
    BatchRequest,
    BatchResponse,
    ClientBody,
    ClientView,
    ColumnarBatchRequest,
    ColumnarBatchResponse,
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
)
from pricer.settings import Settings

QUOTE_SCOPES = frozenset({AuthScope.QUOTE, AuthScope.AUDIT})
ANY_SCOPE = frozenset(AuthScope)


def api_routes(
    settings: Settings,
    *,
    health: HealthEndpoints,
    quoting: QuoteEndpoints,
    rates: RateEndpoints,
    admin: AdminEndpoints,
    auth_endpoints: AuthEndpoints,
    metrics: Metrics,
) -> list[ApiRoute]:
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
            request_body=(BatchRequest, ColumnarBatchRequest),
            request_media=("application/json", "application/msgpack"),
            query=BatchQuery,
            responses={200: (BatchResponse, ColumnarBatchResponse)},
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

    return routes
