"""Per-client rate limits (DESIGN §2.5), after authentication so that every request is charged to the
client of its key, never to an anonymous or spoofable bucket.

The request bucket is charged here; the batch endpoint draws its priced positions from the positions
bucket through `draw_positions`. The decision travels in the request state, and `RequestContext` turns it
into the RateLimit headers of whatever response goes out (429s included).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.context import RequestState, request_state
from pricer.errors import InvalidParameter, RateLimitExceeded
from pricer.logs import RATE_LIMIT_EXCEEDED, fields
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing
from pricer.ratelimit.buckets import BucketSpec, Decision, RateLimiter
from pricer.stores.protocols import ClientStore

log = logging.getLogger("pricer.ratelimit")


class ClientLimits:
    """Which buckets a client has, and the charging of them."""

    def __init__(
        self,
        limiter: RateLimiter,
        clients: ClientStore,
        *,
        default_per_minute: int,
        default_burst: int,
        positions_per_minute: int,
        metrics: Metrics,
        tracing: Tracing,
    ) -> None:
        self.limiter = limiter
        self._metrics = metrics
        self._tracing = tracing
        self._clients = clients
        self._default_per_minute = default_per_minute
        self._default_burst = default_burst
        self._positions_per_minute = positions_per_minute
        # client_id -> (the client record the spec was made from, the spec); records are replaced whole on
        # change, so the same object means the same limits.
        self._specs: dict[str, tuple[object, BucketSpec]] = {}

    async def request_bucket(self, client_id: str) -> BucketSpec:
        client = await self._clients.get(client_id)
        cached = self._specs.get(client_id)
        if cached is not None and cached[0] is client:
            return cached[1]
        per_minute = self._default_per_minute
        burst = self._default_burst
        if client is not None and client.rate_limit_per_minute is not None:
            per_minute = client.rate_limit_per_minute
            burst = client.burst if client.burst is not None else per_minute
        elif client is not None and client.burst is not None:
            burst = client.burst
        spec = BucketSpec(f"ratelimit:{client_id}", per_minute, burst)
        if len(self._specs) >= 100_000:
            self._specs.clear()
        self._specs[client_id] = (client, spec)
        return spec

    def positions_bucket(self, client_id: str) -> BucketSpec:
        return BucketSpec(
            f"ratelimit:{client_id}:positions", self._positions_per_minute, self._positions_per_minute
        )

    async def charge_request(self, state: RequestState, client_id: str) -> None:
        with self._tracing.span("rate_limit"):
            decision = await self.limiter.acquire(await self.request_bucket(client_id))
        state.rate_decision = decision
        if not decision.allowed:
            self._refuse(state, client_id, decision, "requests")

    async def draw_positions(self, state: RequestState, client_id: str, count: int) -> None:
        if count <= 0:
            return
        bucket = self.positions_bucket(client_id)
        if count > bucket.capacity:
            # No wait would ever admit it: the client must split the batch.
            raise InvalidParameter.for_field(
                "positions",
                f"{count} positions to price exceed the positions limit of {bucket.capacity} per minute",
            )
        decision = await self.limiter.acquire(bucket, count)
        if not decision.allowed:
            self._refuse(state, client_id, decision, "positions")

    def _refuse(self, state: RequestState, client_id: str, decision: Decision, bucket: str) -> None:
        self._metrics.rate_limit_exceeded += 1
        log.warning(
            RATE_LIMIT_EXCEEDED,
            extra=fields(
                client_id=client_id,
                endpoint=state.route_template,
                request_id=state.request_id,
                bucket=bucket,
                retry_after=decision.retry_after,
            ),
        )
        raise RateLimitExceeded(decision.retry_after, bucket=bucket)


class RateLimit:
    def __init__(self, app: ASGIApp, *, limits: ClientLimits | None) -> None:
        self.app = app
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self._limits
        if limits is not None and scope["type"] == "http":
            state = request_state(scope)
            route = state.route
            if route is not None and route.required_scopes is not None:
                state.limits = limits
                if state.principal is not None:
                    await limits.charge_request(state, state.principal.client_id)
                # Without authentication (local development) the endpoint charges the client it names.
        await self.app(scope, receive, send)


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    policy, limit = _spec_headers(decision.spec, decision.refill_window)
    remaining = str(decision.remaining).encode()
    reset = str(decision.reset_after).encode()
    return [
        policy,
        (b"ratelimit", b'"default";r=' + remaining + b";t=" + reset),
        limit,
        (b"x-ratelimit-remaining", remaining),
        (b"x-ratelimit-reset", reset),
    ]


@lru_cache(maxsize=4096)
def _spec_headers(spec: BucketSpec, refill_window: int) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    return (
        (b"ratelimit-policy", f'"default";q={spec.capacity};w={refill_window}'.encode()),
        (b"x-ratelimit-limit", str(spec.per_minute).encode()),
    )
