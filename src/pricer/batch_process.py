"""The main process's side of a batch worker (see `pricer.batch_pool`): the process and its pipes, and the
response streamed from the file a worker wrote."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pricer.releaser import close_later, unlink

PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
RESPONSE_CHUNK_BYTES = 256 << 10  # per loop turn: about a hundred µs of copying and socket work


class WorkerDied(Exception):
    """The worker's pipe closed: the process is gone."""


class WorkerProcess:
    """One worker process and its two pipes. Spawned with posix_spawn and reaped by pid (no Popen: an app
    that is never shut down, as in tests of logic, leaves a worker that exits when its pipe closes)."""

    def __init__(self) -> None:
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        for fd in (to_worker_write, from_worker_write):
            # A batch's rates (about 1.2 MB for 5,000 tickers) cross in one or two writes instead of a
            # wake-up of the reader per 64 KiB (the default); past the system's limit the default stays.
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            for fd in (to_worker_read, from_worker_write):
                os.set_inheritable(fd, True)
            argv = [sys.executable, "-m", "pricer.batch_worker", str(to_worker_read), str(from_worker_write)]
            self.pid = os.posix_spawn(sys.executable, argv, os.environ)
        except BaseException:
            for fd in (to_worker_write, from_worker_read):
                os.close(fd)
            raise
        finally:
            os.close(to_worker_read)
            os.close(from_worker_write)
        self.requests = Connection(to_worker_write, readable=False)
        self.replies = Connection(from_worker_read, writable=False)
        self.reaped = False
        # Pipe calls run on threads, and a request cancelled meanwhile kills and closes the worker: its
        # descriptors are closed by the last thread out, never under a thread (the number could be reused
        # by a socket or a scratch file, and the rest of a message written into it).
        self._io_lock = threading.Lock()
        self._in_io = 0
        self._closed = False

    async def call(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        # Sent from a thread: a message larger than the pipe's buffer (a batch's rates: about 1.2 MB for
        # 5,000 tickers) blocks the writer until the worker has read it, and the worker runs niced (10-18 ms
        # of the loop's time measured when it was sent from the loop).
        await asyncio.to_thread(self.send, message)
        return await asyncio.to_thread(self.receive)

    def send(self, message: tuple[Any, ...] | None) -> None:
        self._pipe_call(self.requests.send, message)

    def receive(self) -> tuple[Any, ...]:
        """The worker's next reply (blocking: run on a thread)."""
        reply: tuple[Any, ...] = self._pipe_call(self.replies.recv)
        return reply

    def _pipe_call(self, call: Any, *args: Any) -> Any:
        with self._io_lock:
            if self._closed:
                raise WorkerDied("the worker's pipes are closed")
            self._in_io += 1
        try:
            return call(*args)
        except (EOFError, OSError) as error:
            raise WorkerDied from error
        finally:
            with self._io_lock:
                self._in_io -= 1
                last_out = self._closed and not self._in_io
            if last_out:
                self._close_pipes()

    def kill(self) -> None:
        if not self.reaped:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        with self._io_lock:
            self._closed = True
            if self._in_io:
                return  # the thread in a pipe call closes them when it returns (SIGKILL ends its wait)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for connection in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                connection.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Reap the process (blocking: run on a thread); False if it is still running after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.reaped:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG if deadline is not None else 0)
            except ChildProcessError:
                pid = self.pid
            if pid == self.pid:
                self.reaped = True
            elif deadline is not None and time.monotonic() >= deadline:
                return False
            elif deadline is not None:
                time.sleep(0.02)
        return True


class StreamedFileResponse(Response):
    """A response body read from an open file in chunks as the client takes them (flow control is the
    server's: `send` waits while the transport's buffer is full). The file is closed at the end."""

    def __init__(self, fd: int, size: int, content_type: bytes) -> None:
        self.status_code = 200
        self.background = None
        self.body = b""
        self._fd = fd
        self._size = size
        self.raw_headers = [(b"content-type", content_type), (b"content-length", str(size).encode())]

    @classmethod
    def of(cls, path: Path, size: int, content_type: bytes) -> StreamedFileResponse:
        """The response of the file at `path`, unlinked at once (the open descriptor keeps its data until
        the response has been sent)."""
        fd = os.open(path, os.O_RDONLY)
        unlink(path)
        return cls(fd, size, content_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            offset = 0
            while offset < self._size:
                data = os.pread(self._fd, min(RESPONSE_CHUNK_BYTES, self._size - offset), offset)
                if not data:
                    raise OSError(f"batch response file ended at {offset} of {self._size} bytes")
                offset += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": offset < self._size})
                # The server's `send` returns without a loop turn while the socket takes the data (a
                # client reading as fast as loopback goes): without this, tens of chunks went in one
                # turn (50-120 ms of the loop measured during 10^6-row batches).
                await asyncio.sleep(0)
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            close_later(self._fd)  # the last descriptor of an unlinked file: its pages are freed
            self._fd = -1

    def __del__(self) -> None:
        self.close()


__all__ = ["RESPONSE_CHUNK_BYTES", "StreamedFileResponse", "WorkerDied", "WorkerProcess"]
