"""The files through which the workers of one server publish their metric state (WORKERS > 1): each
worker's `MetricsSnapshot` in its own file of a shared directory, summed at each scrape (`metrics.py`)."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import msgspec

from pricer.logs import fields

log = logging.getLogger("pricer.metrics")


class MetricsSnapshot(msgspec.Struct, array_like=True):
    """One worker's metric state: counters by label values, histogram series as (labels, bucket
    counts, count, sum, min, max)."""

    requests: list[tuple[str, str, str, int]]
    auth_attempts: dict[str, int]
    calculations: dict[str, int]
    backend_requests: list[tuple[str, str, int]]
    plain: dict[str, int]
    histograms: dict[str, list[tuple[list[str], list[int], int, float, float, float]]]
    external_requests: list[tuple[str, str, int]] = []
    gauges: dict[str, dict[str, float]] = {}


class SharedMetricsDirectory:
    """Per-process snapshot files in one directory (`worker-<pid>-<random token>.msgpack`), replaced
    atomically. The token makes each process's file its own: a worker that replaces a dead one may get
    its pid, and must not overwrite the dead worker's last counts (the sums would go backwards)."""

    def __init__(self, directory: str) -> None:
        self._directory = Path(directory)
        name = f"worker-{os.getpid()}-{secrets.token_hex(8)}"
        self._path = self._directory / f"{name}.msgpack"
        self._temporary = self._directory / f".{name}.tmp"
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(MetricsSnapshot)

    def publish(self, snapshot: MetricsSnapshot) -> None:
        self._temporary.write_bytes(self._encoder.encode(snapshot))
        os.replace(self._temporary, self._path)

    def read_all(self) -> list[MetricsSnapshot]:
        snapshots = []
        for path in sorted(self._directory.glob("worker-*.msgpack")):
            try:
                snapshots.append(self._decoder.decode(path.read_bytes()))
            except (OSError, msgspec.DecodeError) as error:
                log.warning("Metrics file unreadable", extra=fields(file=path.name, error=str(error)))
        return snapshots
