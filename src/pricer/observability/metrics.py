"""Prometheus metrics through the OpenTelemetry SDK and its Prometheus exporter (names: DESIGN §4).

The request path must stay cheap: a synchronous OTel counter costs about 8 µs per call here and a
histogram record 3-5 µs, so the hot path only touches plain Python state. Counters are integers handed
to OTel by observable-counter callbacks when Prometheus scrapes. Histograms (which have no observable
form in OTel) are aggregated into fixed buckets by histogram.py (a request appends its value to a list;
the values are counted in bulk when a series is read or a thousand are waiting) and handed to the OTel
Prometheus exporter as OTel histogram data points at each scrape, so naming, unit suffixing and
exposition are the exporter's own.
Label values are bounded: `endpoint` is a route template (or `unmatched`), methods outside the known set
are `OTHER`.
With several workers (WORKERS > 1) each worker publishes its state (these counters and bucket counts) to
its own file in a directory the parent made, once a second and at each scrape, and a scrape reports the
sums over every file: each file only grows, so the sums never go backwards, and a worker that exited
keeps its counts in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics.export import (
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from pricer.logs import fields
from pricer.observability.histogram import FixedBucketHistogram, Series
from pricer.observability.metrics_files import MetricsSnapshot, SharedMetricsDirectory

KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
AUTH_STATUSES = ("success", "invalid_key", "expired", "revoked", "missing", "invalid_token")


PLAIN_COUNTERS = ("rate_limit_exceeded", "fallback_usage", "cache_hits", "cache_misses", "jwt_tokens_issued")
PUBLISH_INTERVAL_SECONDS = 1.0

log = logging.getLogger("pricer.metrics")

_STATUS_TEXT = {code: str(code) for code in range(100, 600)}


class _HistogramExportingReader(PrometheusMetricReader):
    """The OTel Prometheus reader, with this process's fixed-bucket histograms added to every collection."""

    def __init__(
        self,
        histograms: Sequence[FixedBucketHistogram],
        series_of: Callable[[FixedBucketHistogram], dict[tuple[str, ...], Series]],
        **options: Any,
    ) -> None:
        self._histograms = tuple(histograms)
        self._series_of = series_of
        super().__init__(**options)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        now_ns = time.time_ns()
        extra = [
            metric
            for h in self._histograms
            if (metric := h.to_metric(now_ns, self._series_of(h))) is not None
        ]
        if extra:
            scope = ScopeMetrics(scope=InstrumentationScope("pricer"), metrics=extra, schema_url="")
            resources = list(metrics_data.resource_metrics) if metrics_data is not None else []
            if resources:
                first = resources[0]
                resources[0] = ResourceMetrics(
                    resource=first.resource,
                    scope_metrics=[*first.scope_metrics, scope],
                    schema_url=first.schema_url,
                )
            else:
                resources = [
                    ResourceMetrics(resource=Resource.get_empty(), scope_metrics=[scope], schema_url="")
                ]
            metrics_data = MetricsData(resource_metrics=resources)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


