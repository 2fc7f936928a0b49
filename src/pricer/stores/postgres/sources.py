"""The PostgreSQL store of what the live market-data providers answered (`PgSourceStore`, DESIGN §3.1):
the lender's latest answer per ticker, the tickers quoted lately, each provider's state."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence

from pricer.models import BorrowStatus, LenderRate
from pricer.stores.postgres.common import _PgStore, _utc, translate_errors


class PgSourceStore(_PgStore):
    async def put_lender(self, rates: Sequence[LenderRate]) -> None:
        if not rates:
            return
        with translate_errors("sources.put_lender"):
            await self._pool.execute(
                """
                INSERT INTO lender_rates AS l (ticker, rate, status, fetched_at)
                SELECT * FROM unnest($1::text[], $2::numeric[], $3::text[], $4::timestamptz[])
                ON CONFLICT (ticker) DO UPDATE SET
                    rate = EXCLUDED.rate, status = EXCLUDED.status, fetched_at = EXCLUDED.fetched_at,
                    stored_at = now()
                WHERE l.fetched_at <= EXCLUDED.fetched_at
                """,
                [rate.ticker for rate in rates],
                [None if rate.rate is None else repr(float(rate.rate)) for rate in rates],
                [None if rate.status is None else str(rate.status) for rate in rates],
                [rate.fetched_at for rate in rates],
            )

    async def lender_rates(self) -> Sequence[LenderRate]:
        with translate_errors("sources.lender_rates"):
            rows = await self._pool.fetch(
                "SELECT ticker, rate::float8 AS rate, status, fetched_at FROM lender_rates"
            )
        return [
            LenderRate(
                str(row[0]),
                None if row[1] is None else float(row[1]),
                None if row[2] is None else BorrowStatus(row[2]),
                _utc(row[3]),
            )
            for row in rows
        ]

    async def note_quoted(self, tickers: Sequence[str], at: dt.datetime) -> None:
        if not tickers:
            return
        with translate_errors("sources.note_quoted"):
            await self._pool.execute(
                """
                INSERT INTO source_quoted_tickers AS q (ticker, quoted_at)
                SELECT unnest($1::text[]), $2
                ON CONFLICT (ticker) DO UPDATE SET quoted_at = greatest(q.quoted_at, EXCLUDED.quoted_at)
                """,
                list(dict.fromkeys(tickers)),
                at,
            )

    async def quoted_since(self, since: dt.datetime) -> Sequence[str]:
        with translate_errors("sources.quoted_since"):
            rows = await self._pool.fetch(
                "SELECT ticker FROM source_quoted_tickers WHERE quoted_at >= $1", since
            )
        return [str(row[0]) for row in rows]

    async def put_status(self, provider: str, status: Mapping[str, object]) -> None:
        with translate_errors("sources.put_status"):
            await self._pool.execute(
                "INSERT INTO source_status (provider, status) VALUES ($1, $2::jsonb)"
                " ON CONFLICT (provider) DO UPDATE SET status = EXCLUDED.status, updated_at = now()",
                provider,
                json.dumps(dict(status)),
            )

    async def statuses(self) -> Mapping[str, Mapping[str, object]]:
        with translate_errors("sources.statuses"):
            rows = await self._pool.fetch("SELECT provider, status FROM source_status")
        found: dict[str, Mapping[str, object]] = {}
        for row in rows:
            value = row[1]
            decoded = json.loads(value) if isinstance(value, str) else value
            if isinstance(decoded, dict):
                found[str(row[0])] = decoded
        return found
