"""The audit trail's files (see `pricer.audit`): the per-process spool directories under their locks, their
adoption, and `disk` mode's journal. Their format (framed msgpack records) is `pricer.audit_format`'s."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pricer.audit_format import AppendOnlyFile, encode_record, remove_file, scan, sync_directory
from pricer.errors import ServiceUnavailable
from pricer.logs import fields
from pricer.quotes import AuditRecord, PricedBatch

log = logging.getLogger("pricer.audit")


PROCESS_PREFIX = "proc-"
SPOOL_PREFIX = "spool-"
SPOOL_SEGMENT_BYTES = 64 << 20
LEGACY_FILE = "audit-spool.bin"  # the one shared spool file of earlier versions, adopted on upgrade
JOURNAL_PREFIX = "journal-"
LOCK_FILE = "lock"
JOURNAL_SEGMENT_BYTES = 16 << 20


def record_files(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [
        directory / name
        for name in names
        if name == LEGACY_FILE or name.startswith((SPOOL_PREFIX, JOURNAL_PREFIX))
    ]


# ---- spool directories ---------------------------------------------------------------------------------


class Adopted:
    """Another (dead) process's spool directory, held under its lock until replayed and removed."""

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.directory = directory
        self._lock_fd: int | None = lock_fd

    def files(self) -> list[Path]:
        return record_files(self.directory)

    def remove(self) -> None:
        """Remove the (replayed) directory, then let go of its lock."""
        for path in (*record_files(self.directory), self.directory / LOCK_FILE):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # not empty: a file that could not be set aside; adopted again later
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class Spool:
    """This process's spool directory under `root` (AUDIT_SPOOL_DIR), held under an exclusive flock.

    It holds the outage spool (`spool-<n>.bin` segments, so that a replay holds at most one segment in
    memory) and, in `disk` mode, the journal segments. Made when first needed; `release` (graceful stop)
    removes it when nothing is left in it."""

    def __init__(self, root: Path, *, segment_bytes: int = SPOOL_SEGMENT_BYTES) -> None:
        self.root = root
        self.name = f"{PROCESS_PREFIX}{_safe(socket.gethostname())}-{os.getpid()}-{secrets.token_hex(4)}"
        self.directory = root / self.name
        self._segment_bytes = segment_bytes
        self._segment = 0
        self.quarantine_path = root / f"quarantine-{self.name}.bin"
        self.dead_letter_path = root / f"dead-letter-{self.name}.bin"
        self._lock_fd: int | None = None
        self._opening = threading.Lock()
        self._spool: AppendOnlyFile | None = None
        self._size = 0  # bytes appended to the segment appended to now
        self.syncs = 0  # appends fsynced
        self._backlog: list[Path] = []  # closed segments handed out for replay, not yet replayed
        self._unadoptable: set[str] = set()  # other directories found unadoptable (logged once)

    def open(self) -> None:
        """Make and lock this process's directory (once)."""
        with self._opening:  # the journal's thread may make it too
            if self._lock_fd is None:
                self._open()

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{self.name}"
        staging.mkdir()
        fd = os.open(staging / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, self.directory)
            sync_directory(self.root)
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd

    def append(self, batches: Sequence[AuditRecord], *, sync: bool = True) -> None:
        """Append (and fsync, unless `sync=False`: `disk` mode's records are in the journal already, and
        `sync` runs before a journal segment is deleted)."""
        payload = b"".join(encode_record(batch) for batch in batches)
        if self._spool is not None and self._spool.size >= self._segment_bytes:
            self._spool.close()
            self._spool = None
            self._segment += 1
        if self._spool is None:
            self.open()
            self._spool = AppendOnlyFile(self.path)
        self._spool.append(payload, sync=sync)
        self.syncs += sync
        self._size += len(payload)

    def sync(self) -> None:
        """Flush appends made with `sync=False` (a closed segment was flushed when it was closed)."""
        if self._spool is not None:
            self._spool.sync()

    @property
    def path(self) -> Path:
        """The spool segment appended to now."""
        return self.directory / f"{SPOOL_PREFIX}{self._segment:012d}.bin"

    def files(self) -> list[Path]:
        """This process's spool segments, oldest first."""
        return [path for path in record_files(self.directory) if path.name.startswith(SPOOL_PREFIX)]

    def read(self) -> list[PricedBatch]:
        """The records of this process's spool (what a replay would write)."""
        return [batch for path in self.files() for batch in scan(path.read_bytes()).batches]

    def backlog(self) -> list[Path]:
        """The segments to replay, oldest first. The segment appended to now is closed first, so that
        records spooled while the replay runs go to a new one (replayed next time), never into a file
        being replayed and deleted."""
        if self._size:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
            self._segment += 1
            self._size = 0
            self._backlog = self.files()
        return list(self._backlog)

    def replayed(self, path: Path) -> None:
        """A backlog segment is in the database (or set aside): it is no longer pending."""
        with contextlib.suppress(ValueError):
            self._backlog.remove(path)

    @property
    def pending(self) -> bool:
        return self._size > 0 or bool(self._backlog)

    def orphans(self) -> Iterator[Adopted]:
        """The other processes' directories whose lock this process can take: their owner is gone."""
        try:
            legacy = self._adopt_legacy()
        except OSError as error:
            legacy = None
            log.error(
                "Audit spool of an earlier version cannot be adopted; left in place",
                extra=fields(spool=str(self.root / LEGACY_FILE), error=type(error).__name__),
            )
        if legacy is not None:
            yield legacy
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return
        for name in names:
            staging = name.startswith(f".{PROCESS_PREFIX}")
            if not (staging or name.startswith(PROCESS_PREFIX)) or name == self.name:
                continue
            directory = self.root / name
            try:
                adopted = self._adopt(directory, staging=staging)
            except OSError as error:
                # One directory that cannot be opened or locked (another uid's lock, an I/O error, a
                # file where a directory belongs) must not stop the others from being adopted.
                if name not in self._unadoptable:
                    self._unadoptable.add(name)
                    log.error(
                        "Audit spool directory cannot be adopted; left in place",
                        extra=fields(spool=str(directory), error=type(error).__name__),
                    )
                continue
            if adopted is not None:
                yield adopted

    def _adopt(self, directory: Path, *, staging: bool) -> Adopted | None:
        """`directory` under its lock, when its owner is gone. A staging (dot) directory is adopted only
        when it holds records: the earlier version's spool moved in by an adopter that crashed before its
        second rename (a staging directory of `open` never holds any, and may be being made now)."""
        if staging and not record_files(directory):
            return None
        try:
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None  # alive
            raise
        if not directory.exists():  # removed by its adopter between our listing and our lock
            os.close(fd)
            return None
        return Adopted(directory, fd)

    def _adopt_legacy(self) -> Adopted | None:
        """An earlier version's `audit-spool.bin` (left by a stop during an outage, before an upgrade): moved
        into a directory of its own (one atomic rename: two adopters cannot both take it), then replayed as
        any dead process's directory."""
        legacy = self.root / LEGACY_FILE
        if not legacy.exists():
            return None
        name = f"{PROCESS_PREFIX}legacy-{secrets.token_hex(6)}"
        staging = self.root / f".{name}"
        staging.mkdir()
        fd = os.open(staging / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            os.rename(legacy, staging / LEGACY_FILE)
        except FileNotFoundError:  # another process took it first
            os.close(fd)
            (staging / LOCK_FILE).unlink()
            staging.rmdir()
            return None
        os.rename(staging, self.root / name)
        sync_directory(self.root)
        log.warning("Audit spool of an earlier version adopted", extra=fields(spool=str(self.root / name)))
        return Adopted(self.root / name, fd)

    def release(self, *, remove: bool = True) -> None:
        """Close the files and let go of the lock; the directory is removed first when nothing is left in
        it (else the next process to start adopts it)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._lock_fd is None:
            return
        if remove and not record_files(self.directory):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / LOCK_FILE).unlink()
            with contextlib.suppress(OSError):
                self.directory.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in name)[:64] or "host"


class Journal:
    """`disk` durability: this process's write-ahead journal, segment by segment, group-committed.

    `submit` hands a record over; a thread of its own appends everything submitted meanwhile in one write
    and one fsync, then gives the records to `on_durable` (the writer's queue) with their segment, and only
    then resolves the submitters' futures. A request cancelled while it waits therefore still has its record
    written to the database. `done` counts records of a segment that reached the database (or the spool);
    a full segment whose records are all done is deleted."""

    def __init__(
        self,
        spool: Spool,
        on_durable: Callable[[list[AuditRecord], int], None],
        *,
        segment_bytes: int = JOURNAL_SEGMENT_BYTES,
        remove: Callable[[Path], None] | None = None,
    ) -> None:
        self._spool = spool
        self._on_durable = on_durable
        self.remove_file = remove or remove_file
        self._segment_bytes = segment_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-journal")
        self._waiting: list[tuple[AuditRecord, bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._segment = 0
        self._file: AppendOnlyFile | None = None
        self._open: dict[int, int] = {}  # segment -> records not yet done
        self.fsyncs = 0

    def submit(self, record: AuditRecord) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((record, encode_record(record), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            waiting, self._waiting = self._waiting, []
            try:
                segment = self._rotate()
                payload = b"".join(w[1] for w in waiting)
                # Opening a segment fsyncs the directory: on the journal's thread too, not on the loop.
                await loop.run_in_executor(self._executor, self._append, payload)
            except Exception as error:
                # Nothing of this write is acknowledged: the requests fail (503) rather than answer a
                # quote that is not on disk.
                log.error(
                    "Audit journal write failed",
                    extra=fields(path=str(self._spool.directory), error=type(error).__name__),
                )
                for _, _, future in waiting:
                    if not future.done():
                        future.set_exception(ServiceUnavailable("The audit journal is unavailable"))
                continue
            self.fsyncs += 1
            self._open[segment] = self._open.get(segment, 0) + len(waiting)
            self._on_durable([w[0] for w in waiting], segment)
            for _, _, future in waiting:
                if not future.done():
                    future.set_result(None)

    def _rotate(self) -> int:
        """The segment the next append goes to (on the loop: the segment counts are the loop's)."""
        if self._file is not None and self._file.size >= self._segment_bytes:
            self._file.close()
            self._file = None
            self._delete_if_done(self._segment)
            self._segment += 1
        return self._segment

    def _append(self, payload: bytes) -> None:
        """On the journal's thread: append to the current segment, made (and its directory synced) first
        if need be."""
        if self._file is None:
            self._spool.open()
            self._file = AppendOnlyFile(self._spool.directory / f"{JOURNAL_PREFIX}{self._segment:012d}.bin")
        self._file.append(payload)

    def done(self, segments: Sequence[int]) -> None:
        for segment in segments:
            if segment < 0:
                continue
            self._open[segment] -= 1
            if segment != self._segment or self._file is None:
                self._delete_if_done(segment)

    def _delete_if_done(self, segment: int) -> None:
        if self._open.get(segment, 0) == 0:
            self._open.pop(segment, None)
            self.remove_file(self._spool.directory / f"{JOURNAL_PREFIX}{segment:012d}.bin")

    async def flush(self) -> None:
        """Wait until everything submitted is on disk (and queued for the database)."""
        while self._flusher is not None and not self._flusher.done():
            await self._flusher

    def close(self) -> None:
        """After the final drain: close the current segment, deleting it when every record is done."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._delete_if_done(self._segment)
        self._executor.shutdown(wait=True)
