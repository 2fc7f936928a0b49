"""The fixed-bucket histogram counts what it is given: values appended per request and counted in bulk
give the buckets, count, sum, min and max of counting each value as it comes."""

from __future__ import annotations

import random
from bisect import bisect_left

from pricer.observability.histogram import LATENCY_BUCKETS, FixedBucketHistogram


def test_bulk_counting_equals_counting_each_value() -> None:
    histogram = FixedBucketHistogram("h", unit="s", description="", label_names=("route",))
    draw = random.Random(13)
    expected: dict[tuple[str, ...], list[float]] = {}
    # More than FOLD_AT values on one series (folded while observing), a few on another, read in between.
    for step in range(2 * FixedBucketHistogram.FOLD_AT + 77):
        labels = ("a",) if step % 10 else ("b",)
        value = draw.choice([0.0, 0.0005, 1.0, 9.0]) if step % 7 == 0 else draw.expovariate(200.0)
        histogram.observe(labels, value)
        expected.setdefault(labels, []).append(value)
        if step in (5, 1500):
            assert sum(one.count for one in histogram.series.values()) == step + 1
    series = histogram.series
    assert set(series) == set(expected)
    for labels, values in expected.items():
        counts = [0] * (len(LATENCY_BUCKETS) + 1)
        total = 0.0
        for value in values:
            counts[bisect_left(LATENCY_BUCKETS, value)] += 1
            total += value
        one = series[labels]
        assert one.counts == counts
        assert one.count == len(values)
        assert one.total == total
        assert (one.min, one.max) == (min(values), max(values))


def test_a_histogram_without_observations_has_no_metric() -> None:
    histogram = FixedBucketHistogram("h", unit="s", description="", label_names=())
    assert histogram.series == {}
    assert histogram.to_metric(0) is None
    histogram.observe((), 0.002)
    metric = histogram.to_metric(0)
    assert metric is not None
    assert metric.data.data_points[0].count == 1  # type: ignore[union-attr]
