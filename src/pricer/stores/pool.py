"""A database pool opened in the app's lifespan: asyncpg pools need a running event loop, while the
stores are built with the app."""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]

from pricer.deadline import within
from pricer.errors import ServiceUnavailable
from pricer.stores.postgres.common import keep_session, quote_identifier, translate_errors, valid_schema_name

CLOSE_TIMEOUT_SECONDS = 2.0


class DeferredPool:
    def __init__(self, dsn: str, *, schema: str | None, max_size: int) -> None:
        if schema is not None and not valid_schema_name(schema):
            raise ValueError(f"schema name {schema!r} is not a plain identifier")
        self._dsn = dsn
        self._schema = schema
        self._max_size = max_size
        self._pool: Any = None

    async def open(self) -> None:
        server_settings = {"application_name": "pricer", "jit": "off"}
        if self._schema is not None:
            server_settings["search_path"] = quote_identifier(self._schema)
        with translate_errors("connect"):
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=2,
                max_size=self._max_size,
                server_settings=server_settings,
                command_timeout=30,
                reset=keep_session,
            )

    async def close(self) -> None:
        """Close the connections; those a hung database holds (a query that never answers, abandoned by
        its caller's deadline) are terminated after CLOSE_TIMEOUT_SECONDS, so that the process exits
        within its grace period."""
        if self._pool is not None:
            try:
                await within(CLOSE_TIMEOUT_SECONDS, self._pool.close())
            except TimeoutError:
                self._pool.terminate()

    @property
    def opened(self) -> bool:
        return self._pool is not None

    def __getattr__(self, name: str) -> Any:
        pool = self.__dict__.get("_pool")
        if pool is None:
            raise ServiceUnavailable("The database pool is not open")
        return getattr(pool, name)
