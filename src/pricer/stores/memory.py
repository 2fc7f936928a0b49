"""In-memory stores: the embedded default, and the reference for the contract tests."""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from pricer.models import (
    ApiKeyRecord,
    AvailabilitySnapshot,
    Client,
    LenderRate,
    MarketEvent,
    Stock,
    VolatilityReading,
)
from pricer.quotes import (
    AuditRecord,
    PricedBatch,
    PricedQuote,
    QuoteColumns,
    audit_record,
    batch_from_columns,
    split_quote_id,
)
from pricer.releaser import drop_later
from pricer.stores.protocols import Stores


class MemoryClientStore:
    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}

    async def get(self, client_id: str) -> Client | None:
        return self._clients.get(client_id)

    async def put(self, client: Client) -> bool:
        created = client.client_id not in self._clients
        self._clients[client.client_id] = client
        return created

    async def list(self) -> Sequence[Client]:
        return [self._clients[client_id] for client_id in sorted(self._clients)]


class MemoryStockStore:
    def __init__(self) -> None:
        self._stocks: dict[str, Stock] = {}

    async def get_many(self, tickers: Sequence[str]) -> Mapping[str, Stock]:
        stocks = self._stocks
        return {ticker: stocks[ticker] for ticker in tickers if ticker in stocks}

    async def put(self, stock: Stock) -> bool:
        created = stock.ticker not in self._stocks
        self._stocks[stock.ticker] = stock
        return created

    async def tickers(self) -> Sequence[str]:
        return list(self._stocks)


class MemoryAvailabilityStore:
    """Keeps the snapshot in force only: an older file than the one in force changes nothing."""

    def __init__(self) -> None:
        self._current: AvailabilitySnapshot | None = None

    async def add(self, snapshot: AvailabilitySnapshot) -> None:
        if self._current is None or snapshot.as_of >= self._current.as_of:
            self._current = snapshot

    async def current(self) -> AvailabilitySnapshot | None:
        return self._current


class MemoryVolatilityStore:
    def __init__(self) -> None:
        self._latest: VolatilityReading | None = None

    async def add(self, reading: VolatilityReading) -> None:
        if self._latest is None or reading.as_of >= self._latest.as_of:
            self._latest = reading

    async def latest(self) -> VolatilityReading | None:
        return self._latest


class MemoryEventStore:
    def __init__(self) -> None:
        self._events: dict[str, tuple[MarketEvent, ...]] = {}

    async def replace(self, ticker: str, events: Sequence[MarketEvent]) -> None:
        self._set(ticker, events)

    async def replace_many(self, events: Mapping[str, Sequence[MarketEvent]]) -> None:
        for ticker, ticker_events in events.items():
            self._set(ticker, ticker_events)

    def _set(self, ticker: str, events: Sequence[MarketEvent]) -> None:
        if events:
            self._events[ticker] = tuple(sorted(events, key=lambda event: event.date))
        else:
            self._events.pop(ticker, None)

    async def between(
        self, tickers: Iterable[str], first: dt.date, last: dt.date
    ) -> Mapping[str, Sequence[MarketEvent]]:
        found: dict[str, Sequence[MarketEvent]] = {}
        for ticker in tickers:
            events = self._events.get(ticker)
            if events:
                window = [event for event in events if first <= event.date <= last]
                if window:
                    found[ticker] = window
        return found


class MemorySourceStore:
    def __init__(self) -> None:
        self._lender: dict[str, LenderRate] = {}
        self._quoted: dict[str, dt.datetime] = {}
        self._statuses: dict[str, Mapping[str, object]] = {}

    async def put_lender(self, rates: Sequence[LenderRate]) -> None:
        for rate in rates:
            kept = self._lender.get(rate.ticker)
            if kept is None or rate.fetched_at >= kept.fetched_at:
                self._lender[rate.ticker] = rate

    async def lender_rates(self) -> Sequence[LenderRate]:
        return list(self._lender.values())

    async def note_quoted(self, tickers: Sequence[str], at: dt.datetime) -> None:
        for ticker in tickers:
            self._quoted[ticker] = max(at, self._quoted.get(ticker, at))

    async def quoted_since(self, since: dt.datetime) -> Sequence[str]:
        return [ticker for ticker, at in self._quoted.items() if at >= since]

    async def put_status(self, provider: str, status: Mapping[str, object]) -> None:
        self._statuses[provider] = dict(status)

    async def statuses(self) -> Mapping[str, Mapping[str, object]]:
        return dict(self._statuses)


