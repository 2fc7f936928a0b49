"""Liveness (`/health`) and the dependencies' state (`/health/detailed`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response

from pricer import __version__
from pricer.endpoints.common import json_response
from pricer.schemas import DependencyHealth, DetailedHealth, Health

DependencyCheck = Callable[[], Awaitable[DependencyHealth]]

_RANK = {"healthy": 0, "degraded": 1, "unhealthy": 2}


class HealthEndpoints:
    def __init__(self, checks: Mapping[str, DependencyCheck], is_draining: Callable[[], bool]) -> None:
        self._checks = dict(checks)
        self._is_draining = is_draining
        self._healthy = json_response(Health(status="healthy", version=__version__)).body

    async def health(self, request: Request) -> Response:
        if self._is_draining():
            return json_response(Health(status="draining", version=__version__), status=503)
        return Response(self._healthy, media_type="application/json")

    async def detailed(self, request: Request) -> Response:
        dependencies: dict[str, DependencyHealth] = {}
        for name, check in self._checks.items():
            started = time.perf_counter()
            try:
                result = await check()
            except Exception as error:  # a failing check is a finding, not a crash
                result = DependencyHealth(
                    status="unhealthy",
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                    detail={"error": type(error).__name__},
                )
            dependencies[name] = result
        worst = max((_RANK[dep.status] for dep in dependencies.values()), default=0)
        if self._is_draining():
            worst = 2
        status = next(name for name, rank in _RANK.items() if rank == worst)
        body = DetailedHealth(status=status, version=__version__, dependencies=dependencies)  # type: ignore[arg-type]
        return json_response(body, status=503 if status == "unhealthy" else 200)
