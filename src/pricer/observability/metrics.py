"""Prometheus metrics through the OpenTelemetry SDK and its Prometheus exporter (names: DESIGN §4).

The request path must stay cheap: a synchronous OTel counter costs about 8 µs per call here, so counters
are plain integers incremented on the hot path and handed to OTel by observable-counter callbacks when
Prometheus scrapes. Histograms have no observable form in OTel and are recorded synchronously.
Label values are bounded: `endpoint` is a route template (or `unmatched`), methods outside the known set
are `OTHER`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Seconds; resolves 0.5 ms to 2.5 s (DESIGN §4).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0)
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
AUTH_STATUSES = ("success", "invalid_key", "expired", "revoked", "missing", "invalid_token")


class Metrics:
    """`enabled=False` (ENABLE_METRICS=false, for measuring what metrics cost) skips the histograms;
    the plain counters cost next to nothing and stay."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._reader = PrometheusMetricReader(
            disable_target_info=True, scope_info_enabled=False, registry=self.registry
        )
        histogram_view = ExplicitBucketHistogramAggregation(LATENCY_BUCKETS)
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            exemplar_filter=AlwaysOffExemplarFilter(),
            views=[
                View(instrument_name="http_request_duration_seconds", aggregation=histogram_view),
                View(instrument_name="calculation_duration_seconds", aggregation=histogram_view),
                View(instrument_name="backend_request_duration_seconds", aggregation=histogram_view),
            ],
        )
        meter = self._provider.get_meter("pricer")

        # Hot-path state: plain counters.
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.auth_attempts: defaultdict[str, int] = defaultdict(int)
        self.calculations: defaultdict[str, int] = defaultdict(int)
        self.backend_requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.rate_limit_exceeded = 0
        self.fallback_usage = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.jwt_tokens_issued = 0

        def observe(
            read: Callable[[], Iterable[Observation]],
        ) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda _options: list(read())

        meter.create_observable_counter(
            "http_requests_total",
            callbacks=[
                observe(
                    lambda: (
                        Observation(count, {"method": method, "endpoint": endpoint, "status_code": status})
                        for (method, endpoint, status), count in list(self.requests.items())
                    )
                )
            ],
            description="HTTP requests by method, route template and status code",
        )
        meter.create_observable_counter(
            "authentication_attempts_total",
            callbacks=[
                observe(
                    lambda: (
                        Observation(self.auth_attempts.get(status, 0), {"status": status})
                        for status in AUTH_STATUSES
                    )
                )
            ],
            description="Authentication attempts on protected routes by outcome",
        )
        meter.create_observable_counter(
            "calculations_total",
            callbacks=[
                observe(
                    lambda: (
                        Observation(self.calculations.get(kind, 0), {"type": kind})
                        for kind in ("single", "batch")
                    )
                )
            ],
            description="Priced positions by request type",
        )
        meter.create_observable_counter(
            "backend_requests_total",
            callbacks=[
                observe(
                    lambda: (
                        Observation(count, {"service": service, "status": status})
                        for (service, status), count in list(self.backend_requests.items())
                    )
                )
            ],
            description="Calls to backend services by outcome",
        )
        for name, attribute, description in (
            ("rate_limit_exceeded_total", "rate_limit_exceeded", "Requests refused by a rate limit"),
            ("fallback_usage_total", "fallback_usage", "Positions priced on the fallback rate"),
            ("cache_hits_total", "cache_hits", "Rate cache hits"),
            ("cache_misses_total", "cache_misses", "Rate cache misses"),
            ("jwt_tokens_issued_total", "jwt_tokens_issued", "Bearer tokens issued"),
        ):
            meter.create_observable_counter(
                name, callbacks=[self._plain_counter(attribute)], description=description
            )

        self._request_duration = meter.create_histogram(
            "http_request_duration_seconds",
            unit="s",
            description="Request latency by method and route template",
        )
        self._calculation_duration = meter.create_histogram(
            "calculation_duration_seconds", unit="s", description="Time in market data and the pricing core"
        )
        self.backend_duration = meter.create_histogram(
            "backend_request_duration_seconds", unit="s", description="Backend service call latency"
        )
        self._duration_attributes: dict[tuple[str, str], dict[str, str]] = {}

    def _plain_counter(self, attribute: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda _options: [Observation(getattr(self, attribute))]

    def observe_request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        if not self.enabled:
            return
        if method not in KNOWN_METHODS:
            method = "OTHER"
        self.requests[(method, endpoint, str(status))] += 1
        key = (method, endpoint)
        attributes = self._duration_attributes.get(key)
        if attributes is None:
            attributes = self._duration_attributes[key] = {"method": method, "endpoint": endpoint}
        self._request_duration.record(seconds, attributes)

    def observe_calculation(self, seconds: float) -> None:
        if self.enabled:
            self._calculation_duration.record(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self._provider.shutdown()
