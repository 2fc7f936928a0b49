"""The audit trail: every priced position is recorded, off the request path, and nothing accepted is lost.

`AuditTrail` is the QuoteStore the endpoints use when the trail lives in a database:
* `add` keeps the batch in a bounded in-process store (so `GET /quotes/{id}` works on this replica as soon
  as the response is sent) and queues it for a background writer that writes batches in bulk;
* when the database is down the writer appends the batches to an append-only spool file
  (`AUDIT_SPOOL_DIR`) and replays it once the database is back (the writes are idempotent on quote id, so
  a replay after a partial write adds no duplicate);
* a full queue makes `add` wait (back-pressure) rather than drop anything;
* `close` (graceful shutdown) drains the queue to the database, or to the spool.
A hard kill loses only what was queued and neither written nor spooled (under normal load, milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import struct
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from pricer.logs import fields
from pricer.quotes import AuditRecord, PricedBatch, RowValues, SingleQuote, TickerRate
from pricer.schemas import FeeScheduleView, QuoteResponse
from pricer.stores.memory import MemoryQuoteStore

log = logging.getLogger("pricer.audit")

_LENGTH = struct.Struct(">I")


class QuoteSink(Protocol):
    """Where the trail is written for good (PostgreSQL). `write` is idempotent on quote id."""

    async def write(self, batches: Sequence[AuditRecord]) -> None: ...

    async def get(self, quote_id: str) -> QuoteResponse | None: ...


class SpooledBatch(msgspec.Struct, array_like=True):
    batch_id: str
    calculated_at: dt.datetime
    request_id: str
    client_id: str
    key_id: str | None
    fee_schedule: FeeScheduleView
    rates: list[TickerRate]
    rate_index: list[int]
    input_index: list[int]
    position_cents: list[int]
    loan_days: list[int]
    borrow_cost: list[int]
    markup: list[int]
    transaction_fees: list[int]
    total_fee: list[int]

    @classmethod
    def of(cls, record: AuditRecord) -> SpooledBatch:
        batch = record.batch() if isinstance(record, SingleQuote) else record
        return cls(
            batch_id=batch.batch_id,
            calculated_at=batch.calculated_at,
            request_id=batch.request_id,
            client_id=batch.client_id,
            key_id=batch.key_id,
            fee_schedule=batch.fee_schedule,
            rates=batch.rates,
            rate_index=batch.rate_index.tolist(),
            input_index=batch.input_index.tolist(),
            position_cents=batch.position_cents.tolist(),
            loan_days=batch.loan_days.tolist(),
            borrow_cost=batch.borrow_cost.tolist(),
            markup=batch.markup.tolist(),
            transaction_fees=batch.transaction_fees.tolist(),
            total_fee=batch.total_fee.tolist(),
        )

    def batch(self) -> PricedBatch:
        return PricedBatch.from_columns(
            batch_id=self.batch_id,
            calculated_at=self.calculated_at,
            request_id=self.request_id,
            client_id=self.client_id,
            key_id=self.key_id,
            fee_schedule=self.fee_schedule,
            rates=self.rates,
            columns={name: getattr(self, name) for name in RowValues._fields},
        )


class Spool:
    """An append-only file of length-prefixed msgpack batches, fsynced on every append.

    A crash (or a failed write) in the middle of an append leaves a torn record at the end; it is cut off
    before anything else is appended, so that every whole record stays readable. The torn batch was never
    acknowledged as spooled: it is still queued (or, after a crash, was never answered as written)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "audit-spool.bin"
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(SpooledBatch)
        self._end = 0  # where the last whole record ends
        if self.path.exists():
            data = self.path.read_bytes()
            _, self._end = self._records(data)
            if self._end < len(data):
                log.error(
                    "Audit spool ends in a torn record; cutting it off",
                    extra=fields(path=str(self.path), offset=self._end, torn_bytes=len(data) - self._end),
                )

    def _records(self, data: bytes) -> tuple[list[PricedBatch], int]:
        """The whole records at the start of `data`, and the offset where they end."""
        batches = []
        offset = 0
        while offset + _LENGTH.size <= len(data):
            (length,) = _LENGTH.unpack_from(data, offset)
            start = offset + _LENGTH.size
            if start + length > len(data):
                break
            try:
                batches.append(self._decoder.decode(data[start : start + length]).batch())
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                break
            offset = start + length
        return batches, offset

    def append(self, batches: Sequence[AuditRecord]) -> None:
        payload = bytearray()
        for batch in batches:
            record = self._encoder.encode(SpooledBatch.of(batch))
            payload += _LENGTH.pack(len(record)) + record
        with self.path.open("r+b" if self.path.exists() else "wb") as spool:
            spool.seek(self._end)
            spool.truncate()
            spool.write(payload)
            spool.flush()
            os.fsync(spool.fileno())
        self._end += len(payload)

    def read(self) -> list[PricedBatch]:
        if not self.path.exists():
            return []
        batches, _ = self._records(self.path.read_bytes())
        return batches

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._end = 0

    @property
    def pending(self) -> bool:
        return self._end > 0


