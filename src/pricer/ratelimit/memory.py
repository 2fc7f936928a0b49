"""In-process token buckets with bounded memory: full (idle) buckets are dropped, and past
`max_buckets` the least recently used bucket is evicted."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from pricer.ratelimit.buckets import BucketSpec, Decision, refill


class MemoryLimiter:
    def __init__(self, *, max_buckets: int = 200_000, clock: Callable[[], float] = time.monotonic) -> None:
        # key -> (tokens, when they were counted, when the bucket is full again)
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._max_buckets = max_buckets
        self._clock = clock
        self._decisions_since_sweep = 0

    @property
    def degraded(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._buckets)

    def decide(self, spec: BucketSpec, cost: int = 1, *, local: bool = False) -> Decision:
        now = self._clock()
        buckets = self._buckets
        state = buckets.get(spec.key)
        if state is None:
            tokens = float(spec.capacity)
        else:
            tokens = refill(state[0], now - state[1], spec)
            buckets.move_to_end(spec.key)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        buckets[spec.key] = (tokens, now, now + (spec.capacity - tokens) / spec.rate)
        self._decisions_since_sweep += 1
        if len(buckets) > self._max_buckets:
            buckets.popitem(last=False)
        if self._decisions_since_sweep >= 10_000:
            self._sweep(now)
        return Decision(allowed=allowed, tokens=tokens, spec=spec, cost=cost, local=local)

    async def acquire(self, spec: BucketSpec, cost: int = 1) -> Decision:
        return self.decide(spec, cost)

    def tokens(self, spec: BucketSpec) -> float | None:
        """Tokens in the bucket now, or None when there is no bucket (never used, or full and swept)."""
        state = self._buckets.get(spec.key)
        if state is None:
            return None
        return refill(state[0], self._clock() - state[1], spec)

    def set_tokens(self, spec: BucketSpec, tokens: float, at: float | None = None) -> None:
        """Overwrite a bucket's state with what is known elsewhere (the shared store's last word)."""
        now = self._clock() if at is None else at
        tokens = min(float(spec.capacity), max(0.0, tokens))
        buckets = self._buckets
        if spec.key in buckets:
            buckets.move_to_end(spec.key)
        buckets[spec.key] = (tokens, now, now + (spec.capacity - tokens) / spec.rate)
        self._decisions_since_sweep += 1
        if len(buckets) > self._max_buckets:
            buckets.popitem(last=False)
        if self._decisions_since_sweep >= 10_000:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Drop buckets that are full again (an absent bucket is full)."""
        self._decisions_since_sweep = 0
        for key in [key for key, (_, _, full_at) in self._buckets.items() if full_at <= now]:
            del self._buckets[key]

    async def close(self) -> None:
        return None
