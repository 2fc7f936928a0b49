"""The draining shutdown: of one server (`DrainingServer`) and of several workers (`Supervisor`).

- `DrainingServer`: on SIGTERM /health answers 503 for SHUTDOWN_DRAIN_SECONDS while requests are served,
  every response in that time carries `Connection: close` (clients reconnect elsewhere before the listener
  closes), then the listener closes, in-flight requests finish and the lifespan shutdown runs (exit 0).
  A repeat of the stop signal is ignored; the other stop signal ends the drain early, never the shutdown.
- `Supervisor`: uvicorn's multiprocess supervisor (a dead worker is replaced) whose workers are
  `DrainingServer`s; on SIGTERM (SIGINT) every worker gets the same signal and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from asyncio.events import TimerHandle
from types import FrameType

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from pricer.logs import fields
from pricer.protocol import DrainingState

log = logging.getLogger("pricer.server")


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or SIGINT): /health answers 503 for the drain period while requests are still served
    (the readiness probe takes the pod out) and every response closes its connection; then uvicorn closes
    the listener, lets in-flight requests finish and runs the lifespan shutdown (the audit queue flushes).

    Once stopping, a repeat of the signal that started the stop is ignored: the same stop delivered twice
    (an init that signals the process group, such as `tini -g`, plus the supervisor's forward; Ctrl+C on a
    terminal reaching the whole group) must not cut the drain short. The other stop signal during the
    drain ends the drain at once (a way to hurry a stop); the shutdown after it is still graceful:
    in-flight requests finish and the lifespan shutdown runs. No signal skips the lifespan shutdown
    (uvicorn's force exit on a second SIGINT would leave the audit queue unflushed): SIGKILL is the way
    to force, at the cost of what is still in memory."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.server_state: DrainingState = DrainingState()
        self._drain_seconds: float = getattr(config, "drain_seconds", 0.0)
        self._draining = False
        self._stop_signal: int | None = None  # the signal that started the stop
        self._drain_timer: TimerHandle | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_signal is not None:
            self._repeated(sig)
            return
        self._stop_signal = sig
        if self._drain_seconds <= 0 or not self.started:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.server_state.draining = True
        app = self.config.loaded_app
        lifecycle = getattr(app, "lifecycle", None)
        if lifecycle is not None:
            lifecycle.draining = True
        log.info("Draining before shutdown", extra=fields(seconds=self._drain_seconds))
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        # Requests already past their headers close their connection after their response too.
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_started:
                cycle.keep_alive = False
        if not self.should_exit:
            loop = asyncio.get_event_loop()
            self._drain_timer = loop.call_later(self._drain_seconds, self._stop_after_drain)

    def _stop_after_drain(self) -> None:
        """The drain is over (or cut short): uvicorn's shutdown runs. Not through `handle_exit`: a
        drained shutdown is a clean exit (status 0; uvicorn would re-raise a signal it recorded), and a
        SIGINT recorded there would turn into a force exit that skips the lifespan shutdown."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self.should_exit = True

    def _repeated(self, sig: int) -> None:
        """A signal after the one that started the stop (run as a signal handler: loop work is deferred)."""
        name = signal.Signals(sig).name
        if sig == self._stop_signal or not self._draining or self.should_exit:
            log.info("Stop signal repeated: ignored", extra=fields(signal=name))
            return
        log.info("Drain ended early by a second signal", extra=fields(signal=name))
        asyncio.get_event_loop().call_soon_threadsafe(self._stop_after_drain)


class _DrainingProcess(Process):
    """A worker process whose server drains on SIGTERM."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's supervisor (workers pinged every half second; a dead or hung one is replaced) with
    draining workers. On SIGTERM/SIGINT every worker gets the same signal and drains; the parent closes
    its copy of the listening socket at once, so that the listener closes when the last worker closes it."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.failed = False
        self._signalled: set[int] = set()
        # uvicorn queues signals for a loop that looks every half second; SIGTERM/SIGINT also reach the
        # workers at once, so that every worker starts its drain when the pod is told to stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward_stop)

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = _DrainingProcess(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == 3:  # uvicorn's STARTUP_FAILURE: would fail again on every restart
                log.error("Worker failed to start, stopping", extra=fields(pid=process.pid))
                self.failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning(
                "Worker died, starting another", extra=fields(pid=process.pid, exitcode=process.exitcode)
            )
            replacement = _DrainingProcess(self.config, self.sockets)
            replacement.start()
            self.processes[index] = replacement

    def _forward_stop(self, sig: int, frame: FrameType | None) -> None:
        """The same signal, once per worker: a worker that also got it directly (an init signalling the
        process group, Ctrl+C on a terminal) takes the forward for a repeat and ignores it."""
        self.signal_queue.append(sig)
        for process in self.processes:
            pid = process.pid
            if pid is not None and pid not in self._signalled and process.exitcode is None:
                self._signalled.add(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)

    def terminate_all(self) -> None:
        log.info("Stopping workers", extra=fields(workers=len(self.processes)))
        # The parent's copy of the listening socket closes now; the listener closes when the last
        # draining worker closes its own copy.
        for sock in self.sockets:
            sock.close()
        for process in self.processes:
            if process.pid not in self._signalled:  # already told (a repeat would be ignored anyway)
                process.terminate()

    def handle_hup(self) -> None:
        log.warning("SIGHUP ignored: restart the pod (or the process) to reload")

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN ignored: the number of workers is WORKERS")

    def handle_ttou(self) -> None:
        log.warning("SIGTTOU ignored: the number of workers is WORKERS")
