"""A circuit breaker per remote service: stop calling a service that keeps failing, answer at once while it is
open, and let a few probes decide when it is healthy again (DESIGN §1 Roles, §3.1).

closed --(failures_to_open failures within window_seconds)--> open --(open_seconds)--> half-open
half-open --(successes_to_close successes)--> closed;  half-open --(any failure)--> open
In half-open, one probe call at a time is let through; the others are refused as while open.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.IntEnum):
    """The values of the `circuit_breaker_state{name}` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures_to_open: int = 5,
        window_seconds: float = 30.0,
        open_seconds: float = 30.0,
        successes_to_close: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        if failures_to_open < 1 or successes_to_close < 1:
            raise ValueError("failures_to_open and successes_to_close must be at least 1")
        self.name = name
        self._failures_to_open = failures_to_open
        self._window = window_seconds
        self._open_seconds = open_seconds
        self._successes_to_close = successes_to_close
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures: collections.deque[float] = collections.deque()
        self._opened_at = 0.0
        self._successes = 0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_seconds:
            self._change(BreakerState.HALF_OPEN)
            self._successes = 0
            self._probe_in_flight = False
        return self._state

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open, it becomes the probe)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until a call may be let through (0 when one may go now)."""
        state = self.state
        if state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probe_in_flight):
            return 0.0
        if state is BreakerState.HALF_OPEN:
            return 1.0  # a probe is in flight; its outcome decides, normally well within a second
        return max(0.0, self._open_seconds - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False
            self._successes += 1
            if self._successes >= self._successes_to_close:
                self._failures.clear()
                self._change(BreakerState.CLOSED)

    def record_failure(self) -> None:
        now = self._clock()
        if self._state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        if self._state is BreakerState.OPEN:
            return
        failures = self._failures
        failures.append(now)
        while failures and now - failures[0] > self._window:
            failures.popleft()
        if len(failures) >= self._failures_to_open:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probe_in_flight = False
        self._failures.clear()
        self._change(BreakerState.OPEN)

    def _change(self, state: BreakerState) -> None:
        if state is self._state:
            return
        self._state = state
        if self._on_change is not None:
            self._on_change(self.name, state)
