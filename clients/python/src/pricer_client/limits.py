"""The engine's rate-limit headers (DESIGN §2.5) as the client last saw them, and optional pacing.

The engine limits each client with a token bucket: `X-RateLimit-Limit` tokens a minute, capacity the
policy's `q`, `X-RateLimit-Remaining` whole tokens left. `Pacer` mirrors that bucket from the last headers
and says how long to wait before the next request so that the caller stays under its limit instead of
collecting 429s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_POLICY_QUOTA = re.compile(r";\s*q=(\d+)")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The request bucket as of the last authenticated response (None: not seen yet)."""

    limit: int | None = None  # tokens per minute
    remaining: int | None = None  # whole tokens left
    reset: float | None = None  # seconds until the bucket is full
    burst: int | None = None  # the bucket's capacity (RateLimit-Policy q=)
    observed_at: float | None = None  # time.monotonic() when these were read

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], now: float) -> RateLimits | None:
        limit = _int(headers.get("x-ratelimit-limit"))
        remaining = _int(headers.get("x-ratelimit-remaining"))
        if limit is None or remaining is None:
            return None
        policy = _POLICY_QUOTA.search(headers.get("ratelimit-policy", ""))
        return cls(
            limit=limit,
            remaining=remaining,
            reset=_float(headers.get("x-ratelimit-reset")),
            burst=int(policy.group(1)) if policy else None,
            observed_at=now,
        )


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _float(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


class Pacer:
    """Spaces requests so that the mirrored bucket never runs dry.

    Until the first response there is nothing to mirror and requests go out at once; afterwards each
    request takes one token from the mirror, which refills at `limit / 60` a second, and `wait()` is the
    time until a whole token is there. The engine's `remaining` is whole tokens (the fraction is unknown),
    so the mirror is never ahead of the engine's bucket."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: float | None = None
        self._per_second = 0.0
        self._capacity = 0.0
        self._at = 0.0

    def observe(self, limits: RateLimits) -> None:
        if limits.limit is None or limits.remaining is None:
            return
        self._per_second = limits.limit / 60.0
        self._capacity = float(limits.burst if limits.burst is not None else limits.limit)
        self._tokens = float(limits.remaining)
        self._at = limits.observed_at if limits.observed_at is not None else self._clock()

    def wait(self) -> float:
        """Seconds to wait before the next request (0 when a token is there)."""
        if self._tokens is None or self._per_second <= 0:
            return 0.0
        tokens = self._refilled()
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._per_second

    def take(self) -> None:
        """Count a request sent (call after `wait()` elapsed)."""
        if self._tokens is None:
            return
        self._tokens = self._refilled() - 1.0
        self._at = self._clock()

    def _refilled(self) -> float:
        assert self._tokens is not None
        return min(self._capacity, self._tokens + (self._clock() - self._at) * self._per_second)
