"""Token buckets in Redis, shared by every replica, with batched decisions and a local fallback.

* One Lua script call decides many buckets atomically with Redis's own clock (`TIME`), so replicas with
  skewed clocks agree. The state of a bucket is a plain string `"<tokens>:<microseconds>"` under its key
  (`GET ratelimit:client123` shows it).
* Decisions of concurrent requests are coalesced: while one script call is in flight the next ones queue,
  and all queued decisions go in the next call. Under load one round trip serves many requests. Calls
  are one at a time, so they go over one connection held for the purpose (no pool checkout per call,
  about a third of redis-py's client CPU per call here).
* Each decision has a time budget. When Redis is slow or down the replica decides locally, enforcing its
  share (1 / expected replicas) of each limit, reports itself degraded, and keeps deciding locally for a
  cool-down before it tries Redis again (a circuit breaker: an outage does not cost the budget per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError

from pricer.ratelimit.buckets import BucketSpec, Decision
from pricer.ratelimit.memory import MemoryLimiter

log = logging.getLogger("pricer.ratelimit")

# KEYS: bucket keys; ARGV: per key (tokens per second, capacity, cost). Returns per key (allowed, tokens).
BUCKET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[i * 3 - 2])
  local capacity = tonumber(ARGV[i * 3 - 1])
  local cost = tonumber(ARGV[i * 3])
  local tokens = capacity
  local state = redis.call('GET', key)
  if state then
    local sep = string.find(state, ':', 1, true)
    if sep then
      local stored = tonumber(string.sub(state, 1, sep - 1))
      local stamp = tonumber(string.sub(state, sep + 1))
      if stored and stamp then
        local elapsed = now - stamp
        if elapsed < 0 then elapsed = 0 end
        tokens = math.min(capacity, stored + elapsed * rate / 1000000)
      end
    end
  end
  local allowed = 0
  if tokens >= cost then
    tokens = tokens - cost
    allowed = 1
  end
  local ttl = math.ceil((capacity - tokens) / rate * 1000) + 1000
  redis.call('SET', key, string.format('%.6f:%d', tokens, now), 'PX', ttl)
  out[#out + 1] = allowed
  out[#out + 1] = string.format('%.6f', tokens)
end
return out
"""


_MAX_EXTENSIONS = 2


class _Pending:
    __slots__ = ("cost", "extensions", "future", "spec", "timer")

    def __init__(self, spec: BucketSpec, cost: int, future: asyncio.Future[Decision]) -> None:
        self.spec = spec
        self.cost = cost
        self.future = future
        self.extensions = 0
        self.timer: asyncio.TimerHandle | None = None


