"""Per-client rate limits (DESIGN §2.5): which buckets a client has, and the charging of them.

Admission charges the request bucket (after authentication, so that every request is charged to the
client of its key, never to an anonymous or spoofable bucket); the batch endpoint draws its priced
positions from the positions bucket through `draw_positions`, on the object create_app hands it.
"""

from __future__ import annotations

import logging

from starlette.types import Scope

from pricer.context import request_id, route_template
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
            f"ratelimit:{client_id}{POSITIONS_SUFFIX}", self._positions_per_minute, self._positions_per_minute
        )

    async def charge_request(self, client_id: str) -> Decision:
        """The request bucket's decision for one request of `client_id` (refused ones included: the
        caller keeps it for the headers, then calls `refuse`)."""
        if self._tracing.enabled:
            with self._tracing.span("rate_limit"):
                return await self.limiter.acquire(await self.request_bucket(client_id))
        return await self.limiter.acquire(await self.request_bucket(client_id))

    async def draw_positions(self, scope: Scope, client_id: str, count: int) -> None:
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
            # The 429's RateLimit headers and Retry-After describe the bucket that refused it: the request
            # bucket's (which admitted this request) would tell the client to retry at once.
            self.refuse(scope, client_id, decision, "positions")

    def refuse(self, scope: Scope, client_id: str, decision: Decision, bucket: str) -> None:
        """429: counted, logged (the runbook's `Rate limit exceeded` line) and raised."""
        self._metrics.rate_limit_exceeded += 1
        log.warning(
            RATE_LIMIT_EXCEEDED,
            extra=fields(
                client_id=client_id,
                endpoint=route_template(scope),
                request_id=request_id(scope),
                bucket=bucket,
                retry_after=decision.retry_after,
            ),
        )
        own_headers = rate_limit_headers(decision) if bucket != "requests" else ()
        raise RateLimitExceeded(decision.retry_after, bucket=bucket, limit_headers=own_headers)


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    spec = decision.spec
    static = _SPEC_HEADERS.get(spec)
    if static is None:
        # What depends on the bucket's spec only, made once per spec (every response carries it).
        if len(_SPEC_HEADERS) >= 4096:
            _SPEC_HEADERS.clear()
        policy = f'"{_policy_name(spec)}";q={spec.capacity};w={decision.refill_window}'.encode()
        static = _SPEC_HEADERS[spec] = (
            (b"ratelimit-policy", policy),
            (b"x-ratelimit-limit", str(spec.per_minute).encode()),
            f'"{_policy_name(spec)}";r='.encode(),
        )
    remaining = str(decision.remaining).encode()
    reset = str(decision.reset_after).encode()
    return [
        static[0],
        (b"ratelimit", static[2] + remaining + b";t=" + reset),
        static[1],
        (b"x-ratelimit-remaining", remaining),
        (b"x-ratelimit-reset", reset),
    ]


def _policy_name(spec: BucketSpec) -> str:
    """The policy a RateLimit header names: the positions bucket's own on the 429 it causes."""
    return "positions" if spec.key.endswith(POSITIONS_SUFFIX) else "default"


POSITIONS_SUFFIX = ":positions"
_SPEC_HEADERS: dict[BucketSpec, tuple[tuple[bytes, bytes], tuple[bytes, bytes], bytes]] = {}
