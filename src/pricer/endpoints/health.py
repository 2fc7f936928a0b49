"""Liveness (`/health`) and the dependencies' state (`/health/detailed`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response

from pricer import __version__
from pricer.endpoints.common import json_response, utc_now
from pricer.marketdata.service import MarketData
from pricer.ratelimit.redis import RedisLimiter
from pricer.schemas import DependencyHealth, DetailedHealth, Health, utc_text

Check = Callable[[], Awaitable[DependencyHealth]]


@dataclass(frozen=True, slots=True)
class DependencyCheck:
    """A dependency's check. When a non-critical dependency is unhealthy a fallback serves in its place,
    so the engine is degraded, not unhealthy (e.g. Redis down: limits are enforced locally)."""

    check: Check
    critical: bool = False
    timeout_seconds: float = 1.0


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
        worst = 0
        for name, dependency in self._checks.items():
            started = time.perf_counter()
            try:
                result = await asyncio.wait_for(dependency.check(), dependency.timeout_seconds)
            except Exception as error:  # a failing check is a finding, not a crash
                result = DependencyHealth(
                    status="unhealthy",
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                    detail={"error": failure(error, dependency.timeout_seconds)},
                )
            dependencies[name] = result
            rank = _RANK[result.status]
            worst = max(worst, rank if dependency.critical else min(rank, _RANK["degraded"]))
        if self._is_draining():
            worst = 2
        status = next(name for name, rank in _RANK.items() if rank == worst)
        body = DetailedHealth(status=status, version=__version__, dependencies=dependencies)  # type: ignore[arg-type]
        return json_response(body, status=503 if status == "unhealthy" else 200)


def failure(error: BaseException, timeout_seconds: float | None = None) -> str:
    """What a failed check says: that the dependency did not answer, or was unavailable; never the exception
    class or its text (internals, and the text may name hosts)."""
    if isinstance(error, TimeoutError):
        return "no answer in time" if timeout_seconds is None else f"no answer within {timeout_seconds:g} s"
    return "unavailable"


def memory_check(backend: str) -> Check:
    async def check() -> DependencyHealth:
        return DependencyHealth(status="healthy", latency_ms=0.0, detail={"backend": backend})

    return check


def limiter_check(limiter: RedisLimiter) -> Check:
    async def check() -> DependencyHealth:
        try:
            latency = await limiter.ping()
        except Exception as error:
            return DependencyHealth(
                status="unhealthy",
                latency_ms=0.0,
                detail={"backend": "redis", "error": failure(error), "rate_limits": "enforced locally"},
            )
        status: Literal["healthy", "degraded"] = "degraded" if limiter.degraded else "healthy"
        return DependencyHealth(
            status=status,
            latency_ms=round(latency, 3),
            detail={
                "backend": "redis",
                "local_decisions": limiter.local_decisions,
                # Budget watches that found the event loop late (and waited again), and calls Redis
                # itself answered late: a busy replica is not a slow Redis.
                "late_watches": limiter.late_watches,
                "overdue_calls": limiter.overdue_calls,
            },
        )

    return check


def market_data_check(market: MarketData, stale_after_hours: float) -> Check:
    async def check() -> DependencyHealth:
        started = time.perf_counter()
        snapshot = await market.snapshot()
        latency = round((time.perf_counter() - started) * 1000, 3)
        if snapshot is None:
            return DependencyHealth(
                status="degraded",
                latency_ms=latency,
                detail={"availability": "none loaded; rates use the fallback"},
                reason="no availability snapshot is loaded; rates use the fallback",
            )
        age_hours = (utc_now() - snapshot.as_of).total_seconds() / 3600
        fresh = age_hours <= stale_after_hours
        as_of = utc_text(snapshot.as_of)
        # Demo data and the shared sample files are years old: a degraded market_data then says only that
        # the snapshot is older than MARKET_DATA_STALE_AFTER_HOURS, which the reason spells out.
        return DependencyHealth(
            status="healthy" if fresh else "degraded",
            latency_ms=latency,
            detail={
                "availability_as_of": as_of,
                "age_hours": round(age_hours, 2),
                "rows": len(snapshot.entries),
            },
            reason=None
            if fresh
            else f"availability snapshot as of {as_of} is older than {stale_after_hours:g} h",
        )

    return check
