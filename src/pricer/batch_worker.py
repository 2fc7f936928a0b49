"""A batch worker process: runs the batch steps (`pricer.batches`) for the main process's event loop.

Started by `pricer.batch_pool.BatchPool` as `python -m pricer.batch_worker READ_FD WRITE_FD`. Requests and
replies are small pickled tuples on two pipes; the big data goes through files in the pool's scratch
directory (tmpfs: /dev/shm when there is one): the request body in, the priced columns and the encoded
response out. The worker holds one decoded batch between its `decode` and `price` requests, so that the
main process never receives a Python object per row.

The worker ignores SIGINT and SIGTERM: a stop signal sent to the whole process group (Ctrl+C, `tini -g`)
must not cut a batch in flight; the main process stops it when its own shutdown has drained (`None` on
the request pipe), and the worker also ends when that pipe closes (the main process is gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import numpy as np

from pricer.batches import DecodedBatch, decode_batch, encode_batch_parts, merge_errors, price_decoded
from pricer.errors import PricerError
from pricer.quotes import ROW_COLUMNS, PricedBatch, TickerRate, fallback_rows
from pricer.schemas import RowError

# How many row errors travel back to the main process (an atomic batch's 400 lists at most this many).
ERRORS_SHOWN = 1000

# Rates and row errors cross the pipes as msgpack, not pickle: pickling thousands of msgspec Structs (a
# batch over 5,000 tickers) costs milliseconds of the main process's GIL, msgpack a tenth of that.
_encoder = msgspec.msgpack.Encoder()
_rates_decoder = msgspec.msgpack.Decoder(list[TickerRate | None])
_errors_decoder = msgspec.msgpack.Decoder(list[RowError])


def encode_rates(rates: Sequence[TickerRate | None]) -> bytes:
    return _encoder.encode(rates)


def encode_errors(errors: Sequence[RowError]) -> bytes:
    return _encoder.encode(errors[:ERRORS_SHOWN])


def decode_errors(data: bytes) -> list[RowError]:
    return _errors_decoder.decode(data)


def _release_memory() -> Callable[[], None]:
    """glibc keeps freed heap memory (a 10^6-row batch's objects) in its arenas; giving it back after each
    batch keeps the worker's RSS at its idle size between batches, and giving it back while a response is
    written (`write_file`) keeps the response from being held twice, in the worker and in its file.

    glibc's own thresholds are kept: blocks of 1 MiB and more mapped each on its own (M_MMAP_THRESHOLD)
    gave each back as it was freed, but every NumPy temporary of a batch (8 MB per column) was then a
    fresh mapping to fault in and unmap: a third of a columnar batch's pricing and encoding time."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return lambda: None
    return lambda: trim(0) and None


# While a response is written, the memory of its written parts is given back every this many bytes.
RELEASE_EVERY_BYTES = 8 << 20


def write_file(path: str, parts: list[Any], release: Callable[[], None] | None = None) -> int:
    """Write buffers to a new file (refusing an existing one), letting go of each once written and calling
    `release` every `RELEASE_EVERY_BYTES` (a 10^6-row response is 250 MB: it is never held twice, in memory
    and in the file); return the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    total = 0
    unreleased = 0
    parts.reverse()
    try:
        while parts:
            part = parts.pop()
            with memoryview(part) as view, view.cast("B") as data:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            del part
            total += written
            unreleased += written
            if release is not None and unreleased >= RELEASE_EVERY_BYTES:
                release()
                unreleased = 0
    finally:
        os.close(fd)
    return total


def summary_of(decoded: DecodedBatch) -> tuple[Any, ...]:
    """What the main process needs of a decoded batch: never a per-row object."""
    return (
        decoded.form,
        decoded.client_id,
        decoded.count,
        decoded.tickers,
        len(decoded.errors),
        encode_errors(decoded.errors),
    )


def priced_header(batch: PricedBatch, rates: Sequence[TickerRate | None]) -> tuple[Any, ...]:
    """A priced batch without its row columns (those go through a file), its rates as their positions in
    `rates` (the list the main process sent: it has the same rates already)."""
    position = {id(rate): index for index, rate in enumerate(rates) if rate is not None}
    return (
        batch.batch_id,
        batch.calculated_at,
        batch.request_id,
        batch.client_id,
        batch.key_id,
        batch.fee_schedule,
        [position[id(rate)] for rate in batch.rates],
        batch.size,
    )


def price_and_encode(
    decoded: DecodedBatch, arguments: dict[str, Any]
) -> tuple[PricedBatch, list[RowError], list[bytes] | None, float]:
    """The batch priced (`price_decoded(decoded, **arguments["price"])`), every row error sorted by index,
    the encoded response as its parts (`encode_batch_parts(..., **arguments["encode"])`; None when
    `arguments["encode_with_errors"]` is false and a row is in error) and the pricing's seconds."""
    started = time.perf_counter()
    batch, unknown = price_decoded(decoded, **arguments["price"])
    seconds = time.perf_counter() - started
    errors = merge_errors(decoded.errors, unknown)
    body = None
    if arguments["encode_with_errors"] or not errors:
        body = encode_batch_parts(decoded, batch, errors, **arguments["encode"])
    return batch, errors, body, seconds


class Worker:
    def __init__(self) -> None:
        self.decoded: DecodedBatch | None = None
        self.release_memory = _release_memory()

    def handle(self, message: tuple[Any, ...]) -> tuple[Any, ...] | None:
        kind = message[0]
        if kind == "decode":
            _, path, media, max_batch_size = message
            self.decoded = None
            with open(path, "rb") as file:
                request_body = file.read()
            self.decoded = decode_batch(request_body, media, max_batch_size=max_batch_size)
            del request_body
            return ("decoded", summary_of(self.decoded))
        if kind == "price":
            _, arguments, rates_data, arrays_path, body_path = message
            decoded, self.decoded = self.decoded, None
            if decoded is None:
                raise RuntimeError("price without a decoded batch")
            rates = _rates_decoder.decode(rates_data)
            arguments["price"]["rates"] = rates
            outcome = price_and_encode(decoded, arguments)
            batch, errors, body, seconds = outcome
            write_file(arrays_path, [np.ascontiguousarray(getattr(batch, name)) for name in ROW_COLUMNS])
            body_size = None if body is None else write_file(body_path, body, self.release_memory)
            del body, outcome
            header = priced_header(batch, rates)
            fallback = fallback_rows(batch)
            return ("priced", header, len(errors), encode_errors(errors), body_size, seconds, fallback)
        if kind == "drop":
            self.decoded = None
            return None
        raise RuntimeError(f"unknown request {kind!r}")


def serve(requests: Connection, replies: Connection) -> None:
    worker = Worker()
    # No cyclic garbage collection during a batch: a decoded batch holds lists of 10^6 items, which every
    # full collection walks (about 10% of a columnar batch's time in the worker). What a batch leaves in
    # cycles is collected once it is done, after the reply.
    gc.disable()
    replies.send(("ready", os.getpid()))
    while True:
        try:
            message = requests.recv()
        except (EOFError, OSError):
            return  # the main process is gone
        if message is None:
            return
        try:
            reply = worker.handle(message)
        except PricerError as error:
            reply = ("error", error)
        except Exception:
            worker.decoded = None
            reply = ("crash", traceback.format_exc())
        if reply is not None:
            replies.send(reply)
        # After the reply: the batch's answer does not wait for the collection and the trim. Trimmed after
        # the decode too: the decoder's 10^6 objects are freed by then, and the pricing's peak starts lower.
        if worker.decoded is None:
            gc.collect()
        worker.release_memory()


# Niceness of a worker: a batch is throughput work, the main process's event loop is latency work (single
# quotes, /health, limiter calls). When both want the same CPU (a 2-core pod), the loop should win it.
WORKER_NICENESS = 10


def main(argv: list[str]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    requests = Connection(int(argv[1]), writable=False)
    replies = Connection(int(argv[2]), readable=False)
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(requests, replies)


if __name__ == "__main__":
    main(sys.argv)
