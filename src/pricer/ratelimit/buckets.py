"""Token-bucket arithmetic and the limiter Protocol.

A bucket holds up to `capacity` tokens and refills continuously at `rate` tokens per second; a decision
takes `cost` tokens when that many are there. A bucket that is absent is full.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol


class BucketSpec(NamedTuple):
    key: str  # e.g. "ratelimit:client123" or "ratelimit:client123:positions"
    per_minute: int
    capacity: int

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


class Decision(NamedTuple):
    allowed: bool
    tokens: float  # left after this decision
    spec: BucketSpec
    cost: int
    local: bool = False  # decided without the shared store (Redis down or slow)

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.tokens))

    @property
    def reset_after(self) -> int:
        """Whole seconds until the bucket is full again."""
        return max(0, _ceil((self.spec.capacity - self.tokens) / self.spec.rate))

    @property
    def retry_after(self) -> int:
        """Whole seconds until `cost` tokens are there (at least 1)."""
        missing = max(0.0, min(self.cost, self.spec.capacity) - self.tokens)
        return max(1, _ceil(missing / self.spec.rate))

    @property
    def refill_window(self) -> int:
        """Seconds to refill an empty bucket."""
        return max(1, _ceil(self.spec.capacity / self.spec.rate))


def _ceil(seconds: float) -> int:
    """Whole seconds up, forgiving float noise (1.0000000000000002 s is 1 s)."""
    return math.ceil(seconds - 1e-9)


def refill(tokens: float, elapsed: float, spec: BucketSpec) -> float:
    return min(float(spec.capacity), tokens + max(0.0, elapsed) * spec.rate)


class RateLimiter(Protocol):
    async def acquire(self, spec: BucketSpec, cost: int = 1) -> Decision: ...

    async def close(self) -> None: ...

    @property
    def degraded(self) -> bool:
        """True while decisions are taken locally because the shared store is unavailable."""
        ...
