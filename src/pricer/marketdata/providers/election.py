"""Which replica runs the refresher: one per deployment (DESIGN §3.1).

With PostgreSQL the replicas elect it with a session-level advisory lock held on a connection of its own
(not a pool connection: the lock lives exactly as long as that session). The holder checks its session
every `check_seconds`; if the check fails it stops refreshing at once. When the holder dies (SIGKILL, a
crash, a partition) PostgreSQL ends its session (the socket closes; for a silent partition, TCP
keep-alives end it) and releases the lock; the other replicas try to take it every `check_seconds`, so
the next one takes over within about that time plus a refresh. Without PostgreSQL each process is on its
own (`SoleRefresher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]

from pricer.logs import fields

log = logging.getLogger("pricer.sources")


class Election(Protocol):
    @property
    def is_leader(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class SoleRefresher:
    """No shared database: this process refreshes (each replica on its own)."""

    @property
    def is_leader(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def refresher_lock_key(schema: str | None) -> int:
    digest = hashlib.sha256(f"pricer.sources.refresher:{schema or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AdvisoryLockElection:
    def __init__(self, dsn: str, *, schema: str | None, check_seconds: float) -> None:
        self._dsn = dsn
        self._key = refresher_lock_key(schema)
        self._check = check_seconds
        self._connection: Any = None
        self._leader = False
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database away: not the refresher until it is back
                if self._leader:
                    log.warning("Refresher lock lost", extra=fields(error=type(error).__name__))
                self._leader = False
                await self._drop()
            await asyncio.sleep(self._check)

    async def _step(self) -> None:
        timeout = max(1.0, self._check)
        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(
                self._dsn, timeout=timeout, server_settings={"application_name": "pricer-refresher"}
            )
            self._leader = False
        if self._leader:
            await self._connection.fetchval("SELECT 1", timeout=timeout)
            return
        if await self._connection.fetchval("SELECT pg_try_advisory_lock($1)", self._key, timeout=timeout):
            self._leader = True
            log.info("Refresher elected", extra=fields(lock=self._key))

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.terminate()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._leader = False
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2.0)  # ends the session: the lock goes with it
