"""The invalidation bus knows when it is deaf (issue 16 review, finding 10).

A private redis-server is SIGSTOPped: the subscription's TCP connection stays up and nothing is answered,
as in a partition without a reset. `connected` must turn false within a few seconds (caches then stop
trusting entries and stale-if-error stops), and true again once Redis answers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pricer.backends import redis_client
from pricer.invalidation import RedisBus
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.anyio


async def wait_until(condition: object, seconds: float) -> float:
    """Seconds until `condition()` held (fails past `seconds`)."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_silently_dead_subscription_is_not_connected(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "redis").start()
    bus = RedisBus(redis_client(server.url))
    heard: list[tuple[str, str]] = []
    bus.subscribe(lambda topic, key: heard.append((topic, key)))
    try:
        await bus.start()
        assert bus.connected
        server.pause()
        try:
            # The ping interval (1 s) and the silence allowed (2.5 s), with a margin for a loaded machine.
            await wait_until(lambda: not bus.connected, 8.0)
            await asyncio.sleep(1.5)
            assert not bus.connected  # stays deaf while Redis is
        finally:
            server.resume()
        await wait_until(lambda: bus.connected, 10.0)
        assert heard[-1] == ("*", "*")  # reconnected: every cache cleared (messages may have been missed)
        with server.client() as direct:
            direct.publish("pricer:invalidate", "key\nabc")
        await wait_until(lambda: heard[-1] == ("key", "abc"), 5.0)
    finally:
        await bus.close()
        server.kill()
