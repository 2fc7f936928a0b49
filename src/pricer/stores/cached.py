"""In-process caches in front of the database for what every request reads: API keys and clients.

Entries are dropped when an invalidation message names them (this replica's writes before they return,
other replicas' within a second), and expire after `ttl` while the bus is connected. While the bus is not
connected a replica cannot hear other replicas' writes, so entries live at most `disconnected_ttl`
(under a second): a revoked key is refused everywhere within a second either way.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from pricer.invalidation import InvalidationBus
from pricer.models import ApiKeyRecord, Client
from pricer.stores.protocols import ClientStore, KeyStore

V = TypeVar("V")

KEY_TOPIC = "key"
CLIENT_TOPIC = "client"


class _TtlCache(Generic[V]):
    def __init__(
        self,
        bus: InvalidationBus,
        topic: str,
        *,
        ttl: float,
        disconnected_ttl: float,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._topic = topic
        self._ttl = ttl
        self._disconnected_ttl = disconnected_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[V | None, float]] = {}
        self._generation = 0
        bus.subscribe(self._on_message)

    def _on_message(self, topic: str, key: str) -> None:
        if topic == "*":
            self.clear()
        elif topic == self._topic:
            self._entries.pop(key, None)
            self._generation += 1

    def clear(self) -> None:
        self._entries = {}
        self._generation += 1

    def get(self, key: str) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is not None and entry[1] > self._clock():
            return True, entry[0]
        return False, None

    def put(self, key: str, value: V | None, generation: int) -> None:
        if generation != self._generation:
            return  # invalidated while it was being read: do not store a possibly stale value
        if len(self._entries) >= self._max_entries:
            self._entries = {}
        ttl = self._ttl if self._bus.connected else self._disconnected_ttl
        self._entries[key] = (value, self._clock() + ttl)

    @property
    def generation(self) -> int:
        return self._generation


class CachedKeyStore:
    def __init__(self, inner: KeyStore, bus: InvalidationBus, *, ttl: float = 60.0) -> None:
        self._inner = inner
        self._bus = bus
        self._cache: _TtlCache[ApiKeyRecord] = _TtlCache(bus, KEY_TOPIC, ttl=ttl, disconnected_ttl=0.5)

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        hit, record = self._cache.get(key_id)
        if hit:
            return record
        generation = self._cache.generation
        record = await self._inner.get(key_id)
        self._cache.put(key_id, record, generation)
        return record

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
    def __init__(self, inner: ClientStore, bus: InvalidationBus, *, ttl: float = 60.0) -> None:
        self._inner = inner
        self._bus = bus
        self._cache: _TtlCache[Client] = _TtlCache(bus, CLIENT_TOPIC, ttl=ttl, disconnected_ttl=0.5)

    async def get(self, client_id: str) -> Client | None:
        hit, client = self._cache.get(client_id)
        if hit:
            return client
        generation = self._cache.generation
        client = await self._inner.get(client_id)
        self._cache.put(client_id, client, generation)
        return client

    async def put(self, client: Client) -> bool:
        created = await self._inner.put(client)
        await self._bus.publish(CLIENT_TOPIC, client.client_id)
        return created
