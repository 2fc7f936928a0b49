"""The audit trail: every priced position is recorded, off the request path, and nothing accepted is lost.

`AuditTrail` is the QuoteStore the endpoints use when the trail lives in a database:
* `add` keeps the batch in a bounded in-process store (so `GET /quotes/{id}` works on this replica as soon
  as the response is sent) and queues it for a background writer that writes batches in bulk;
* when the database is down the writer appends the batches, as they come, to this process's spool under
  `AUDIT_SPOOL_DIR` and replays it once the database is back (the writes are idempotent on quote id, so a
  replay after a partial write adds no duplicate); only the attempts to reach the database wait for the
  retry interval;
* a full queue makes `add` wait (back-pressure) rather than drop anything;
* `close` (graceful shutdown) drains the queue to the database, or to the spool.

Spools cannot interleave: each process owns a directory `proc-<host>-<pid>-<random>` under
`AUDIT_SPOOL_DIR`, held under an exclusive `flock` for its life (made under a dot name and renamed once
locked, so that nobody adopts it half made). Every process, at start-up and then every few seconds, adopts
the directories whose lock it can take -- their owner is dead (kill -9, crash, an old pod on a shared
volume) or exited with the database away -- replays them and removes them. Two workers, two processes
on one host with the default directory, and pods on one shared volume are therefore all safe. (`flock`
must work across the pods sharing the volume: local disks, NFSv4, CephFS do; some NFSv3 setups do not.)

Every file is a sequence of frames: magic, payload length, CRC32 of the payload, payload (a msgpack
`QuoteColumns`). Replay reads past damage: a torn tail (a crash mid-append) is cut, a damaged frame is
skipped by resynchronising on the next valid one, and the exact bytes that could not be read are copied
to a quarantine file beside the spool directories and logged at ERROR with their counts. A record the
database refuses for good (a value beyond a column: not a connection error) goes to a dead-letter file,
with an ERROR line, and the rest goes on; so does a record the database fails on with a server error
every time while it answers a probe query (SQLSTATE 54000, XX000: found by cutting the write in halves).
A file that cannot be replayed for another reason (an I/O error, no room for its quarantine copy) is
renamed whole into quarantine, with an ERROR line, and skipped. The replay runs apart from the writes:
nothing it meets stops new records from being written. Reading, decoding and appending spool files and
opening journal segments run on threads (a 64 MiB segment takes about a second to decode); before a replay
reads anything, a probe query checks that the database is back.

Durability (`AUDIT_DURABILITY`):
* `memory` (default): the record waits in memory for the writer's group commit. A SIGKILL (OOM kill,
  node loss) loses what was queued and not yet written or spooled: the quotes answered during the last
  linger (20 ms) plus the write in flight (a few ms to tens of ms under load; while the database is down,
  the linger plus one spool append; while a backlog replays, plus the replay's chunk in flight: new
  records are drained between chunks of REPLAY_CHUNK records). A graceful stop (SIGTERM) loses nothing.
* `disk`: before `add` returns (so before the response), the record is appended to this process's
  journal and fsynced. The fsync runs on a thread of its own and is group-committed: one fsync serves
  every record that arrived while the previous one ran. The database write then goes on from memory as
  in `memory` mode; journal segments are rotated, and deleted once every record in them is in the
  database (or in the spool: spooled without an fsync of its own, the spool flushed before a journal
  segment is deleted). A process killed at any point loses nothing it answered: the journal is
  replayed, idempotently, by whichever process adopts its directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pricer.audit_format import (
    Scan,
    append_file,
    encode_record,
    read_file,
    remove_file,
    scan,
    scan_legacy,
    sync_directory,
)
from pricer.audit_sink import QuoteSink, SinkWriter
from pricer.audit_spool import JOURNAL_SEGMENT_BYTES, LEGACY_FILE, LOCK_FILE, Adopted, Journal, Spool
from pricer.logs import fields
from pricer.quotes import AuditRecord, PricedBatch, PricedQuote, audit_record
from pricer.settings import AuditDurability as Durability
from pricer.stores.memory import MemoryQuoteStore

# Imported from here by the server, the benchmarks and the tests.
__all__ = [
    "LOCK_FILE",
    "REPLAY_CHUNK",
    "REPLAY_CHUNK_ROWS",
    "AuditTrail",
    "QuoteSink",
    "Spool",
    "encode_record",
    "scan",
]

log = logging.getLogger("pricer.audit")


REPLAY_CHUNK = 64
# A replay chunk also stops at this many rows (one bigger batch still goes alone): its write's deadline
# is capped, and a chunk of 64 large spooled batches would not be written within it.
REPLAY_CHUNK_ROWS = 200_000
ADOPT_SECONDS = 5.0


def replay_chunks(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of batches (by their row counts) written together in a replay: at most
    REPLAY_CHUNK batches and REPLAY_CHUNK_ROWS rows, at least one batch."""
    chunks: list[tuple[int, int]] = []
    start = rows = 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= REPLAY_CHUNK or rows + size > REPLAY_CHUNK_ROWS):
            chunks.append((start, index))
            start, rows = index, 0
        rows += size
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