class MemoryKeyStore:
    def __init__(self) -> None:
        self._keys: dict[str, ApiKeyRecord] = {}

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        return self._keys.get(key_id)

    async def put(self, record: ApiKeyRecord) -> None:
        stored = self._keys.get(record.key_id)
        if stored is not None and stored.revoked_at is not None:
            record = msgspec.structs.replace(record, revoked_at=stored.revoked_at)  # never brought back
        self._keys[record.key_id] = record

    async def revoke(self, key_id: str, at: dt.datetime) -> bool:
        record = self._keys.get(key_id)
        if record is None:
            return False
        if record.revoked_at is None:
            self._keys[key_id] = ApiKeyRecord(
                key_id=record.key_id,
                client_id=record.client_id,
                secret_hash=record.secret_hash,
                scopes=record.scopes,
                created_at=record.created_at,
                expires_at=record.expires_at,
                revoked_at=at,
            )
        return True

    async def list(self, client_id: str | None = None) -> Sequence[ApiKeyRecord]:
        return [record for record in self._keys.values() if client_id in (None, record.client_id)]


class _Segment:
    __slots__ = ("batches", "rows")

    def __init__(self) -> None:
        self.batches: dict[str, PricedBatch | bytes] = {}
        self.rows = 0


class MemoryQuoteStore:
    """Priced batches, the oldest evicted once more than `max_rows` positions are held.

    A batch of many rows is kept as it is; a single quote is kept as its encoded columns. Bytes are not
    tracked by the garbage collector: a store of 10^5 single quotes as objects made every full collection
    walk millions of them (tens of milliseconds of pause in the latency tail).

    Batches are kept in segments of about `SEGMENT_ROWS` positions and evicted a segment at a time: one
    dictionary of 2 x 10^5 entries with entries coming and going is rebuilt now and then as a whole,
    which stalled the event loop for 10-20 ms; a segment's dictionary is small and is dropped, never
    rebuilt. Between `max_rows - SEGMENT_ROWS` and `max_rows` positions stay readable."""

    SEGMENT_ROWS = 8192

    def __init__(self, max_rows: int) -> None:
        self._max_rows = max_rows
        self._rows = 0
        self._segments: deque[_Segment] = deque([_Segment()])
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(QuoteColumns)

    @property
    def rows(self) -> int:
        return self._rows

    async def add(self, batch: PricedBatch) -> None:
        self.keep(audit_record(batch))

    def keep(self, record: AuditRecord) -> None:
        """`add` of a batch already in the audit trail's form (`audit_record`)."""
        segment = self._segments[-1]
        if segment.rows >= self.SEGMENT_ROWS:
            segment = _Segment()
            self._segments.append(segment)
        size = record.size
        segment.batches[record.batch_id] = (
            self._encoder.encode(record) if isinstance(record, QuoteColumns) else record
        )
        segment.rows += size
        self._rows += size
        evicted: list[_Segment] = []
        while self._rows > self._max_rows and len(self._segments) > 1:
            evicted.append(self._segments.popleft())
            self._rows -= evicted[-1].rows
        if evicted:
            # Freed off the loop: a 10^6-row batch's columns map a file of the batch pool, and unmapping
            # it (the last reference) frees its pages: 10-25 ms of the loop when done here.
            drop_later(evicted)

    async def get(self, quote_id: str) -> PricedQuote | None:
        where = split_quote_id(quote_id)
        if where is None:
            return None
        kept: PricedBatch | bytes | None = None
        for segment in reversed(self._segments):
            kept = segment.batches.get(where[0])
            if kept is not None:
                break
        if isinstance(kept, bytes):
            kept = batch_from_columns(self._decoder.decode(kept))
        if kept is None or where[1] >= kept.size:
            return None
        return kept.quote(where[1])


def memory_stores(*, max_quote_rows: int) -> Stores:
    return Stores(
        clients=MemoryClientStore(),
        stocks=MemoryStockStore(),
        availability=MemoryAvailabilityStore(),
        volatility=MemoryVolatilityStore(),
        events=MemoryEventStore(),
        keys=MemoryKeyStore(),
        quotes=MemoryQuoteStore(max_quote_rows),
    )
