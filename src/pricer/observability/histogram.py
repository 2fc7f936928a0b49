"""The engine's histograms: fixed buckets, counted in plain Python state off the request path's clock.

A request appends its value to a list (a fraction of a bucket search's cost); the values are counted into
their series in bulk when the series is read or FOLD_AT of them are waiting. The metrics module hands the
series to the OTel Prometheus exporter as histogram data points at each scrape.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence

from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, HistogramDataPoint, Metric

__all__ = ["LATENCY_BUCKETS", "FixedBucketHistogram", "Series"]

# Seconds; resolves 0.5 ms to 2.5 s (DESIGN §4).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0)


class Series:
    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.count = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class FixedBucketHistogram:
    """A cumulative histogram over fixed upper bounds, one series per label-value tuple.

    Bucket i counts values in (bounds[i-1], bounds[i]], the last one everything above, as OTel's
    explicit-bucket aggregation does."""

    def __init__(self, name: str, *, unit: str, description: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.label_names = tuple(label_names)
        self.bounds = LATENCY_BUCKETS
        self._series: dict[tuple[str, ...], Series] = {}
        # Values observed and not yet counted into their series, by labels: a request appends its value
        # (a fraction of a bucket search's cost), and the values are counted in bulk when a series is read
        # or FOLD_AT of them are waiting (so the memory they hold stays bounded).
        self._pending: dict[tuple[str, ...], list[float]] = {}
        self._started_ns = time.time_ns()

    FOLD_AT = 1024

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        pending = self._pending.get(labels)
        if pending is None:
            pending = self._pending[labels] = []
        pending.append(value)
        if len(pending) >= self.FOLD_AT:
            self._fold(labels)

    def _fold(self, labels: tuple[str, ...]) -> None:
        values = self._pending.pop(labels, None)
        if not values:
            return
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = Series(len(self.bounds) + 1)
        bounds, counts, total = self.bounds, series.counts, series.total
        for value in values:  # in the order observed: the same sum as one addition per observation
            counts[bisect_left(bounds, value)] += 1
            total += value
        series.total = total
        series.count += len(values)
        series.min = min(series.min, *values)
        series.max = max(series.max, *values)

    @property
    def series(self) -> dict[tuple[str, ...], Series]:
        for labels in list(self._pending):
            self._fold(labels)
        return self._series

    def to_metric(self, now_ns: int, series: dict[tuple[str, ...], Series] | None = None) -> Metric | None:
        """The series (this process's, or the merged ones given) as an OTel histogram (None before the
        first observation)."""
        if series is None:
            series = self.series
        if not series:
            return None
        points = [
            HistogramDataPoint(
                attributes=dict(zip(self.label_names, labels, strict=True)),
                start_time_unix_nano=self._started_ns,
                time_unix_nano=now_ns,
                count=one.count,
                sum=one.total,
                bucket_counts=list(one.counts),
                explicit_bounds=self.bounds,
                min=one.min,
                max=one.max,
            )
            for labels, one in list(series.items())
        ]
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )
