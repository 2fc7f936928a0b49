"""What the gateway's `/health/detailed` says of a backend service: its `/health` probed (latency_ms), and
the state of its circuit breaker. While the breaker is not closed the service is degraded (the gateway
answers 503 at once for it, or lets a probe through) and is not probed: a service being let recover is
not hammered by health checks. Nothing names a host or a secret."""

from __future__ import annotations

import time

from pricer.endpoints.health import Check, failure
from pricer.gateway.service import ServiceClient
from pricer.schemas import DependencyHealth

PROBE_TIMEOUT_SECONDS = 0.5


def service_check(service: ServiceClient) -> Check:
    async def check() -> DependencyHealth:
        circuit = service.circuit
        if circuit != "closed":
            return DependencyHealth(
                status="degraded",
                latency_ms=0.0,
                detail={"circuit": circuit, "retry_after_seconds": round(service.breaker.retry_after(), 3)},
                reason=f"circuit breaker {circuit.replace('_', '-')}: calls are refused or probing",
            )
        started = time.perf_counter()
        try:
            answer = await service.http.request("GET", "/health", timeout=PROBE_TIMEOUT_SECONDS)
        except Exception as error:
            return DependencyHealth(
                status="unhealthy",
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
                detail={"circuit": circuit, "error": failure(error)},
            )
        latency = round((time.perf_counter() - started) * 1000, 3)
        return DependencyHealth(
            status="healthy" if answer.status == 200 else "unhealthy",
            latency_ms=latency,
            detail={"circuit": circuit, "status_code": answer.status},
        )

    return check
