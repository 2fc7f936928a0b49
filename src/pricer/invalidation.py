"""Invalidation messages between replicas: a key revoked, a client changed, market data written.

A replica that takes a write invalidates its own caches before the call returns and publishes the
message; every other replica drops the same entries when the message arrives (Redis pub/sub, well
within a second). While a replica is not subscribed it cannot hear messages, so its caches must not
trust entries for long: `connected` tells them.

`connected` means "heard from Redis lately", not "a connection object exists": a subscription whose
connection died silently (a partition without a reset, a hung Redis) keeps its socket open and simply
receives nothing, and a read that times out returns no message rather than an error. So the listener
pings Redis on the subscription every `ping_seconds` and counts any message or PONG as news; silent for
`silence_seconds`, the bus is not connected (caches stop trusting entries, stale-if-error stops) and the
subscription is dropped and made again (which clears every cache: messages may have been missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
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
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        reconnect_seconds: float = 0.5,
        ping_seconds: float = 1.0,
        silence_seconds: float = 2.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._handlers: list[Handler] = []
        self._reconnect = reconnect_seconds
        self._ping = ping_seconds
        self._silence = max(silence_seconds, ping_seconds)
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._connected = False
        self._heard_at = -float("inf")  # when Redis last answered on the subscription

    @property
    def connected(self) -> bool:
        return self._connected and self._clock() - self._heard_at < self._silence

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
            # Subscribe confirmations are wanted: sending SUBSCRIBE proves nothing, its answer does.
            pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
            try:
                await pubsub.subscribe(CHANNEL)
                pinged_at = heard_at = self._clock()  # silence counts from the subscription
                while True:
                    now = self._clock()
                    if now - pinged_at >= self._ping:
                        await pubsub.ping()  # the PONG arrives as a message
                        pinged_at = now
                    wait = min(pinged_at + self._ping, heard_at + self._silence) - now
                    message = await pubsub.get_message(timeout=max(0.01, wait))
                    if message is None:
                        # Judged after a read found nothing, not before: a late event loop (this
                        # process busy) reads the PONG waiting for it instead of taking Redis for dead.
                        if self._clock() - heard_at >= self._silence:
                            raise RedisConnectionError("no answer on the subscription")
                        continue
                    heard_at = self._heard_at = self._clock()
                    kind = message.get("type")
                    if kind == "subscribe" and not self._connected:
                        self._connected = True
                        self._subscribed.set()
                        # Anything published while we were away is lost: start from a clean slate.
                        self._deliver("*", "*")
                    elif kind == "message":
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
