"""Large batches are decoded, priced and encoded off the event loop (DESIGN §1, "Batches never stall a
replica"), in a pool of worker processes (`BATCH_WORKERS`, default 1; 0 runs every batch inline).

Why processes: msgspec's decode and encode hold the GIL, so a thread would stall the loop just the same.
Each uvicorn worker (WORKERS > 1) has a pool of its own: the pool is part of the app, nothing is shared
between server processes (a host runs WORKERS x BATCH_WORKERS batch workers). The workers start with the
first batch that needs one (about half a second: a replica that never gets a large batch runs none) and
are stopped by the lifespan shutdown, after the server has drained: an in-flight batch answers first.

A batch body of up to `BATCH_INLINE_MAX_BYTES` is handled inline (a worker's round trips cost more than
such a batch takes). A larger one:
1. streams from the socket into a file in the pool's scratch directory (tmpfs: /dev/shm), chunk by chunk,
   never joined in the main process;
2. a leased worker decodes it and keeps the decoded columns; the main process gets the client id, the row
   count, the distinct tickers and the first row errors (`BatchSummary`), no object per row;
3. the main process checks the client, draws the positions, and asks market data once for the distinct
   tickers: one snapshot for the whole batch, handed to the worker with the terms;
4. the worker prices and encodes; the priced columns come back as a file the main process maps (the audit
   record `PricedBatch` is queued in the main process, as for any batch), the response as a file the main
   process streams to the client in 256 KiB chunks.

A worker that dies (SIGKILL, OOM) is replaced. If it died while decoding, nothing was committed and the
batch is decoded again on another worker, once; if it died while pricing (positions already drawn) the
batch answers 503 SERVICE_UNAVAILABLE, and the client may send it again.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import mmap
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from pricer.batch_process import StreamedFileResponse, WorkerDied, WorkerProcess
from pricer.batch_worker import (
    ERRORS_SHOWN,
    decode_errors,
    encode_rates,
    price_and_encode,
    summary_of,
)
from pricer.batches import DecodedBatch, decode_batch
from pricer.endpoints.common import PartsResponse
from pricer.errors import PricerError, ServiceUnavailable
from pricer.logs import fields
from pricer.quotes import ROW_COLUMNS, PricedBatch, TickerRate, fallback_rows
from pricer.releaser import unlink, unlink_later
from pricer.schemas import RowError

log = logging.getLogger("pricer.batches")

DEFAULT_INLINE_MAX_BYTES = 256 << 10
RESTART_DELAY_SECONDS = 1.0
SCRATCH_PREFIX = "pricer-batches-"


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """A decoded batch as the main process sees it: no object per row."""

    form: str
    client_id: str
    count: int
    tickers: list[str]  # distinct normalised tickers
    error_count: int  # rows already in error (validation)
    errors: list[RowError]  # the first of them, by index

    @property
    def valid(self) -> int:
        return self.count - self.error_count


@dataclass(frozen=True, slots=True)
class PricedOutcome:
    batch: PricedBatch
    error_count: int  # every row error: validation and unknown tickers
    errors: list[RowError]  # the first of them, by index
    response: Response | None  # None: not encoded (an atomic batch with a row in error)
    pricing_seconds: float
    fallback_rows: int  # rows priced at a fallback rate (for the metrics)


class BatchPool:
    def __init__(self, workers: int, *, inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES) -> None:
        self.size = workers
        self.inline_max_bytes = inline_max_bytes
        self._idle: asyncio.Queue[WorkerProcess] = asyncio.Queue()
        self._workers: set[WorkerProcess] = set()
        self._scratch: Path | None = None
        self._closing = False
        self._starting: set[asyncio.Task[None]] = set()
        self.restarts = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        """The workers start with the first batch that needs one (a replica that never gets a large batch
        runs no worker), and are kept from then on."""
        if self._scratch is not None or self._closing:
            return
        root = _scratch_root()
        _remove_orphans(Path(root))
        # Named by the pid and the process's start time: a pid alone is reused (a restarted container's
        # server has the same pid, and a memory emptyDir outlives the restart).
        owner = f"{os.getpid()}-s{_process_started(str(os.getpid()))}"
        self._scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{owner}-", dir=root))
        atexit.register(shutil.rmtree, self._scratch, ignore_errors=True)
        for _ in range(self.size):
            self._spawn()

    def _spawn(self, delay: float = 0.0) -> None:
        task = asyncio.get_running_loop().create_task(self._start_worker(delay))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_worker(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._closing or self._scratch is None:
            return
        worker = WorkerProcess()
        self._workers.add(worker)
        try:
            ready = await asyncio.to_thread(worker.receive)
        except WorkerDied:
            ready = None
        if self._closing:
            return
        if not ready or ready[0] != "ready":
            log.error("Batch worker failed to start", extra=fields(pid=worker.pid))
            self._lost(worker, delay=RESTART_DELAY_SECONDS)
            return
        self._idle.put_nowait(worker)

    async def stop(self) -> None:
        """After the server's drain (in-flight batches have answered): stop every worker, remove the
        scratch directory."""
        self._closing = True
        for task in list(self._starting):
            task.cancel()
        workers = list(self._workers)
        self._workers.clear()
        for worker in workers:
            with contextlib.suppress(WorkerDied):
                worker.send(None)
        for worker in workers:
            if not await asyncio.to_thread(worker.wait, 5.0):
                worker.kill()
                await asyncio.to_thread(worker.wait)
            worker.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _lost(self, worker: WorkerProcess, *, delay: float = 0.0) -> None:
        """A worker found dead (or left in an unknown state): killed, reaped, replaced."""
        worker.kill()
        self._workers.discard(worker)
        asyncio.get_running_loop().run_in_executor(None, worker.wait)
        if not self._closing:
            self.restarts += 1
            self._spawn(delay)

    @property
    def worker_pids(self) -> list[int]:
        return sorted(worker.pid for worker in self._workers)

    @property
    def scratch(self) -> Path | None:
        return self._scratch

    # ---- a batch ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def decode(self, request: Request, media: str, *, max_batch_size: int) -> AsyncIterator[BatchJob]:
        """The batch of `request` decoded: inline when small (or without workers), else in a worker."""
        body = await self._read_body(request)
        job: BatchJob
        if isinstance(body, bytes):
            job = InlineJob(decode_batch(body, media, max_batch_size=max_batch_size))
        else:
            try:
                job = await self._decode_in_worker(body, media, max_batch_size)
            finally:
                unlink_later(body)
        try:
            yield job
        finally:
            job.close()

    async def _read_body(self, request: Request) -> bytes | Path:
        """The body as bytes when it is small (or the pool has no workers), else as a scratch file written
        chunk by chunk as it arrives."""
        chunks: list[bytes] = []
        size = 0
        fd: int | None = None
        path: Path | None = None
        try:
            async for chunk in request.stream():
                if fd is None:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self.inline_max_bytes and self.size > 0 and not self._closing:
                        self._ensure_started()
                        path = self._new_path("body")
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        for held in chunks:
                            _write_all(fd, held)
                        chunks.clear()
                else:
                    _write_all(fd, chunk)
                    # The server hands over what it has buffered without a loop turn: without this, a
                    # 10^6-row body's chunks went to the file tens at a time (10-25 ms of the loop).
                    await asyncio.sleep(0)
        except BaseException:
            if path is not None:
                unlink(path)
            raise
        finally:
            if fd is not None:
                os.close(fd)
        return path if path is not None else b"".join(chunks)

    def _new_path(self, kind: str) -> Path:
        assert self._scratch is not None
        return self._scratch / f"{kind}-{secrets.token_hex(8)}"

    async def _decode_in_worker(self, body: Path, media: str, max_batch_size: int) -> PooledJob:
        for attempt in (1, 2):
            worker = await self._idle.get()
            try:
                reply = await self._call(worker, ("decode", str(body), media, max_batch_size))
            except WorkerDied:
                # Nothing was committed: the batch is decoded again, on another worker, once.
                log.warning(
                    "Batch worker died, starting another", extra=fields(pid=worker.pid, step="decode")
                )
                self._lost(worker)
                if attempt == 2:
                    raise _worker_failure() from None
                continue
            if reply[0] != "decoded":
                self._idle.put_nowait(worker)
                raise _reply_error(reply)
            return PooledJob(self, worker, _summary(reply[1]))
        raise AssertionError("unreachable")

    async def _call(self, worker: WorkerProcess, message: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            return await worker.call(message)
        except asyncio.CancelledError:
            # The request was cancelled with the worker busy: its state is unknown, it is replaced.
            self._lost(worker)
            raise

    def _give_back(self, worker: WorkerProcess) -> None:
        if worker in self._workers:
            self._idle.put_nowait(worker)

    def map_batch(self, header: tuple[Any, ...], sent: list[TickerRate | None], path: Path) -> PricedBatch:
        """The priced batch whose columns the worker wrote to `path`: NumPy views of a read-only mapping
        of the file (unlinked at once: its memory goes when the last view does); its rates are those of
        `sent` (the rates handed to the worker) at the positions the header gives."""
        batch_id, calculated_at, request_id, client_id, key_id, fee_schedule, positions, size = header
        rates = [sent[position] for position in positions]
        try:
            if size:
                with open(path, "rb") as file:
                    mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
                table = np.frombuffer(mapped, dtype=np.int64).reshape(len(ROW_COLUMNS), size)
            else:
                table = np.zeros((len(ROW_COLUMNS), 0), dtype=np.int64)
        finally:
            unlink(path)
        columns = dict(zip(ROW_COLUMNS, table, strict=True))
        return PricedBatch(
            batch_id=batch_id,
            calculated_at=calculated_at,
            request_id=request_id,
            client_id=client_id,
            key_id=key_id,
            fee_schedule=fee_schedule,
            rates=[rate for rate in rates if rate is not None],
            **columns,
        )


# tmpfs is used only with this much room: a container's default /dev/shm is 64 MB (Docker), too small for
# one 10^6-row body; the system temp directory serves then (ops/k8s mounts a memory emptyDir at /dev/shm).
SHM_MIN_FREE_BYTES = 512 << 20


def _scratch_root() -> str:
    shm = "/dev/shm"  # noqa: S108 - a private directory is made under it (mkdtemp, mode 0700)
    try:
        stats = os.statvfs(shm)
    except OSError:
        return tempfile.gettempdir()
    roomy = stats.f_bavail * stats.f_frsize >= SHM_MIN_FREE_BYTES
    return shm if roomy and os.access(shm, os.W_OK) else tempfile.gettempdir()


def _remove_orphans(root: Path) -> None:
    """Scratch directories of processes that are gone (killed before their exit could remove them): no
    process has their pid, or the one that has it started at another time (the pid was reused)."""
    for directory in root.glob(f"{SCRATCH_PREFIX}*-*"):
        pid, _, rest = directory.name.removeprefix(SCRATCH_PREFIX).partition("-")
        started, _, suffix = rest.partition("-")
        if not pid.isdigit():
            continue
        now_started = _process_started(pid)
        # `pricer-batches-PID-RANDOM` (no start time): the pid alone tells.
        reused = suffix != "" and started.startswith("s") and now_started != started[1:]
        if now_started is None or reused:
            shutil.rmtree(directory, ignore_errors=True)


def _process_started(pid: str) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def _summary(fields: tuple[Any, ...]) -> BatchSummary:
    form, client_id, count, tickers, error_count, errors = fields
    return BatchSummary(form, client_id, count, tickers, error_count, decode_errors(errors))


def _worker_failure() -> ServiceUnavailable:
    return ServiceUnavailable(
        "A batch worker failed while this batch was processed; it was not priced. Send it again.",
        details={"retry_after": 1},
    )


def _reply_error(reply: tuple[Any, ...]) -> Exception:
    if reply[0] == "error" and isinstance(reply[1], PricerError):
        return reply[1]
    log.error("Batch worker error", extra=fields(traceback=str(reply[1]) if len(reply) > 1 else repr(reply)))
    return PricerError("Internal error")


class BatchJob:
    """One batch between its decode and its response."""

    summary: BatchSummary

    async def price(
        self,
        price: dict[str, Any],
        encode: dict[str, Any],
        *,
        content_type: bytes,
        encode_with_errors: bool = True,
    ) -> PricedOutcome:
        """Price with `price_decoded(decoded, **price)` and encode the response with
        `encode_batch_parts(decoded, batch, errors, **encode)` (not when a row is in error and
        `encode_with_errors` is false). Once per job."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class InlineJob(BatchJob):
    def __init__(self, decoded: DecodedBatch) -> None:
        self._decoded = decoded
        self.summary = _summary(summary_of(decoded))

    async def price(
        self,
        price: dict[str, Any],
        encode: dict[str, Any],
        *,
        content_type: bytes,
        encode_with_errors: bool = True,
    ) -> PricedOutcome:
        arguments = {"price": price, "encode": encode, "encode_with_errors": encode_with_errors}
        batch, errors, body, seconds = price_and_encode(self._decoded, arguments)
        response = None if body is None else PartsResponse(body, content_type)
        return PricedOutcome(
            batch, len(errors), errors[:ERRORS_SHOWN], response, seconds, fallback_rows(batch)
        )

    def close(self) -> None:
        pass


