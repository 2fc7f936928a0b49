"""What the engine needs of its stores; each Protocol has an in-memory and a PostgreSQL implementation."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pricer.models import (
    ApiKeyRecord,
    AvailabilitySnapshot,
    Client,
    LenderRate,
    MarketEvent,
    Stock,
    VolatilityReading,
)
from pricer.quotes import PricedBatch, PricedQuote


class ClientStore(Protocol):
    async def get(self, client_id: str) -> Client | None: ...

    async def put(self, client: Client) -> bool:
        """Store the client whole; True when it was created, False when it replaced one."""
        ...

    async def list(self) -> Sequence[Client]:
        """Every client, by client_id (the CLI's `pricer clients list`)."""
        ...


class StockStore(Protocol):
    async def get_many(self, tickers: Sequence[str]) -> Mapping[str, Stock]: ...

    async def put(self, stock: Stock) -> bool: ...

    async def tickers(self) -> Sequence[str]:
        """Every ticker with a stock record (the live sources keep them fresh)."""
        ...


class AvailabilityStore(Protocol):
    async def add(self, snapshot: AvailabilitySnapshot) -> None:
        """Keep a snapshot; the one with the newest `as_of` is in force (ties: the last added)."""
        ...

    async def current(self) -> AvailabilitySnapshot | None: ...


class VolatilityStore(Protocol):
    async def add(self, reading: VolatilityReading) -> None: ...

    async def latest(self) -> VolatilityReading | None:
        """The reading with the latest `as_of` (ties: the last added)."""
        ...


class EventStore(Protocol):
    async def replace(self, ticker: str, events: Sequence[MarketEvent]) -> None: ...

    async def replace_many(self, events: Mapping[str, Sequence[MarketEvent]]) -> None: ...

    async def between(
        self, tickers: Iterable[str], first: dt.date, last: dt.date
    ) -> Mapping[str, Sequence[MarketEvent]]:
        """Events dated from `first` through `last` (inclusive) of the given tickers."""
        ...


class KeyStore(Protocol):
    async def get(self, key_id: str) -> ApiKeyRecord | None: ...

    async def put(self, record: ApiKeyRecord) -> None:
        """Insert or replace the key whole, except its revocation: a revoked key stays revoked (with its
        first revocation time), so that no writer (BOOTSTRAP_ADMIN_KEY at each start) brings it back."""
        ...

    async def revoke(self, key_id: str, at: dt.datetime) -> bool:
        """Mark the key revoked; False when there is no such key."""
        ...

    async def list(self, client_id: str | None = None) -> Sequence[ApiKeyRecord]: ...


class QuoteStore(Protocol):
    """The audit trail of priced positions."""

    async def add(self, batch: PricedBatch) -> None:
        """Record every position of the batch; readable through `get` on this replica once this returns."""
        ...

    async def get(self, quote_id: str) -> PricedQuote | None:
        """The quote as priced (its row as a one-row batch, with its place in the call), or None."""
        ...


class SourceStore(Protocol):
    """What the live market-data sources fetched (DESIGN §3.1), shared by the replicas: the lender's
    answers per ticker, the tickers quoted lately (the refresher keeps them fresh too) and each provider's
    state as the refresher last saw it."""

    async def put_lender(self, rates: Sequence[LenderRate]) -> None:
        """Keep each ticker's latest answer (a newer `fetched_at` replaces an older one, not the reverse)."""
        ...

    async def lender_rates(self) -> Sequence[LenderRate]:
        """Every ticker's latest lender answer."""
        ...

    async def note_quoted(self, tickers: Sequence[str], at: dt.datetime) -> None: ...

    async def quoted_since(self, since: dt.datetime) -> Sequence[str]:
        """Tickers quoted at or after `since`."""
        ...

    async def put_status(self, provider: str, status: Mapping[str, object]) -> None:
        """A provider's state as the refresher sees it (a small JSON-able mapping)."""
        ...

    async def statuses(self) -> Mapping[str, Mapping[str, object]]: ...


@dataclass(frozen=True, slots=True)
class Stores:
    clients: ClientStore
    stocks: StockStore
    availability: AvailabilityStore
    volatility: VolatilityStore
    events: EventStore
    keys: KeyStore
    quotes: QuoteStore