class Metrics:
    """`enabled=False` (ENABLE_METRICS=false, for measuring what metrics cost) skips the histograms;
    the plain counters cost next to nothing and stay."""

    def __init__(self, *, enabled: bool = True, shared_dir: str | None = None) -> None:
        self.enabled = enabled
        self._shared = SharedMetricsDirectory(shared_dir) if shared_dir is not None else None
        self._publisher: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.request_duration = FixedBucketHistogram(
            "http_request_duration_seconds",
            unit="s",
            description="Request latency by method and route template",
            label_names=("method", "endpoint"),
        )
        self.calculation_duration = FixedBucketHistogram(
            "calculation_duration_seconds",
            unit="s",
            description="Time in market data and the pricing core",
            label_names=(),
        )
        self.backend_duration = FixedBucketHistogram(
            "backend_request_duration_seconds",
            unit="s",
            description="Backend service call latency",
            label_names=("service",),
        )
        self.external_duration = FixedBucketHistogram(
            "external_api_request_duration_seconds",
            unit="s",
            description="Market-data provider call latency (each attempt)",
            label_names=("provider",),
        )
        self._histograms = {
            h.name: h
            for h in (
                self.request_duration,
                self.calculation_duration,
                self.backend_duration,
                self.external_duration,
            )
        }
        self._view: _Totals | None = None  # what the scrape in progress reports (None: this process)
        self._reader = _HistogramExportingReader(
            tuple(self._histograms.values()),
            lambda h: self._view.histograms.get(h.name, {}) if self._view is not None else h.series,
            disable_target_info=True,
            scope_info_enabled=False,
            registry=self.registry,
        )
        self._provider = MeterProvider(
            metric_readers=[self._reader], exemplar_filter=AlwaysOffExemplarFilter()
        )
        meter = self._provider.get_meter("pricer")

        # Hot-path state: plain counters.
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.auth_attempts: defaultdict[str, int] = defaultdict(int)
        self.calculations: defaultdict[str, int] = defaultdict(int)
        self.backend_requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.external_requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        # Gauges by name -> {label value: value}, set by whoever knows them (the live sources, DESIGN §3.1):
        # circuit_breaker_state{name}, market_data_age_seconds{provider}. Read at each scrape.
        self.gauge_readers: defaultdict[str, list[Callable[[], dict[str, float]]]] = defaultdict(list)
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
                        for (method, endpoint, status), count in list(self._counts().requests.items())
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
                        Observation(self._counts().auth_attempts.get(status, 0), {"status": status})
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
                        Observation(self._counts().calculations.get(kind, 0), {"type": kind})
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
                        for (service, status), count in list(self._counts().backend_requests.items())
                    )
                )
            ],
            description="Calls to backend services by outcome",
        )
        meter.create_observable_counter(
            "external_api_requests_total",
            callbacks=[
                observe(
                    lambda: (
                        Observation(count, {"provider": provider, "status": status})
                        for (provider, status), count in list(self._counts().external_requests.items())
                    )
                )
            ],
            description="Calls to market-data providers by outcome",
        )
        for gauge, label, description in (
            ("circuit_breaker_state", "name", "Circuit breaker state: 0 closed, 1 half-open, 2 open"),
            ("market_data_age_seconds", "provider", "Age of the provider's last good answer"),
        ):
            meter.create_observable_gauge(
                gauge,
                callbacks=[
                    observe(
                        lambda gauge=gauge, label=label: (  # type: ignore[misc]
                            Observation(value, {label: key}) for key, value in self._gauge(gauge).items()
                        )
                    )
                ],
                description=description,
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

    def _plain_counter(self, attribute: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda _options: [
            Observation(
                self._view.plain.get(attribute, 0) if self._view is not None else getattr(self, attribute)
            )
        ]

    def _gauge(self, name: str) -> dict[str, float]:
        if self._view is not None:
            return self._view.gauges.get(name, {})
        return self._read_gauge(name)

    def _read_gauge(self, name: str) -> dict[str, float]:
        values: dict[str, float] = {}
        for reader in self.gauge_readers.get(name, ()):
            values.update(reader())
        return values

    def _counts(self) -> _Totals | Metrics:
        return self._view if self._view is not None else self

    def observe_request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        if not self.enabled:
            return
        if method not in KNOWN_METHODS:
            method = "OTHER"
        self.requests[(method, endpoint, _STATUS_TEXT.get(status) or str(status))] += 1
        self.request_duration.observe((method, endpoint), seconds)

    def observe_calculation(self, seconds: float) -> None:
        if self.enabled:
            self.calculation_duration.observe((), seconds)

    def exposition(self) -> bytes:
        if self._shared is None:
            return generate_latest(self.registry)
        # This worker's state first, then the sums over every worker's last publication (its own
        # included): each file only grows, so consecutive scrapes on any workers never go backwards.
        self._shared.publish(self.snapshot())
        self._view = _Totals.merge(self._shared.read_all())
        try:
            return generate_latest(self.registry)
        finally:
            self._view = None

    def snapshot(self) -> MetricsSnapshot:
        """This process's counters and histogram buckets, as a worker publishes them."""
        return MetricsSnapshot(
            requests=[(*labels, count) for labels, count in list(self.requests.items())],
            auth_attempts=dict(self.auth_attempts),
            calculations=dict(self.calculations),
            backend_requests=[(*labels, count) for labels, count in list(self.backend_requests.items())],
            plain={name: getattr(self, name) for name in PLAIN_COUNTERS},
            external_requests=[(*labels, count) for labels, count in list(self.external_requests.items())],
            gauges={name: self._read_gauge(name) for name in list(self.gauge_readers)},
            histograms={
                name: [
                    (list(labels), list(one.counts), one.count, one.total, one.min, one.max)
                    for labels, one in list(h.series.items())
                ]
                for name, h in self._histograms.items()
            },
        )

    async def start_publishing(self) -> None:
        """Start-up step with several workers: publish this worker's state once a second."""
        if self._shared is None:
            return
        self._shared.publish(self.snapshot())

        async def publish() -> None:
            while True:
                await asyncio.sleep(PUBLISH_INTERVAL_SECONDS)
                try:
                    self._shared.publish(self.snapshot())  # type: ignore[union-attr]
                except OSError as error:
                    log.warning("Metrics not published", extra=fields(error=str(error)))

        self._publisher = asyncio.get_running_loop().create_task(publish())

    async def stop_publishing(self) -> None:
        """Shutdown step: the last publication holds every request this worker served."""
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self._publisher = None
        if self._shared is not None:
            self._shared.publish(self.snapshot())

    def shutdown(self) -> None:
        self._provider.shutdown()


class _Totals:
    """Sums over workers' snapshots, in the shapes the scrape callbacks read."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.auth_attempts: defaultdict[str, int] = defaultdict(int)
        self.calculations: defaultdict[str, int] = defaultdict(int)
        self.backend_requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.plain: defaultdict[str, int] = defaultdict(int)
        self.external_requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.gauges: dict[str, dict[str, float]] = {}
        self.histograms: dict[str, dict[tuple[str, ...], Series]] = {}

    @classmethod
    def merge(cls, snapshots: Iterable[MetricsSnapshot]) -> _Totals:
        totals = cls()
        for snapshot in snapshots:
            for method, endpoint, status, count in snapshot.requests:
                totals.requests[(method, endpoint, status)] += count
            for key, count in snapshot.auth_attempts.items():
                totals.auth_attempts[key] += count
            for key, count in snapshot.calculations.items():
                totals.calculations[key] += count
            for service, status, count in snapshot.backend_requests:
                totals.backend_requests[(service, status)] += count
            for key, count in snapshot.plain.items():
                totals.plain[key] += count
            for provider, status, count in snapshot.external_requests:
                totals.external_requests[(provider, status)] += count
            for name, values in snapshot.gauges.items():
                merged_gauge = totals.gauges.setdefault(name, {})
                for key, value in values.items():  # the worst worker's: a state code, an age
                    merged_gauge[key] = max(value, merged_gauge.get(key, value))
            for name, points in snapshot.histograms.items():
                merged = totals.histograms.setdefault(name, {})
                for labels, counts, count, total, low, high in points:
                    series = merged.get(tuple(labels))
                    if series is None:
                        series = merged[tuple(labels)] = Series(len(counts))
                    if len(series.counts) != len(counts):
                        continue  # another bucket layout (another version's file): not summable
                    series.counts = [a + b for a, b in zip(series.counts, counts, strict=True)]
                    series.count += count
                    series.total += total
                    series.min = min(series.min, low)
                    series.max = max(series.max, high)
        return totals
