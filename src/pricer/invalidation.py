"""Invalidation messages between replicas: a key revoked, a client changed, market data written.

A replica that takes a write invalidates its own caches before the call returns and publishes the
message; every other replica drops the same entries when the message arrives (Redis pub/sub, well
within a second). While a replica is not subscribed it cannot hear messages, so its caches must not
trust entries for long: `connected` tells them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pricer.logs import fields

log = logging.getLogger("pricer.invalidation")

CHANNEL = "pricer:invalidate"
Handler = Callable[[str, str], None]


class InvalidationBus(Protocol):
    @property
    def connected(self) -> bool: ...

    def subscribe(self, handler: Handler) -> None: ...

    async def publish(self, topic: str, key: str) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalBus:
    """One process: messages reach this process's handlers only (the embedded default)."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []

    @property
    def connected(self) -> bool:
        return True

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    async def publish(self, topic: str, key: str) -> None:
        for handler in self._handlers:
            handler(topic, key)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisBus:
    def __init__(self, client: aioredis.Redis, *, reconnect_seconds: float = 0.5) -> None:
        self._redis = client
        self._handlers: list[Handler] = []
        self._reconnect = reconnect_seconds
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def subscribe(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def _deliver(self, topic: str, key: str) -> None:
        for handler in self._handlers:
            try:
                handler(topic, key)
            except Exception:
                log.exception("Invalidation handler failed")

    async def publish(self, topic: str, key: str) -> None:
        # This replica first: its caches must not serve the old value once the write has returned.
        self._deliver(topic, key)
        try:
            await self._redis.publish(CHANNEL, f"{topic}\n{key}")
        except (RedisError, OSError) as error:
            # Other replicas miss it; their caches expire fast while they are not hearing messages.
            log.error(
                "Backend service error",
                extra=fields(service="redis", operation="publish", error=type(error).__name__),
            )

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 2.0)

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._connected = True
                self._subscribed.set()
                # Anything published while we were away is lost: start from a clean slate.
                self._deliver("*", "*")
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        topic, _, key = text.partition("\n")
                        self._deliver(topic, key)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                if self._connected:
                    log.error(
                        "Backend service error",
                        extra=fields(service="redis", operation="subscribe", error=type(error).__name__),
                    )
                self._connected = False
                self._subscribed.set()
                await asyncio.sleep(self._reconnect)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
