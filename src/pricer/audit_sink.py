"""The audit trail's writes to the database (see `pricer.audit`): `SinkWriter` writes records to the sink,
tells a database that is away from a record it fails on every time (by a probe query, then by cutting the
write in halves), and moves the records the database refuses for good to the dead-letter file."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from pricer.audit_format import append_file, encode_record
from pricer.audit_spool import Spool
from pricer.deadline import within
from pricer.errors import InvalidParameter
from pricer.logs import fields
from pricer.quotes import QUOTE_ID_LENGTH, AuditRecord, PricedQuote

log = logging.getLogger("pricer.audit")

POISON_ATTEMPTS = 3  # writes failing while the database answers a probe, before the record is looked for
# A database that answers nothing (hung, partitioned) is given up on after these, as one that refuses
# connections is at once; otherwise the records would wait in memory for the driver's timeouts (30 s per
# query, 60 s per connection attempt), and a graceful shutdown with them, past the pod's grace period.
# A write's deadline grows with its rows (about ten times what a loaded database takes), up to a cap, so
# that a graceful stop with the database hung (one write in flight, one replay chunk, one drain) stays
# well inside the pod's 45 s grace period.
PROBE_TIMEOUT_SECONDS = 2.0
WRITE_TIMEOUT_SECONDS = 5.0
WRITE_TIMEOUT_SECONDS_PER_ROW = 20e-6
WRITE_TIMEOUT_MAX_SECONDS = 12.0
_PROBE_QUOTE_ID = "0" * QUOTE_ID_LENGTH


def write_deadline(rows: int) -> float:
    """Seconds a write of `rows` rows is given before the database counts as away."""
    return min(WRITE_TIMEOUT_SECONDS + WRITE_TIMEOUT_SECONDS_PER_ROW * rows, WRITE_TIMEOUT_MAX_SECONDS)


class QuoteSink(Protocol):
    """Where the trail is written for good (PostgreSQL). `write` is idempotent on quote id."""

    async def write(self, batches: Sequence[AuditRecord]) -> None: ...

    async def get(self, quote_id: str) -> PricedQuote | None: ...


class WriteTimedOut(Exception):
    """The database did not finish a write within its deadline: away, as far as the trail is concerned."""


def _refused(error: Exception) -> bool:
    """A write error that retrying cannot fix: the database rejected a value, or the record is malformed."""
    return isinstance(error, InvalidParameter | ValueError | TypeError | OverflowError)


class SinkWriter:
    """The trail's writes to `sink`; `database_up` and `next_attempt` (loop time) say whether and when the
    database is worth trying again."""

    def __init__(self, sink: QuoteSink, spool: Spool, *, retry_seconds: float) -> None:
        self._sink = sink
        self._spool = spool
        self._retry_seconds = retry_seconds
        self._writes_ok = 0  # successful writes so far
        self.unproven = False  # the last failed write kept a record that only fails, the database up
        self._failing: dict[str, int] = {}  # batch id -> _writes_ok when its write first kept failing
        self.database_up = True
        self.next_attempt = 0.0  # loop time of the next attempt to reach the database with a backlog
        self.dead_lettered_rows = 0

    async def write(self, batches: Sequence[AuditRecord]) -> bool:
        """Write to the database: True once done (records it refuses for good are dead-lettered), False
        when it cannot be reached (the next attempt is then due after the retry interval).

        A server error that is not a refusal (SQLSTATE 54000, XX000...) may be the database failing or one
        record that makes it fail every time. A probe query tells them apart: a write that fails
        POISON_ATTEMPTS times while the database answers the probe is cut in halves until the record is
        found, and that record is dead-lettered if another write has succeeded since it first failed (if
        none has, the database itself may refuse writes -- read-only after a failover? -- and everything
        is kept; the next write with other records in it settles it)."""
        suspects: list[tuple[AuditRecord, Exception]] = []
        if not await self._write_part(batches, suspects):
            return False
        for record, error in suspects:
            if self._failing.get(record.batch_id, self._writes_ok) >= self._writes_ok:
                self.unproven = True  # a replay goes on with its other files, which may settle it
                self.database_down(error)
                return False
        for record, error in suspects:
            self.dead_letter(record, error)
            self._failing.pop(record.batch_id, None)
        return True

    async def _write_part(
        self, batches: Sequence[AuditRecord], suspects: list[tuple[AuditRecord, Exception]]
    ) -> bool:
        """`_write` of a part: refused records dead-lettered, records failing with a server error every
        time added to `suspects`; False when the database is away."""
        error = await self._attempt(batches)
        if error is None:
            return True
        if isinstance(error, WriteTimedOut):
            # Not a record's fault: spooled and replayed later (a probe would only wait again).
            self.database_down(error)
            return False
        if not _refused(error):
            for attempt in range(POISON_ATTEMPTS):
                probe = await self.probe()
                if probe is not None:
                    self.database_down(probe)
                    return False
                if attempt == POISON_ATTEMPTS - 1:
                    break
                error = await self._attempt(batches)  # a transient error passes on a retry
                if error is None:
                    return True
            if len(self._failing) > 65_536:
                self._failing.clear()
            for batch in batches:
                self._failing.setdefault(batch.batch_id, self._writes_ok)
            if len(batches) == 1:
                suspects.append((batches[0], error))
                return True
        elif len(batches) == 1:
            self.dead_letter(batches[0], error)
            return True
        middle = len(batches) // 2  # find the failing ones
        return await self._write_part(batches[:middle], suspects) and await self._write_part(
            batches[middle:], suspects
        )

    async def _attempt(self, batches: Sequence[AuditRecord]) -> Exception | None:
        seconds = write_deadline(sum(batch.size for batch in batches))
        try:
            await within(seconds, self._sink.write(batches))
        except TimeoutError:
            return WriteTimedOut(f"no answer within {seconds:.1f} s")
        except Exception as error:
            return error
        self.database_up = True
        self._writes_ok += 1
        return None

    async def probe(self) -> Exception | None:
        """A cheap query (a quote id no batch has): None when the database answers, else its error."""
        try:
            await within(PROBE_TIMEOUT_SECONDS, self._sink.get(_PROBE_QUOTE_ID))
        except Exception as error:
            return error
        return None

    def dead_letter(self, record: AuditRecord, error: Exception) -> None:
        self._spool.open()
        append_file(self._spool.dead_letter_path, encode_record(record))
        self.dead_lettered_rows += record.size
        log.error(
            "Audit record refused by the database; moved to the dead-letter file",
            extra=fields(
                batch_id=record.batch_id,
                rows=record.size,
                error=type(error).__name__,
                reason=str(error),
                path=str(self._spool.dead_letter_path),
            ),
        )

    def database_down(self, error: Exception) -> None:
        if self.database_up:
            log.error("Backend service error", extra=fields(service="audit", error=type(error).__name__))
        self.database_up = False
        self.next_attempt = asyncio.get_running_loop().time() + self._retry_seconds