class AuditTrail:
    def __init__(
        self,
        sink: QuoteSink,
        *,
        spool: Spool,
        durability: Durability = Durability.MEMORY,
        recent_rows: int = 200_000,
        max_queue_rows: int = 2_000_000,
        max_write_rows: int = 200_000,
        retry_seconds: float = 0.5,
        linger_seconds: float = 0.02,
        adopt_seconds: float = ADOPT_SECONDS,
        journal_segment_bytes: int = JOURNAL_SEGMENT_BYTES,
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._recent = MemoryQuoteStore(recent_rows)
        # Each queued record with its journal segment (-1: not journaled).
        self._queue: deque[tuple[AuditRecord, int]] = deque()
        self._queued_rows = 0
        self._max_queue_rows = max_queue_rows
        self._max_write_rows = max_write_rows
        self._retry_seconds = retry_seconds
        self._linger_seconds = linger_seconds
        self._adopt_seconds = adopt_seconds
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._next_scan = 0.0  # loop time of the next look for dead processes' spools
        self._adopted: list[Adopted] = []
        self.durability = durability
        self.journal = (
            Journal(
                spool, self._enqueue, segment_bytes=journal_segment_bytes, remove=self._remove_journal_segment
            )
            if durability is Durability.DISK
            else None
        )
        # Disk reads, appends and fsyncs of the spool run on this thread, never on the loop.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-spool")
        self._unreplayable: set[Path] = set()  # files that could be neither replayed nor set aside
        self._writer = SinkWriter(sink, spool, retry_seconds=retry_seconds)
        self.written_rows = 0
        self.spooled_rows = 0
        self.unreadable_bytes = 0
        self.adopted_spools = 0

    # ---- QuoteStore ---------------------------------------------------------------------------

    async def add(self, batch: PricedBatch) -> None:
        # A single quote waits for its write as its columns: the batch and its arrays are freed now, by
        # the request that made them.
        record = audit_record(batch)
        while self._queued_rows >= self._max_queue_rows and not self._closing:
            self._room.clear()
            await self._room.wait()
        if self.journal is None:
            self._enqueue([record], -1)
        else:
            await self.journal.submit(record)  # on disk (fsynced) before the response
        # Readable here only once accepted: a quote the journal refused (503) is never served.
        self._recent.keep(record)

    def _enqueue(self, records: list[AuditRecord], segment: int) -> None:
        for record in records:
            self._queue.append((record, segment))
            self._queued_rows += record.size
        self._wakeup.set()

    async def get(self, quote_id: str) -> PricedQuote | None:
        return await self._recent.get(quote_id) or await self._sink.get(quote_id)

    # ---- state ---------------------------------------------------------------------------------

    @property
    def database_up(self) -> bool:
        return self._writer.database_up

    @property
    def dead_lettered_rows(self) -> int:
        return self._writer.dead_lettered_rows

    @property
    def queue_depth(self) -> int:
        """Positions accepted and waiting in memory for the database (journaled too in `disk` mode)."""
        return self._queued_rows

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def spool_pending(self) -> bool:
        """This process's spool, or an adopted one, holds records not yet in the database."""
        return self._spool.pending or bool(self._adopted)

    # ---- the writer ----------------------------------------------------------------------------

    def start(self) -> None:
        self._spool.open()
        try:
            self._adopt_orphans()  # at once: what dead processes left is pending from the start
        except OSError:
            log.exception("Audit spool replay error")  # the writer tries again at its next scan
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                await self._replay()
            except Exception:
                # Apart from the writes, so that a spool that cannot be replayed never stops the queue from
                # being written: new records keep reaching the database (or the spool).
                log.exception("Audit spool replay error")
                self._writer.next_attempt = loop.time() + self._retry_seconds
            try:
                if not self._queue:
                    # Sleep until records come, the next attempt at the database is due (with a backlog),
                    # or it is time to look for dead processes' spools.
                    wake = self._next_scan
                    if self.spool_pending:
                        wake = min(wake, self._writer.next_attempt)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, wake - loop.time())):
                            await self._wakeup.wait()
                self._wakeup.clear()
                if self._linger_seconds and not self._closing and self._queued_rows < self._max_write_rows:
                    # Group commit: a write costs a few round trips whatever its size, so the quotes of
                    # the next few milliseconds join this one (at 10^4 quotes/s, hundreds per write).
                    await asyncio.sleep(self._linger_seconds)
                await self._drain()
            except Exception:
                # The spool itself failed (disk full?): keep going; the queue holds the batches.
                log.exception("Audit writer error")
                await asyncio.sleep(self._retry_seconds)

    def _take(self) -> tuple[list[AuditRecord], list[int], int]:
        """The next write: queued records up to max_write_rows rows (at least one), their journal segments
        and their rows."""
        taken: list[AuditRecord] = []
        segments: list[int] = []
        rows = 0
        queue = self._queue
        while queue:
            size = queue[0][0].size
            if taken and rows + size > self._max_write_rows:
                break
            record, segment = queue.popleft()
            taken.append(record)
            segments.append(segment)
            rows += size
        return taken, segments, rows

    def _release(self, rows: int, segments: list[int]) -> None:
        self._queued_rows -= rows
        if self._queued_rows < self._max_queue_rows:
            self._room.set()
        if self.journal is not None:
            self.journal.done(segments)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batches, segments, rows = self._take()
            try:
                # With a backlog in the spool (the database away, or back and not replayed yet), or the
                # database found away and its next attempt not due, new records go straight to the spool:
                # nothing waits in memory for the next attempt (a SIGKILL would lose it).
                direct = self._spool.pending or (
                    not self._writer.database_up and loop.time() < self._writer.next_attempt
                )
                if not direct and await self._writer.write(batches):
                    self.written_rows += rows
                    self._release(rows, segments)
                    continue
                # Encoded, appended and fsynced on the spool's thread: the loop is not held meanwhile.
                # In `disk` mode without an fsync of its own: the records are in the journal, whose
                # segment is deleted only after the spool is flushed (_remove_journal_segment).
                append = functools.partial(self._spool.append, batches, sync=self.journal is None)
                await loop.run_in_executor(self._io, append)
            except BaseException:
                # Whatever failed (the spool, the dead-letter file), these records are known to be
                # nowhere else: back to the front of the queue, retried after the interval.
                self._queue.extendleft(reversed(list(zip(batches, segments, strict=True))))
                raise
            self.spooled_rows += rows
            self._release(rows, segments)

    def _remove_journal_segment(self, path: Path) -> None:
        """`disk` mode: a journal segment whose records are all in the database or the spool is deleted
        on the spool's thread, after the appends already submitted there and a flush of the spool."""

        def remove() -> None:
            self._spool.sync()
            remove_file(path)

        def failed(future: Future[None]) -> None:
            if (error := future.exception()) is not None:
                # Kept: the next process to adopt this directory replays it (idempotently).
                log.error(
                    "Audit journal segment kept", extra=fields(path=str(path), error=type(error).__name__)
                )

        self._io.submit(remove).add_done_callback(failed)

    def _adopt_orphans(self) -> None:
        self._next_scan = asyncio.get_running_loop().time() + self._adopt_seconds
        for adopted in self._spool.orphans():
            self._adopted.append(adopted)
            self.adopted_spools += 1
            log.info("Audit spool of a stopped process adopted", extra=fields(spool=str(adopted.directory)))

    async def _replay(self, *, now: bool = False) -> bool:
        """Replay this process's spool and the adopted ones, when an attempt is due; False when the
        database was found away."""
        loop = asyncio.get_running_loop()
        if now or loop.time() >= self._next_scan:
            self._adopt_orphans()
        if not self.spool_pending or (not now and loop.time() < self._writer.next_attempt):
            return True
        # A cheap query first: during an outage no segment is read only to find the database away.
        probe = await self._writer.probe()
        if probe is not None:
            self._writer.database_down(probe)
            return False
        # A file is kept (and the rest goes on) when its write failed on a record that fails every time
        # while nothing else was written since: the writes of the other files tell whether it is that
        # record (dead-lettered next time) or the database.
        kept = False
        # Closing the segment appended to now may flush it: on the spool's thread.
        for path in await loop.run_in_executor(self._io, self._spool.backlog):
            if path not in self._unreplayable and not await self._replay_file(path):
                if not self._writer.unproven:
                    return self._retry_later()
                kept = True
                continue
            self._spool.replayed(path)
        for adopted in list(self._adopted):
            complete = True
            for path in adopted.files():
                if path not in self._unreplayable and not await self._replay_file(path):
                    if not self._writer.unproven:
                        return self._retry_later()
                    kept, complete = True, False
            if complete:
                adopted.remove()
                self._adopted.remove(adopted)
        return self._retry_later() if kept else True

    def _retry_later(self) -> bool:
        self._writer.next_attempt = asyncio.get_running_loop().time() + self._retry_seconds
        return False

    async def _replay_file(self, path: Path) -> bool:
        """Write every readable record of a spool or journal file, then delete it; quarantine what cannot
        be read. False when the database is away (the file stays as it is). A file that cannot be read
        or finished for another reason (an I/O error, a full disk for the dead-letter file) is set aside
        whole, so that the rest of the trail goes on."""
        loop = asyncio.get_running_loop()
        try:
            # Read and decoded on the spool's thread (up to a whole segment): the loop is not held.
            data = await loop.run_in_executor(self._io, read_file, path)
            if data is None:
                return True
            decode = scan_legacy if path.name == LEGACY_FILE else scan
            found = await loop.run_in_executor(self._io, decode, data)
        except Exception as error:
            self._set_aside(path, error, replayed=0)
            return True
        batches = found.batches
        for start, end in replay_chunks([batch.size for batch in batches]):
            self._writer.unproven = False
            try:
                written = await self._writer.write(batches[start:end])
            except Exception as error:
                self._set_aside(path, error, replayed=start)
                return True
            if not written:
                return False
            if self._queue:
                # New records do not wait in memory for the whole replay (several segments, adopted
                # directories): between chunks they go to the database or the spool.
                await self._drain()
        try:
            if found.unreadable_bytes:
                self._quarantine(path, data, found)
            with contextlib.suppress(FileNotFoundError):
                await loop.run_in_executor(self._io, path.unlink)
        except Exception as error:
            self._set_aside(path, error, replayed=len(batches))
            return True
        log.info(
            "Audit spool replayed",
            extra=fields(
                path=str(path),
                batches=len(batches),
                rows=sum(batch.size for batch in batches),
                unreadable_bytes=found.unreadable_bytes,
            ),
        )
        return True

    def _set_aside(self, path: Path, error: Exception, *, replayed: int) -> None:
        """Rename a file that cannot be replayed into quarantine beside the spool directories (kept whole
        for the operator; a replay of it adds nothing twice), and go on without it."""
        target: Path | None = self._spool.root / f"quarantine-{path.parent.name}-{path.name}"
        assert target is not None
        try:
            os.rename(path, target)
            sync_directory(target.parent)
        except OSError:
            self._unreplayable.add(path)  # skipped from now on; stays where it is
            target = None
        log.error(
            "Audit spool file cannot be replayed; set aside, the rest of the trail goes on",
            extra=fields(
                path=str(path),
                error=type(error).__name__,
                replayed_batches=replayed,
                quarantine=str(target) if target else "left in place",
            ),
        )

    def _quarantine(self, path: Path, data: bytes, found: Scan) -> None:
        ranges = [*found.damaged, *([found.torn] if found.torn else [])]
        append_file(self._spool.quarantine_path, b"".join(data[start:end] for start, end in ranges))
        self.unreadable_bytes += found.unreadable_bytes
        log.error(
            "Audit spool bytes unreadable; quarantined, the records around them replayed",
            extra=fields(
                path=str(path),
                replayed_batches=len(found.batches),
                damaged_ranges=len(found.damaged),
                damaged_bytes=sum(end - start for start, end in found.damaged),
                torn_bytes=found.torn[1] - found.torn[0] if found.torn else 0,
                ranges=",".join(f"{start}+{end - start}" for start, end in ranges),
                quarantine=str(self._spool.quarantine_path),
            ),
        )

    async def close(self) -> None:
        """Drain everything queued to the database, else to the spool; then stop the writer. What stays
        in a spool (the database away) is adopted by the next process to start on the same directory."""
        self._closing = True
        self._room.set()
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self.journal is not None:
            await self.journal.flush()
        self._spool.open()
        try:
            # Records drained into the spool during a replay land in a new segment: a few rounds.
            for _ in range(3):
                if not await self._replay(now=True) or not self.spool_pending:
                    break
        except Exception:
            log.exception("Audit spool replay error")  # the queue still goes to the database or the spool
        await self._drain()
        if self.journal is not None:
            self.journal.close()
        self._io.shutdown(wait=True)
        for adopted in self._adopted:
            adopted.release()
        self._adopted.clear()
        self._spool.release()
