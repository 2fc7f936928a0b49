"""One provider's HTTP calls (DESIGN §3.1): a deadline per call, jittered retries within it, a circuit
breaker, a bounded number of calls at once, every answer validated before it is returned.

A call is `SOURCE_TIMEOUT_SECONDS` from start to validated answer, waiting for a free lane included.
Connection failures, 5xx and 429 answers are retried after a full-jitter backoff (50 ms doubling, at most
1 s) while the deadline leaves room; a timed-out attempt used the whole deadline; a refused answer
(`BadAnswer`) or an oversized body is not retried: the provider said it, it would say it again. A call
that ends without a good answer counts one failure on the provider's breaker; five within 30 s open it
(calls are then refused at once for 30 s, then one probe at a time, three successes close it).

Every attempt is counted in `external_api_requests_total{provider,status}` (status: `success`,
`not_found`, `error`, `timeout`, `invalid`, `circuit_open`) and timed in
`external_api_request_duration_seconds{provider}`. A failed call is logged once as `External API error`
(WARNING) with the provider and the reason: never the key, never the URL's credentials (there are none:
settings refuse them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

from pricer.logs import fields
from pricer.marketdata.providers.validation import MAX_ANSWER_BYTES, BadAnswer
from pricer.observability.metrics import Metrics
from pricer.outbound.breaker import BreakerState, CircuitBreaker
from pricer.outbound.http import ConnectFailed, HttpClient, OutboundError, OutboundTimeout, ResponseTooLarge

log = logging.getLogger("pricer.sources")

T = TypeVar("T")
K = TypeVar("K")
EXTERNAL_API_ERROR = "External API error"
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ProviderFailure(Exception):
    """A call that ended without a good answer (already counted and logged)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Provider:
    """A provider's client, breaker and lanes. `lanes` bounds this process's calls at once (the refresher's
    share and the cold fetches' share of SOURCE_MAX_CONCURRENCY, see `refresher.py`)."""

    def __init__(
        self,
        name: str,
        url: str,
        key: str | None,
        *,
        timeout_seconds: float,
        connections: int,
        metrics: Metrics | None = None,
        breaker_open_seconds: float = 30.0,
        on_breaker_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.name = name
        self._prefix = parts.path.rstrip("/")
        self._client = HttpClient(
            f"{parts.scheme}://{parts.netloc}",
            max_connections=max(1, connections),
            max_response_bytes=MAX_ANSWER_BYTES,
            connect_timeout=min(1.0, timeout_seconds),
        )
        self._headers = (
            {"X-API-Key": key, "Accept": "application/json"} if key else {"Accept": "application/json"}
        )
        self._timeout = timeout_seconds
        self._metrics = metrics
        self.breaker = CircuitBreaker(name, open_seconds=breaker_open_seconds, on_change=on_breaker_change)
        # What /health/detailed and market_data_age_seconds show.
        self.last_success_at: dt.datetime | None = None
        self.last_latency_ms: float | None = None
        self.last_error: str | None = None

    def _count(self, status: str, seconds: float | None = None) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.external_requests[(self.name, status)] += 1
        if seconds is not None and metrics.enabled:
            metrics.external_duration.observe((self.name,), seconds)

    async def get(
        self, path: str, parse: Callable[[int, bytes], T], *, lane: asyncio.Semaphore, what: str = ""
    ) -> T:
        """GET `path` under the provider's URL and return `parse(status, body)`; ProviderFailure if no good
        answer came within the deadline."""
        deadline = time.monotonic() + self._timeout
        try:
            await asyncio.wait_for(lane.acquire(), self._timeout)
        except TimeoutError:
            # Our own queue, not the provider's fault: no breaker failure, no warning.
            self._count("timeout")
            raise ProviderFailure("no free lane before the deadline") from None
        try:
            # Asked with a lane in hand: a half-open breaker's probe must be sent, and its outcome recorded.
            if not self.breaker.allow():
                self._count("circuit_open")
                raise ProviderFailure("circuit open")
            try:
                return await self._attempts(path, parse, deadline, what)
            except ProviderFailure:
                raise  # recorded by _attempts
            except BaseException:
                self.breaker.record_failure()  # cancelled (shutdown) or unexpected: the probe must not hang
                raise
        finally:
            lane.release()

    async def _attempts(self, path: str, parse: Callable[[int, bytes], T], deadline: float, what: str) -> T:
        target = self._prefix + path
        attempt = 0
        while True:
            started = time.monotonic()
            remaining = deadline - started
            if remaining <= 0:
                raise self._failed("timeout", "deadline passed", what)
            try:
                response = await self._client.request("GET", target, headers=self._headers, timeout=remaining)
            except OutboundTimeout:
                self._count("timeout", time.monotonic() - started)
                raise self._failed(None, f"no answer within {self._timeout:g} s", what) from None
            except ResponseTooLarge:
                self._count("invalid", time.monotonic() - started)
                raise self._failed(None, "body over 64 KiB", what) from None
            except (ConnectFailed, OutboundError) as error:
                self._count("error", time.monotonic() - started)
                reason = "connection failed" if isinstance(error, ConnectFailed) else "broken answer"
            else:
                elapsed = time.monotonic() - started
                if response.status in _RETRY_STATUSES:
                    self._count("error", elapsed)
                    reason = f"HTTP {response.status}"
                else:
                    try:
                        value = parse(response.status, response.body)
                    except BadAnswer as bad:
                        self._count("invalid", elapsed)
                        raise self._failed(None, bad.reason, what) from None
                    self._count("not_found" if response.status == 404 else "success", elapsed)
                    self.breaker.record_success()
                    self.last_success_at = dt.datetime.now(dt.UTC)
                    self.last_latency_ms = round(elapsed * 1000, 3)
                    self.last_error = None
                    return value
            backoff = random.uniform(0, min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**attempt))  # noqa: S311
            attempt += 1
            if deadline - time.monotonic() < backoff + 0.05:
                raise self._failed(None, reason, what)
            await asyncio.sleep(backoff)

    def _failed(self, status: str | None, reason: str, what: str) -> ProviderFailure:
        """Count (when not counted yet) and log a failed call; the caller raises what this returns."""
        if status is not None:
            self._count(status)
        self.breaker.record_failure()
        self.last_error = reason
        log.warning(EXTERNAL_API_ERROR, extra=fields(provider=self.name, reason=reason, item=what or None))
        return ProviderFailure(reason)

    async def aclose(self) -> None:
        await self._client.aclose()


_CHUNK = 256  # calls in flight per step of a refresh (the lane bounds the calls at once)


async def fetch_each(
    provider: Provider, keys: Sequence[K], fetch: Callable[[K], Awaitable[T]]
) -> list[tuple[K, T]]:
    """`fetch` of every key that got a good answer (a failed key keeps its last good value).

    While the breaker is half-open the calls go one at a time (each is the probe: three successes close it,
    and the rest of the refresh runs at full width); while it is open the refresh stops (every call would be
    refused)."""
    found: list[tuple[K, T]] = []
    index = 0
    while index < len(keys) and provider.breaker.state is not BreakerState.CLOSED:
        if provider.breaker.state is BreakerState.OPEN:
            return found
        with contextlib.suppress(ProviderFailure):
            found.append((keys[index], await fetch(keys[index])))
        index += 1
    for start in range(index, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        results = await asyncio.gather(*(fetch(key) for key in chunk), return_exceptions=True)
        for key, result in zip(chunk, results, strict=True):
            if isinstance(result, ProviderFailure):
                continue
            if isinstance(result, BaseException):
                raise result
            found.append((key, result))
    return found
