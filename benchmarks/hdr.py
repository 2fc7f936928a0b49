"""Latency histograms with HdrHistogram's log-linear bucketing (3 significant digits), in microseconds.

The C generator (loadgen/openloop.c) records into exactly these buckets and prints the non-empty ones
as `[lowest value, count]` pairs; this module merges them, takes percentiles and summarises. Values below
2048 µs have a bucket each; above, a bucket spans 2^e µs where e = floor(log2(v)) - 10, so the relative
width of a bucket is below 1/1024 (0.1 %). Values above `MAX_VALUE_US` (100 s) are clamped to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SUB_BUCKETS = 2048
MAX_VALUE_US = 100_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def bucket_floor(value_us: int) -> int:
    """The lowest value of the bucket that holds `value_us`."""
    value = min(max(int(value_us), 0), MAX_VALUE_US)
    if value < SUB_BUCKETS:
        return value
    shift = value.bit_length() - 11
    return (value >> shift) << shift


def bucket_ceiling(value_us: int) -> int:
    """The highest value of the bucket that holds `value_us` (what a percentile reports)."""
    floor = bucket_floor(value_us)
    if floor < SUB_BUCKETS:
        return floor
    return floor + (1 << (floor.bit_length() - 11)) - 1


class LatencyHistogram:
    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.total = 0
        self.max_us = 0

    @classmethod
    def from_pairs(cls, pairs: Iterable[Sequence[int]], max_us: int | None = None) -> LatencyHistogram:
        histogram = cls()
        for value, count in pairs:
            histogram.record(int(value), int(count))
        if max_us is not None:
            histogram.max_us = max(histogram.max_us, int(max_us))
        return histogram

    def record(self, value_us: int, count: int = 1) -> None:
        if count <= 0:
            return
        floor = bucket_floor(value_us)
        self._counts[floor] = self._counts.get(floor, 0) + count
        self.total += count
        self.max_us = max(self.max_us, min(int(value_us), MAX_VALUE_US))

    def merge(self, other: LatencyHistogram) -> None:
        for floor, count in other._counts.items():
            self._counts[floor] = self._counts.get(floor, 0) + count
        self.total += other.total
        self.max_us = max(self.max_us, other.max_us)

    def pairs(self) -> list[list[int]]:
        return [[floor, self._counts[floor]] for floor in sorted(self._counts)]

    def percentile(self, percent: float) -> int:
        """The smallest bucket ceiling at or below which `percent` % of the values lie (0 if empty).

        The 100th percentile is the exact maximum when one is known."""
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"percentile must be within 0-100, got {percent}")
        if self.total == 0:
            return 0
        # The rank of the value: ceil(p/100 × n), at least 1; integer maths avoids 99.9 % float drift.
        rank = max(1, -(-round(percent * 1000) * self.total // 100_000))
        seen = 0
        for floor in sorted(self._counts):
            seen += self._counts[floor]
            if seen >= rank:
                ceiling = bucket_ceiling(floor)
                return min(ceiling, self.max_us) if self.max_us else ceiling
        return self.max_us

    def mean(self) -> float:
        if self.total == 0:
            return 0.0
        # Each bucket stands for its midpoint.
        weighted = sum((floor + bucket_ceiling(floor)) / 2 * count for floor, count in self._counts.items())
        return weighted / self.total

    def summary_ms(self, percentiles: Sequence[float] = PERCENTILES) -> dict[str, float]:
        out: dict[str, float] = {}
        for percent in percentiles:
            out[f"p{percent:g}"] = self.percentile(percent) / 1000
        out["max"] = self.max_us / 1000
        out["mean"] = round(self.mean() / 1000, 4)
        return out

    def spectrum(self, points_per_decade: int = 20, max_nines: int = 5) -> list[tuple[float, float]]:
        """(percentile, latency ms) points for a percentile-spectrum plot: dense towards the tail."""
        points = []
        steps = points_per_decade * max_nines
        for step in range(steps + 1):
            # percentile = 100 × (1 - 10^(-step / points_per_decade)), from 0 to 99.999
            percent = 100.0 * (1.0 - 10.0 ** (-step / points_per_decade))
            if self.total and (1.0 - percent / 100.0) * self.total < 0.5:
                break
            points.append((percent, self.percentile(percent) / 1000))
        points.append((100.0, self.max_us / 1000))
        return points


def histogram_from_result(result: Mapping[str, Any], key: str = "latency_us") -> LatencyHistogram:
    max_key = "max_latency_us" if key == "latency_us" else "max_service_us"
    return LatencyHistogram.from_pairs(result.get(key) or [], result.get(max_key))
