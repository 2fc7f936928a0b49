"""Which process answers which route (DESIGN §1 Roles): ROLE=all answers every route itself; a gateway
answers the routes it owns and forwards the others; a backend answers only its own (other paths are 404)
and admits only the gateway's signed internal credential.

- gateway: authentication, rate limits (the request bucket), keys and clients, routing; `/auth/token`,
  `/admin/clients`, `/admin/keys`.
- calculation: quotes (single, batch, read-back) and their audit trail; the positions bucket (the batch's
  row count is known where its body is decoded), and the request bucket when the gateway authenticates no
  one (ENABLE_AUTHENTICATION=false: the request names its client).
- data: rates and market data (stocks, availability, volatility, events, the VIX and earnings files).
Every role keeps the open routes (`/health`, `/health/detailed`, `/metrics`, `/openapi.json`, `/docs`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pricer.auth.internal import InternalCredentials
from pricer.endpoints.health import DependencyCheck
from pricer.routing import ApiRoute
from pricer.settings import Role, Settings

# The runbook's names of the roles (Kubernetes `app` labels, the trace's service.name).
SERVICE_NAMES = {
    Role.ALL: "api-gateway",
    Role.GATEWAY: "api-gateway",
    Role.CALCULATION: "calculation-service",
    Role.DATA: "data-service",
}
CALCULATION_PATHS = frozenset(
    {"/api/v1/calculate-locate", "/api/v1/calculate-locate/batch", "/api/v1/quotes/{quote_id}"}
)
DATA_PATHS = frozenset(
    {
        "/api/v1/rates/{ticker}",
        "/api/v1/rates",
        "/api/v1/admin/stocks/{ticker}",
        "/api/v1/admin/availability",
        "/api/v1/admin/vix-history",
        "/api/v1/admin/earnings-calendar",
        "/api/v1/admin/volatility",
        "/api/v1/admin/events/{ticker}",
    }
)
# Routes whose GET prices and records a quote: the gateway never sends such a GET twice (a retry after a
# broken answer the service may have priced would record the quote twice).
PRICED_BY_READ_PATHS = frozenset({"/api/v1/calculate-locate"})
# Calls that may carry a large body (MAX_BATCH_BODY_BYTES) get BACKEND_BATCH_TIMEOUT_SECONDS.
BATCH_PATHS = frozenset(
    {
        "/api/v1/calculate-locate/batch",
        "/api/v1/admin/availability",
        "/api/v1/admin/vix-history",
        "/api/v1/admin/earnings-calendar",
    }
)
# Routes a backend answers however it is configured; the gateway's own (rate limits, keys) show elsewhere.
GATEWAY_ONLY_CHECKS = frozenset({"market_data", "audit"})

Step = Callable[[], Awaitable[None]]


def owner(route: ApiRoute) -> Role:
    """The role that answers a route (ALL: every role answers it, an open route)."""
    if route.required_scopes is None:
        return Role.ALL
    if route.path in CALCULATION_PATHS:
        return Role.CALCULATION
    if route.path in DATA_PATHS:
        return Role.DATA
    return Role.GATEWAY


@dataclass
class RoleWiring:
    """What a role changes in the engine `create_app` builds for ROLE=all."""

    role: Role
    internal: InternalCredentials | None = None  # a backend: the credential it admits
    forward: Callable[[ApiRoute], ApiRoute] | None = None  # a gateway: the forwarding route of a route
    checks: dict[str, DependencyCheck] = field(default_factory=dict)
    startup: list[Step] = field(default_factory=list)
    shutdown: list[Step] = field(default_factory=list)

    def routes(self, routes: list[ApiRoute]) -> list[ApiRoute]:
        if self.role is Role.ALL:
            return routes
        if self.role is Role.GATEWAY:
            assert self.forward is not None
            return [
                route if owner(route) in (Role.ALL, Role.GATEWAY) else self.forward(route) for route in routes
            ]
        return [route for route in routes if owner(route) in (Role.ALL, self.role)]

    def health_checks(self, checks: dict[str, DependencyCheck]) -> dict[str, DependencyCheck]:
        if self.role is Role.GATEWAY:
            # The gateway prices nothing and holds no market data: those are its services' dependencies.
            checks = {name: check for name, check in checks.items() if name not in GATEWAY_ONLY_CHECKS}
        return {**checks, **self.checks}


def internal_credentials(settings: Settings) -> InternalCredentials:
    assert settings.internal_service_secret is not None  # settings refuse a split role without it
    return InternalCredentials(settings.internal_service_secret)


def backend_wiring(settings: Settings) -> RoleWiring:
    """ROLE=all (nothing changes) or a backend service (its routes, the internal credential)."""
    if settings.role is Role.ALL:
        return RoleWiring(Role.ALL)
    return RoleWiring(settings.role, internal=internal_credentials(settings))


def copy_route(route: ApiRoute, handler: Callable[..., Awaitable[object]]) -> ApiRoute:
    """The same route (path, methods, scopes, limits, documentation) answered by another handler."""
    return ApiRoute(
        route.path,
        handler,  # type: ignore[arg-type]
        methods=sorted(route.methods or ()),
        scope=route.required_scopes,
        body_limit=route.body_limit,
        name=route.name,
        summary=route.summary,
        request_body=route.request_body,
        request_media=route.request_media,
        query=route.query,
        responses=route.responses,
    )
