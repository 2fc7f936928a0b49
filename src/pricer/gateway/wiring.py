"""The gateway's parts, built from the settings: one client and one circuit breaker per service, the
forwarding routes and the services' health checks."""

from __future__ import annotations

import logging

from pricer.endpoints.health import DependencyCheck
from pricer.gateway.forward import Forwarder
from pricer.gateway.health import PROBE_TIMEOUT_SECONDS, service_check
from pricer.gateway.service import CALCULATION_SERVICE, DATA_SERVICE, ServiceClient
from pricer.logs import fields
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing
from pricer.outbound.breaker import BreakerState, CircuitBreaker
from pricer.outbound.http import HttpClient
from pricer.roles import (
    BATCH_PATHS,
    CALCULATION_PATHS,
    PRICED_BY_READ_PATHS,
    RoleWiring,
    copy_route,
    internal_credentials,
)
from pricer.routing import ApiRoute
from pricer.settings import Role, Settings

log = logging.getLogger("pricer.gateway")

# A batch of 10^6 positions answers with a few hundred MB of JSON; market data answers are small.
_MAX_RESPONSE_BYTES = {CALCULATION_SERVICE: 4 << 30, DATA_SERVICE: 64 << 20}


def _breaker_changed(name: str, state: BreakerState) -> None:
    # The providers' breakers log the same line (marketdata.providers): one message for operators to grep.
    log.warning("Circuit breaker state changed", extra=fields(name=name, state=state.name.lower()))


def gateway_wiring(settings: Settings, *, metrics: Metrics, tracing: Tracing) -> RoleWiring:
    assert settings.calculation_service_url is not None
    assert settings.data_service_url is not None
    credentials = internal_credentials(settings)
    services: dict[str, ServiceClient] = {}
    for name, url in (
        (CALCULATION_SERVICE, settings.calculation_service_url),
        (DATA_SERVICE, settings.data_service_url),
    ):
        breaker = CircuitBreaker(
            name,
            failures_to_open=settings.backend_breaker_failures,
            open_seconds=settings.backend_breaker_open_seconds,
            on_change=_breaker_changed,
        )
        http = HttpClient(
            url,
            max_connections=settings.backend_max_connections,
            max_response_bytes=_MAX_RESPONSE_BYTES[name],
        )
        services[name] = ServiceClient(name, http, breaker, metrics)
    forwarders = {
        name: Forwarder(service, credentials, tracing, metrics) for name, service in services.items()
    }

    def forward(route: ApiRoute) -> ApiRoute:
        name = CALCULATION_SERVICE if route.path in CALCULATION_PATHS else DATA_SERVICE
        timeout = (
            settings.backend_batch_timeout_seconds
            if route.path in BATCH_PATHS
            else settings.backend_timeout_seconds
        )
        handler = forwarders[name].handler(timeout, reads_repeatable=route.path not in PRICED_BY_READ_PATHS)
        return copy_route(route, handler)

    breakers = [service.breaker for service in services.values()]
    # circuit_breaker_state{name="calculation-service"|"data-service"}, beside the providers' breakers.
    metrics.gauge_readers["circuit_breaker_state"].append(
        lambda: {breaker.name: float(breaker.state) for breaker in breakers}
    )
    wiring = RoleWiring(Role.GATEWAY, forward=forward)
    for name, service in services.items():
        wiring.checks[name] = DependencyCheck(
            service_check(service), timeout_seconds=PROBE_TIMEOUT_SECONDS + 0.5
        )
        wiring.shutdown.append(service.http.aclose)
    return wiring