class RedisLimiter:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        expected_replicas: int,
        budget_seconds: float = 0.005,
        cooldown_seconds: float = 1.0,
        max_batch: int = 512,
        linger_seconds: float = 0.0002,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._script = client.register_script(BUCKET_SCRIPT)
        self._connection: AbstractConnection | None = None
        self._share = 1.0 / max(1, expected_replicas)
        self._budget = budget_seconds
        self._cooldown = cooldown_seconds
        self._max_batch = max_batch
        self._linger = linger_seconds
        self._last_flush = float("-inf")
        self._clock = clock
        self._local = MemoryLimiter(clock=clock)
        self._queue: list[_Pending] = []
        self._flushing = False
        self._flush_task: asyncio.Task[None] | None = None
        self._call_started = 0.0
        self._open_until = 0.0  # circuit open (decide locally) until this monotonic time
        self.local_decisions = 0
        self.shared_decisions = 0
        self.round_trips = 0

    @property
    def degraded(self) -> bool:
        return self._clock() < self._open_until

    async def acquire(self, spec: BucketSpec, cost: int = 1) -> Decision:
        if self.degraded:
            return self._decide_locally(spec, cost)
        loop = asyncio.get_running_loop()
        pending = _Pending(spec, cost, loop.create_future())
        self._queue.append(pending)
        if not self._flushing:
            self._flushing = True
            if self._linger and self._clock() - self._last_flush < 10 * self._linger:
                # Steady traffic: a call costs the replica ~50 µs of CPU whatever it decides, so the
                # decisions of the next fraction of a millisecond join this one. An idle replica (no call
                # for a while) calls at once.
                loop.call_later(self._linger, self._start_flush)
            else:
                self._start_flush()
        # A timer, not wait_for: no task per decision on the hot path.
        pending.timer = loop.call_later(self._budget, self._expire, pending, self._clock() + self._budget)
        try:
            return await pending.future
        finally:
            if pending.timer is not None:
                pending.timer.cancel()

    def _expire(self, pending: _Pending, deadline: float) -> None:
        """The budget is for Redis, not for this process's own congestion: a decision queued behind a
        call in flight, or a timer that fires late because the event loop was busy, waits once more
        (at most `_MAX_EXTENSIONS` times) before the replica decides locally."""
        if pending.future.done():
            return
        now = self._clock()
        lagging = now - deadline > self._budget / 2
        call_is_young = now - self._call_started < self._budget
        if (lagging or call_is_young) and pending.extensions < _MAX_EXTENSIONS:
            pending.extensions += 1
            loop = asyncio.get_running_loop()
            pending.timer = loop.call_later(self._budget, self._expire, pending, now + self._budget)
            return
        self._trip("timeout")
        pending.future.set_result(self._decide_locally(pending.spec, pending.cost))

    def _start_flush(self) -> None:
        self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        self._last_flush = self._clock()
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                batch = [item for item in batch if not item.future.done()]
                if batch:
                    await self._run(batch)
        finally:
            self._flushing = False

    async def _run(self, batch: list[_Pending]) -> None:
        keys = [item.spec.key for item in batch]
        args: list[float | int] = []
        for item in batch:
            args += [item.spec.rate, item.spec.capacity, item.cost]
        self._call_started = self._clock()
        try:
            reply = await self._evaluate(keys, args)
        except (RedisError, OSError) as error:
            self._trip(type(error).__name__)
            for item in batch:
                if not item.future.done():
                    item.future.set_result(self._decide_locally(item.spec, item.cost))
            return
        self.round_trips += 1
        if self._clock() - self._call_started <= self._budget:
            # Only a reply within the budget closes the breaker: a late one means Redis is still slow.
            self._open_until = 0.0
        for index, item in enumerate(batch):
            self.shared_decisions += 1
            if not item.future.done():
                item.future.set_result(
                    Decision(
                        allowed=int(reply[2 * index]) == 1,
                        tokens=float(reply[2 * index + 1]),
                        spec=item.spec,
                        cost=item.cost,
                    )
                )

    async def _evaluate(self, keys: list[str], args: list[float | int]) -> list[bytes | int]:
        """One EVALSHA on the limiter's own connection; the script is loaded again after NOSCRIPT (Redis
        restarted or flushed its scripts)."""
        connection = self._connection
        if connection is None:
            connection = self._connection = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
            try:
                reply: list[bytes | int] = await connection.read_response()
            except NoScriptError:
                await connection.send_command("SCRIPT", "LOAD", BUCKET_SCRIPT)
                await connection.read_response()
                await connection.send_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
                reply = await connection.read_response()
            return reply
        except BaseException:
            # A reply half read (or never read) must not be taken for the next call's.
            await connection.disconnect()
            raise

    def _trip(self, reason: str) -> None:
        if not self.degraded:
            log.warning(
                "Rate limiter degraded: deciding locally", extra={"logfmt_fields": {"reason": reason}}
            )
        self._open_until = self._clock() + self._cooldown

    def _decide_locally(self, spec: BucketSpec, cost: int) -> Decision:
        self.local_decisions += 1
        share = BucketSpec(
            key=spec.key,
            per_minute=max(1, round(spec.per_minute * self._share)),
            capacity=max(1, round(spec.capacity * self._share)),
        )
        # Reported as decided: against this replica's share, so the headers tell the limit in force.
        return self._local.decide(share, cost, local=True)

    async def warm_up(self) -> None:
        """Connect and load the script before the first request, so that it is decided within budget."""
        try:
            await self._redis.script_load(BUCKET_SCRIPT)
        except (RedisError, OSError) as error:
            self._trip(type(error).__name__)

    async def ping(self) -> float:
        """Round-trip time in ms; raises when Redis is unreachable."""
        started = time.perf_counter()
        await self._redis.ping()
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        if self._connection is not None:
            await self._redis.connection_pool.release(self._connection)
            self._connection = None
        await self._redis.aclose()
