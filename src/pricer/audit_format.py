"""The audit trail's file format (see `pricer.audit`): framed msgpack records, read past damage, and the
append-only files that hold them.

Every file is a sequence of frames: magic, payload length, CRC32 of the payload, payload (a msgpack
`QuoteColumns`, the columns of one priced batch). `scan` reads past damage: a torn tail is reported as
such, a damaged frame is skipped by resynchronising on the next valid one, and the exact byte ranges that
could not be read are returned.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgspec

from pricer.quotes import AuditRecord, PricedBatch, QuoteColumns, batch_from_columns, batch_to_columns

# magic, payload length, CRC32 of the payload
_HEADER = struct.Struct(">4sII")
MAGIC = b"PRA\x01"
_MAX_PAYLOAD = 1 << 31


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(QuoteColumns)


def encode_record(record: AuditRecord) -> bytes:
    """The framed spool record of one batch or single quote."""
    columns = record if isinstance(record, QuoteColumns) else batch_to_columns(record)
    return frame(_ENCODER.encode(columns))


# What decode_record raises for a payload it cannot read.
_UNREADABLE = (msgspec.DecodeError, msgspec.ValidationError, ValueError, OverflowError)


def decode_record(payload: bytes | memoryview) -> PricedBatch:
    """The batch of one record's payload; raises msgspec.DecodeError, msgspec.ValidationError, ValueError
    or OverflowError (a value beyond int64) for a payload this version cannot read."""
    return batch_from_columns(_DECODER.decode(payload))


def _frame_end(data: bytes, view: memoryview, offset: int) -> int:
    """Where the whole, intact frame starting at `offset` ends; 0 when none starts there; -1 when one starts
    there but the data ends before it does (a torn tail)."""
    if len(data) - offset < _HEADER.size:
        return -1 if MAGIC.startswith(data[offset : offset + len(MAGIC)]) else 0
    magic, length, crc = _HEADER.unpack_from(data, offset)
    if magic != MAGIC or length > _MAX_PAYLOAD:
        return 0
    end: int = offset + _HEADER.size + length
    if end > len(data):
        return -1
    if zlib.crc32(view[offset + _HEADER.size : end]) != crc:
        return 0
    return end


def _next_frame(data: bytes, view: memoryview, start: int) -> int | None:
    position = start
    while (position := data.find(MAGIC, position)) >= 0:
        if _frame_end(data, view, position) > 0:
            return position
        position += 1
    return None


class Scan(NamedTuple):
    """What a spool file holds: the records read, and the byte ranges that could not be."""

    batches: list[PricedBatch]
    damaged: list[tuple[int, int]]  # (start, end): skipped in the middle, or undecodable
    torn: tuple[int, int] | None  # a frame cut short at the end of the file
    end: int  # where the last intact frame ends

    @property
    def unreadable_bytes(self) -> int:
        torn = self.torn[1] - self.torn[0] if self.torn else 0
        return torn + sum(end - start for start, end in self.damaged)


def scan(data: bytes) -> Scan:
    """Every intact record of `data`, resynchronising on the next valid frame after damage."""
    view = memoryview(data)
    batches: list[PricedBatch] = []
    damaged: list[tuple[int, int]] = []
    torn: tuple[int, int] | None = None
    offset = last = 0
    try:
        while offset < len(data):
            end = _frame_end(data, view, offset)
            if end > 0:
                try:
                    batches.append(decode_record(view[offset + _HEADER.size : end]))
                except _UNREADABLE:
                    damaged.append((offset, end))  # intact bytes this version cannot read
                offset = last = end
                continue
            following = _next_frame(data, view, offset + 1)
            if following is None:
                if end < 0:
                    torn = (offset, len(data))
                else:
                    damaged.append((offset, len(data)))
                break
            damaged.append((offset, following))
            offset = following
    finally:
        view.release()
    return Scan(batches, damaged, torn, last)


class AppendOnlyFile:
    """One append-only file of frames. An append is fsynced before it returns; a failed one is cut off, so
    that the next starts where the last whole frame ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self.size = os.fstat(self._fd).st_size
        self.unsynced = False  # appended with sync=False since the last fsync
        self.syncs = 0
        sync_directory(path.parent)  # the new name must survive a power loss, not only its bytes

    def append(self, data: bytes, *, sync: bool = True) -> None:
        """`sync=False`: the data is durable elsewhere already (the journal); `sync` (or `close`) flushes
        it before that copy may go."""
        try:
            written = 0
            with memoryview(data) as view:
                while written < len(data):
                    written += os.pwrite(self._fd, view[written:], self.size + written)
            if sync:
                _datasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise
        self.size += len(data)
        self.unsynced = not sync
        self.syncs += sync

    def sync(self) -> None:
        if self.unsynced:
            _datasync(self._fd)
            self.unsynced = False
            self.syncs += 1

    def close(self) -> None:
        try:
            self.sync()
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)


def sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fdatasync flushes the data and the new size, not the times: about a quarter less CPU than fsync.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def append_file(path: Path, data: bytes) -> None:
    created = not path.exists()
    with path.open("ab") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    if created:
        sync_directory(path.parent)  # the new name must survive a power loss, not only its bytes


def read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


_LEGACY_LENGTH = struct.Struct(">I")


def scan_legacy(data: bytes) -> Scan:
    """The spool format before per-process directories: length-prefixed records, no magic or checksum,
    so nothing can be read past the first bad record (the rest is reported as damaged)."""
    batches: list[PricedBatch] = []
    offset = 0
    while offset + _LEGACY_LENGTH.size <= len(data):
        (length,) = _LEGACY_LENGTH.unpack_from(data, offset)
        start = offset + _LEGACY_LENGTH.size
        if start + length > len(data):
            break
        try:
            batches.append(decode_record(data[start : start + length]))
        except _UNREADABLE:
            break
        offset = start + length
    damaged = [(offset, len(data))] if offset < len(data) else []
    return Scan(batches, damaged, None, offset)


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
