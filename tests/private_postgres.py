"""A private PostgreSQL 15 on a free loopback port, for tests that stop a database on purpose.

The shared server on 5432 is never touched: each instance is a cluster of its own (`initdb` into a fresh
temporary directory, trust authentication, no fsync), started and stopped with `pg_ctl` on its own data
directory, and removed afterwards. `initdb` and `postgres` refuse to run as root, so when the tests run
as root the binaries run as the `postgres` OS user (`runuser -u postgres --`), with the directory chowned
to it. The directory is made with `tempfile.mkdtemp` under the system temp folder rather than under
pytest's `tmp_path`, whose parents only root may enter.

    with PrivatePostgres() as pg:
        pg.dsn          # postgresql://postgres@127.0.0.1:<port>/postgres
        pg.stop()       # pg_ctl stop -m fast (clients see their connections end)
        pg.start()      # the same directory and port again
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

PG_BIN = Path(os.environ.get("PRICER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"


class PrivatePostgres:
    def __init__(self, port: int | None = None) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).exists():
                raise RuntimeError(f"{PG_BIN / tool} is missing (PostgreSQL 15 server binaries)")
        self.port = port if port is not None else free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="pricer-private-pg-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            user = pwd.getpwnam(OS_USER)
            os.chown(self.directory, user.pw_uid, user.pw_gid)
        self._initialised = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", OS_USER, "--"] if self._as_root else []
        return subprocess.run(
            [*prefix, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.directory,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(
                f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log[-4000:]}"
            )

    def init(self) -> None:
        result = self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"
        )
        self._check(result, "initdb")
        self._initialised = True

    def start(self, timeout: float = 30) -> PrivatePostgres:
        """Start (initialising the cluster the first time) and wait until it accepts connections."""
        if not self._initialised:
            self.init()
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        result = self._run(
            str(PG_BIN / "pg_ctl"),
            "start",
            "-w",
            "-t",
            str(int(timeout)),
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            options,
            timeout=timeout + 10,
        )
        self._check(result, "pg_ctl start")
        return self

    def stop(self, mode: str = "fast") -> None:
        result = self._run(str(PG_BIN / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.data))
        self._check(result, "pg_ctl stop")

    @property
    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
            os.kill(pid, 0)
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            return None
        return pid

    def _processes(self) -> list[int]:
        """The postmaster and its children (the backends holding the clients' connections)."""
        pid = self._postmaster_pid()
        if pid is None:
            return []
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]

    def pause(self) -> None:
        """SIGSTOP to every process of the server: a hung database (connections stay open, nothing is
        answered, new connections wait in the listen backlog) until `resume`."""
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        """Stop the server if it runs (fast, then immediate, then its own postmaster by pid) and remove
        its directory."""
        self.resume()
        if self.running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("fast")
        if self.running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            return self.start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()
