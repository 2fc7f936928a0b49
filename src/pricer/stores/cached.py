"""In-process caches in front of the database for what every request reads: API keys and clients.

Entries are dropped when an invalidation message names them (this replica's writes before they return,
other replicas' within a second), and expire after `ttl` while the bus is connected. While the bus is not
connected a replica cannot hear other replicas' writes, so entries are trusted at most `disconnected_ttl`
(under a second) after they were read: a revoked key is refused everywhere within a second either way.

Availability (issue 16): when the database cannot be reached, an entry past its `ttl` is still served for
`stale` more seconds (stale-if-error), but only while the bus is connected: revocations and client changes
keep arriving and are applied, and a reconnection of the bus clears every cache (messages may have been
missed). What is not cached still fails (503, DESIGN §2.3). After a failed read the database is not asked
again for `retry_after` seconds for entries that can be served stale, so an outage does not cost every
request a failed connection attempt. A read has `read_timeout` (READ_TIMEOUT_SECONDS) to answer: a database
that accepts connections but answers nothing (hung, partitioned, SIGSTOPped) fails the read then, as one
that refuses them does, instead of after the driver's timeouts (a minute), with every request of that
entry waiting meanwhile.

Unknown ids are cached apart (a short lifetime, a bounded number, the oldest dropped first), so that a
flood of random key ids can neither evict the known keys nor reach the database again for an id it just
asked about; a key created with such an id is announced on the bus like any write and drops the entry.
Concurrent reads of one id that is not cached share one database read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from pricer.deadline import within
from pricer.errors import ServiceUnavailable
from pricer.invalidation import InvalidationBus
from pricer.logs import fields
from pricer.models import ApiKeyRecord, Client
from pricer.stores.protocols import ClientStore, KeyStore

V = TypeVar("V")

log = logging.getLogger("pricer.stores.cache")

KEY_TOPIC = "key"
CLIENT_TOPIC = "client"
DEFAULT_TTL_SECONDS = 60.0
DEFAULT_STALE_SECONDS = 300.0
DISCONNECTED_TTL_SECONDS = 0.5
UNKNOWN_TTL_SECONDS = 10.0
MAX_UNKNOWN_ENTRIES = 10_000
RETRY_AFTER_SECONDS = 1.0
# A read of one key or client by its primary key answers in milliseconds; past this the database is down
# for the caller. A request may read both a key and a client (the gateway), and its service a client again,
# within the gateway's deadline for the call (BACKEND_TIMEOUT_SECONDS, default 2 s).
READ_TIMEOUT_SECONDS = 1.0


class _Cache(Generic[V]):
    def __init__(
        self,
        bus: InvalidationBus,
        topic: str,
        *,
        ttl: float,
        stale: float,
        disconnected_ttl: float = DISCONNECTED_TTL_SECONDS,
        unknown_ttl: float = UNKNOWN_TTL_SECONDS,
        max_entries: int = 100_000,
        max_unknown: int = MAX_UNKNOWN_ENTRIES,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._read_timeout = read_timeout
        self._topic = topic
        self._ttl = ttl
        self._stale = stale
        self._disconnected_ttl = disconnected_ttl
        self._unknown_ttl = unknown_ttl
        self._max_entries = max_entries
        self._max_unknown = max_unknown
        self._clock = clock
        self._entries: dict[str, tuple[V, float]] = {}  # value, when it was read
        self._unknown: dict[str, float] = {}  # when it was read; insertion order is age order
        self._reads: dict[str, asyncio.Task[V | None]] = {}
        self._generation = 0
        self._failed_at = -float("inf")
        self._serving_stale = False
        bus.subscribe(self._on_message)

    def _on_message(self, topic: str, key: str) -> None:
        if topic == "*":
            self.clear()
        elif topic == self._topic:
            self._entries.pop(key, None)
            self._unknown.pop(key, None)
            self._reads.pop(key, None)  # later readers must not share a read begun before the write
            self._generation += 1

    def clear(self) -> None:
        self._entries = {}
        self._unknown = {}
        self._reads = {}
        self._generation += 1

    def _fresh(self, key: str) -> tuple[bool, V | None]:
        now = self._clock()
        connected = self._bus.connected
        entry = self._entries.get(key)
        if entry is not None:
            if now - entry[1] < (self._ttl if connected else self._disconnected_ttl):
                return True, entry[0]
            return False, None
        read_at = self._unknown.get(key)
        if read_at is not None and now - read_at < (
            self._unknown_ttl if connected else self._disconnected_ttl
        ):
            return True, None
        return False, None

    def _stale_value(self, key: str) -> V | None:
        """The last value read, while it may stand in for an unreachable database."""
        entry = self._entries.get(key)
        if entry is None or not self._bus.connected or self._clock() - entry[1] >= self._ttl + self._stale:
            return None
        return entry[0]

    def _put(self, key: str, value: V | None, generation: int) -> None:
        if generation != self._generation:
            return  # invalidated while it was being read: do not store a possibly stale value
        now = self._clock()
        if value is None:
            self._entries.pop(key, None)
            self._unknown.pop(key, None)
            if len(self._unknown) >= self._max_unknown:
                del self._unknown[next(iter(self._unknown))]
            self._unknown[key] = now
            return
        self._unknown.pop(key, None)
        if len(self._entries) >= self._max_entries and key not in self._entries:
            self._entries = {}
        self._entries[key] = (value, now)

    async def get(self, key: str, read: Callable[[str], Awaitable[V | None]]) -> V | None:
        hit, value = self._fresh(key)
        if hit:
            return value
        if self._clock() - self._failed_at < RETRY_AFTER_SECONDS:
            stale = self._stale_value(key)
            if stale is not None:
                return stale
        task = self._reads.get(key)
        if task is None:
            task = asyncio.ensure_future(self._read(key, read))
            self._reads[key] = task
            task.add_done_callback(lambda done: self._read_done(key, done))
        # Shielded: a request that goes away does not cancel the read others are waiting for.
        return await asyncio.shield(task)

    async def _read_in_time(self, key: str, read: Callable[[str], Awaitable[V | None]]) -> V | None:
        try:
            return await within(self._read_timeout, read(key))
        except TimeoutError:
            raise ServiceUnavailable(
                "The database did not answer in time", details={"operation": f"{self._topic}s.get"}
            ) from None

    def _read_done(self, key: str, task: asyncio.Task[V | None]) -> None:
        if self._reads.get(key) is task:
            del self._reads[key]
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone

    async def _read(self, key: str, read: Callable[[str], Awaitable[V | None]]) -> V | None:
        generation = self._generation
        try:
            value = await self._read_in_time(key, read)
        except ServiceUnavailable:
            self._failed_at = self._clock()
            stale = self._stale_value(key)
            if stale is None:
                raise
            if not self._serving_stale:
                self._serving_stale = True
                log.warning(
                    "Database unreachable: serving cached records",
                    extra=fields(cache=self._topic, stale_seconds=self._stale),
                )
            return stale
        self._serving_stale = False
        self._put(key, value, generation)
        return value


class CachedKeyStore:
    def __init__(
        self,
        inner: KeyStore,
        bus: InvalidationBus,
        *,
        ttl: float = DEFAULT_TTL_SECONDS,
        stale: float = DEFAULT_STALE_SECONDS,
    ) -> None:
        self._inner = inner
        self._bus = bus
        self._cache: _Cache[ApiKeyRecord] = _Cache(bus, KEY_TOPIC, ttl=ttl, stale=stale)

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        return await self._cache.get(key_id, self._inner.get)

    async def put(self, record: ApiKeyRecord) -> None:
        await self._inner.put(record)
        await self._bus.publish(KEY_TOPIC, record.key_id)

    async def revoke(self, key_id: str, at: dt.datetime) -> bool:
        revoked = await self._inner.revoke(key_id, at)
        await self._bus.publish(KEY_TOPIC, key_id)
        return revoked

    async def list(self, client_id: str | None = None) -> Sequence[ApiKeyRecord]:
        return await self._inner.list(client_id)


class CachedClientStore:
    def __init__(
        self,
        inner: ClientStore,
        bus: InvalidationBus,
        *,
        ttl: float = DEFAULT_TTL_SECONDS,
        stale: float = DEFAULT_STALE_SECONDS,
    ) -> None:
        self._inner = inner
        self._bus = bus
        self._cache: _Cache[Client] = _Cache(bus, CLIENT_TOPIC, ttl=ttl, stale=stale)

    async def get(self, client_id: str) -> Client | None:
        return await self._cache.get(client_id, self._inner.get)

    async def put(self, client: Client) -> bool:
        created = await self._inner.put(client)
        await self._bus.publish(CLIENT_TOPIC, client.client_id)
        return created

    async def list(self) -> Sequence[Client]:
        return await self._inner.list()  # an operator's listing: never from the cache
