"""One backend service as the gateway calls it: a pooled HTTP client, a deadline per call, one retry
where it is safe, the service's circuit breaker and its metrics.

Retries: a call whose request cannot have reached the service (`sent=False`: refused connection, nothing
written) is retried once whatever its method; a read (GET) is retried once after any failure but a
timeout, unless the caller says the read is not safe to repeat (`retry_sent=False`: a GET quote prices and
records a quote, which a second attempt would do twice). Both only within the call's deadline, which the
first attempt shares. A timeout is never retried: the deadline is what the caller waits at most.

The breaker counts transport failures only (nothing usable came back). A service that answers, even with
a 5xx of its own (its database down: 503 SERVICE_UNAVAILABLE), is up, and its answer is the client's
answer, as in ROLE=all; `backend_requests_total{status="error"}` counts those answers too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from pricer.errors import BackendServiceFailed, BackendServiceTimeout, BackendServiceUnavailable
from pricer.observability.metrics import Metrics
from pricer.outbound.breaker import BreakerState, CircuitBreaker
from pricer.outbound.http import HttpClient, HttpResponse, OutboundError, OutboundTimeout

CALCULATION_SERVICE = "calculation-service"
DATA_SERVICE = "data-service"
# A retry with less time than this left would only turn a 502 into a 504.
_MIN_RETRY_SECONDS = 0.005


class ServiceClient:
    def __init__(self, name: str, http: HttpClient, breaker: CircuitBreaker, metrics: Metrics) -> None:
        self.name = name
        self.http = http
        self.breaker = breaker
        self._metrics = metrics
        self._error_label = (name, "error")
        self._success_label = (name, "success")
        self._duration_labels = (name,)

    async def call(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        seconds: float,
        retry_sent: bool | None = None,
    ) -> HttpResponse:
        """`retry_sent`: whether a request that may have reached the service is sent again after a broken
        answer (default: only a GET)."""
        breaker = self.breaker
        if not breaker.allow():
            self._metrics.backend_requests[self._error_label] += 1
            raise BackendServiceUnavailable(self.name, breaker.retry_after())
        started = time.perf_counter()
        deadline = started + seconds
        try:
            retry = method == "GET" if retry_sent is None else retry_sent
            response = await self._attempts(method, target, headers, body, deadline, seconds, retry)
        except (BackendServiceFailed, BackendServiceTimeout):
            breaker.record_failure()
            self._observe(started, self._error_label)
            raise
        except BaseException:
            # Cancelled (the client went away) or refused before sending: not the service's failure, but a
            # half-open breaker's probe must not stay in flight for ever.
            if breaker.state is BreakerState.HALF_OPEN:
                breaker.record_failure()
            raise
        breaker.record_success()
        self._observe(started, self._error_label if response.status >= 500 else self._success_label)
        return response

    async def _attempts(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        deadline: float,
        seconds: float,
        retry_sent: bool,
    ) -> HttpResponse:
        retried = False
        while True:
            try:
                return await self.http.request(
                    method, target, headers=headers, body=body, timeout=deadline - time.perf_counter()
                )
            except OutboundTimeout:
                raise BackendServiceTimeout(self.name, seconds) from None
            except OutboundError as error:
                safe = not error.sent or retry_sent
                if retried or not safe or deadline - time.perf_counter() < _MIN_RETRY_SECONDS:
                    raise BackendServiceFailed(self.name, type(error).__name__) from None
                retried = True

    def _observe(self, started: float, label: tuple[str, str]) -> None:
        self._metrics.backend_requests[label] += 1
        if self._metrics.enabled:
            self._metrics.backend_duration.observe(self._duration_labels, time.perf_counter() - started)

    @property
    def circuit(self) -> str:
        return {
            BreakerState.CLOSED: "closed",
            BreakerState.HALF_OPEN: "half_open",
            BreakerState.OPEN: "open",
        }[self.breaker.state]
