"""What the PostgreSQL stores share: error translation (`translate_errors`), identifier helpers
(`quote_identifier`, `valid_schema_name`), the value converters, the stores' base class `_PgStore` and the
pools' reset `keep_session`.

Numbers: a float is written as the shortest text that round-trips it (`repr`) into a NUMERIC column and
read back through `::float8` (PostgreSQL converts the exact decimal text with a correctly rounded
`strtod`, the same float as `float(Decimal(...))`), so every figure comes back bit for bit.

Errors: every asyncpg or socket error is translated here (`translate_errors`): an unreachable or
overloaded database becomes `ServiceUnavailable`, a rejected value `InvalidParameter`, a duplicate
`Conflict`, anything else `BackendError`. Messages carry the SQLSTATE and the constraint at most, never the
DSN, a host name or a password.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]

from pricer.errors import BackendError, Conflict, InvalidParameter, PricerError, ServiceUnavailable

# ---- errors --------------------------------------------------------------------------------------

_UNAVAILABLE = "The database is unavailable"
# SQLSTATE classes / codes meaning "the database cannot serve us right now".
_UNAVAILABLE_CLASSES: Final = ("08", "53", "28", "3D")  # connection, resources, authorization, catalog
_UNAVAILABLE_CODES: Final = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "58000", "58030"})
_SCHEMA_MISSING_CODES: Final = frozenset({"42P01", "42703", "42883", "3F000"})


def _server_error(exc: Any, operation: str) -> PricerError:
    """The PricerError for an error the server reported (an `asyncpg.PostgresError`)."""
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    details: dict[str, Any] = {"operation": operation, "sqlstate": sqlstate}
    constraint = getattr(exc, "constraint_name", None)
    if constraint:
        details["constraint"] = str(constraint)
    if sqlstate.startswith(_UNAVAILABLE_CLASSES) or sqlstate in _UNAVAILABLE_CODES:
        return ServiceUnavailable(_UNAVAILABLE, details=details)
    if sqlstate == "57014":
        return ServiceUnavailable("The database did not answer in time", details=details)
    if sqlstate.startswith("40"):
        return ServiceUnavailable(
            "The database aborted the operation (transient conflict); retry", details=details
        )
    if sqlstate == "23505":
        return Conflict(
            f"{operation}: the record already exists ({constraint or 'unique key'})", details=details
        )
    if sqlstate.startswith("23"):
        return InvalidParameter(
            f"{operation}: the database rejected the record ({constraint or 'integrity constraint'})",
            details=details,
        )
    if sqlstate.startswith("22"):
        return InvalidParameter(
            f"{operation}: the database rejected a value (SQLSTATE {sqlstate})", details=details
        )
    if sqlstate in _SCHEMA_MISSING_CODES:
        return BackendError(
            f"{operation}: the database schema is missing or out of date; run the migrations", details=details
        )
    return BackendError(f"{operation}: database error (SQLSTATE {sqlstate or 'unknown'})", details=details)


@contextlib.contextmanager
def translate_errors(operation: str) -> Iterator[None]:
    """Turn asyncpg and socket errors raised inside into PricerErrors (usable around `await`s).

    Connection-level errors are raised `from None` with only the cause's class name in `details`, since
    their text may name hosts or parts of the DSN; errors the server reported keep their cause.
    """
    try:
        yield
    except PricerError:
        raise
    except asyncpg.PostgresError as exc:
        raise _server_error(exc, operation) from exc
    except asyncpg.exceptions.ClientConfigurationError as exc:
        raise ServiceUnavailable(
            "The database URL or connection options are not valid",
            details={"operation": operation, "cause": type(exc).__name__},
        ) from None
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise ServiceUnavailable(
            _UNAVAILABLE, details={"operation": operation, "cause": type(exc).__name__}
        ) from None
    except asyncpg.exceptions.InternalClientError as exc:
        raise BackendError(
            f"{operation}: database client error",
            details={"operation": operation, "cause": type(exc).__name__},
        ) from exc


# ---- helpers -------------------------------------------------------------------------------------

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def valid_schema_name(name: str) -> bool:
    return _SCHEMA_NAME.match(name) is not None


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _num(value: float) -> str:
    """A float as the decimal text a NUMERIC column stores exactly (its shortest round-trip repr)."""
    return repr(float(value))


def _float(value: Any) -> float:
    return float(value)


def _utc(value: Any) -> dt.datetime:
    moment: dt.datetime = value
    return moment.astimezone(dt.UTC)


def _opt_utc(value: Any) -> dt.datetime | None:
    return None if value is None else _utc(value)


class _PgStore:
    def __init__(self, pool: Any) -> None:
        self._pool = pool


async def keep_session(connection: Any) -> None:
    """The pools' reset: nothing beyond what asyncpg always does on release (roll back a transaction left
    open). asyncpg's default also runs `RESET ALL; CLOSE ALL; UNLISTEN *` and releases advisory locks: a
    round trip per release, for session state the stores never create (migrations hold their advisory
    lock on a connection of their own)."""