class AuditTrail:
    def __init__(
        self,
        sink: QuoteSink,
        *,
        spool: Spool,
        recent_rows: int = 200_000,
        max_queue_rows: int = 2_000_000,
        max_write_rows: int = 200_000,
        retry_seconds: float = 0.5,
        linger_seconds: float = 0.02,
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._recent = MemoryQuoteStore(recent_rows)
        self._queue: deque[AuditRecord] = deque()
        self._queued_rows = 0
        self._max_queue_rows = max_queue_rows
        self._max_write_rows = max_write_rows
        self._retry_seconds = retry_seconds
        self._linger_seconds = linger_seconds
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.database_up = True
        self.written_rows = 0
        self.spooled_rows = 0

    # ---- QuoteStore ---------------------------------------------------------------------------

    async def add(self, batch: PricedBatch) -> None:
        await self._recent.add(batch)
        # A single quote waits for its write in its compact form: the batch, its arrays and its response
        # are freed now, by the request that made them.
        record: AuditRecord = batch.single_quote() or batch
        while self._queued_rows >= self._max_queue_rows and not self._closing:
            self._room.clear()
            await self._room.wait()
        self._queue.append(record)
        self._queued_rows += record.size
        self._wakeup.set()

    async def get(self, quote_id: str) -> QuoteResponse | None:
        return await self._recent.get(quote_id) or await self._sink.get(quote_id)

    # ---- state ---------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Positions accepted and not yet in the database (queued or spooled)."""
        return self._queued_rows

    @property
    def spool_pending(self) -> bool:
        return self._spool.pending

    # ---- the writer ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._replay_spool()
                if not self.spool_pending:
                    await self._wakeup.wait()
                self._wakeup.clear()
                if self._linger_seconds and not self._closing and self._queued_rows < self._max_write_rows:
                    # Group commit: a write costs a few round trips whatever its size, so the quotes of
                    # the next few milliseconds join this one (at 10^4 quotes/s, hundreds per write).
                    await asyncio.sleep(self._linger_seconds)
                await self._drain()
                if self.spool_pending and not self._closing:
                    await asyncio.sleep(self._retry_seconds)
            except Exception:
                # The spool itself failed (disk full?): keep going; the queue holds the batches.
                log.exception("Audit writer error")
                await asyncio.sleep(self._retry_seconds)

    def _take(self) -> tuple[list[AuditRecord], int]:
        """The next write: queued batches up to max_write_rows rows (at least one), and their rows."""
        taken: list[AuditRecord] = []
        rows = 0
        queue = self._queue
        while queue:
            size = queue[0].size
            if taken and rows + size > self._max_write_rows:
                break
            taken.append(queue.popleft())
            rows += size
        return taken, rows

    def _release(self, rows: int) -> None:
        self._queued_rows -= rows
        if self._queued_rows < self._max_queue_rows:
            self._room.set()

    async def _drain(self) -> None:
        while self._queue:
            batches, rows = self._take()
            if not self.spool_pending:
                try:
                    await self._sink.write(batches)
                    self.written_rows += rows
                    self.database_up = True
                    self._release(rows)
                    continue
                except Exception as error:
                    self._database_down(error)
            # The database is away (or the spool still holds older batches, which go first on replay).
            try:
                self._spool.append(batches)
            except OSError:
                self._queue.extendleft(reversed(batches))
                raise
            self.spooled_rows += rows
            self._release(rows)

    async def _replay_spool(self) -> None:
        if not self._spool.pending:
            return
        batches = self._spool.read()
        try:
            for start in range(0, len(batches), 64):
                await self._sink.write(batches[start : start + 64])
        except Exception as error:
            self._database_down(error)
            return
        self._spool.clear()
        self.database_up = True
        log.info("Audit spool replayed", extra=fields(batches=len(batches)))

    def _database_down(self, error: Exception) -> None:
        if self.database_up:
            log.error("Backend service error", extra=fields(service="audit", error=type(error).__name__))
        self.database_up = False

    async def close(self) -> None:
        """Drain everything queued to the database, else to the spool; then stop the writer."""
        self._closing = True
        self._room.set()
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        await self._replay_spool()
        await self._drain()