class PooledJob(BatchJob):
    def __init__(self, pool: BatchPool, worker: WorkerProcess, summary: BatchSummary) -> None:
        self._pool = pool
        self._worker: WorkerProcess | None = worker
        self.summary = summary

    async def price(
        self,
        price: dict[str, Any],
        encode: dict[str, Any],
        *,
        content_type: bytes,
        encode_with_errors: bool = True,
    ) -> PricedOutcome:
        worker, self._worker = self._worker, None
        assert worker is not None, "a batch is priced once"
        pool = self._pool
        arrays, body = pool._new_path("priced"), pool._new_path("response")
        rates = price["rates"]
        price = {name: value for name, value in price.items() if name != "rates"}
        arguments = {"price": price, "encode": encode, "encode_with_errors": encode_with_errors}
        message = ("price", arguments, encode_rates(rates), str(arrays), str(body))
        try:
            reply = await pool._call(worker, message)
        except WorkerDied:
            log.warning("Batch worker died, starting another", extra=fields(pid=worker.pid, step="price"))
            pool._lost(worker)
            unlink(arrays)
            unlink(body)
            raise _worker_failure() from None
        except BaseException:
            # Cancelled (the client left, or shutdown): _call let the worker go; what it wrote must go too
            # (off the loop: freeing a 10^6-row answer's pages takes tens of ms).
            unlink_later(arrays)
            unlink_later(body)
            raise
        pool._give_back(worker)
        if reply[0] != "priced":
            unlink(arrays)
            unlink(body)
            raise _reply_error(reply)
        _, header, error_count, errors, body_size, seconds, fallback = reply
        batch = pool.map_batch(header, rates, arrays)
        response = None if body_size is None else StreamedFileResponse.of(body, body_size, content_type)
        return PricedOutcome(batch, error_count, decode_errors(errors), response, seconds, fallback)

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        # Left before pricing (a 4xx, a refused draw): the worker drops the decoded batch.
        try:
            worker.send(("drop",))
        except WorkerDied:
            self._pool._lost(worker)
            return
        self._pool._give_back(worker)


__all__ = ["BatchJob", "BatchPool", "BatchSummary", "PricedOutcome"]
