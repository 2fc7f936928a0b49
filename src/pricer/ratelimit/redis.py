"""Token buckets in Redis, shared by every replica, with batched decisions and a local fallback.

* One Lua script call (`pricer.ratelimit.script`) decides many buckets atomically with Redis's own clock
  (`TIME`), so replicas with skewed clocks agree. The state of a bucket is a plain string
  `"<tokens>:<microseconds>"` under its key (`GET ratelimit:client123` shows it).
* A busy client's decisions mostly spend a lease, tokens its shared bucket gave an earlier call (leases.py).
* Decisions of concurrent requests are coalesced: while one script call is in flight the next ones queue,
  and all queued decisions go in the next call. Calls are one at a time, over one connection held for
  the purpose (no pool checkout per call: a third of redis-py client CPU per call).
* The time budget is Redis's, not this process's: it is watched per call, not per decision, so a burst of
  one client queued behind a call costs nobody a local decision. When the watch fires and the reply is
  already in this process (bytes on the socket or in the stream's buffer, not yet parsed), Redis answered
  and the call waits on; when the watch fires late (the event loop was busy: this replica's own CPU
  contention, not Redis) the call gets its budget again, up to `stall_limit_seconds`. Only a call with no
  reply on a punctual watch is overdue: its decisions (and those that arrive while it is) are taken
  locally. A Redis error, `trip_after` overdue calls in a row still unanswered at `slow_seconds` (4
  budgets: a reply a few ms late, Redis waiting for a CPU, is not an outage), or one unanswered for
  `stall_limit_seconds` open the circuit breaker: the replica reports itself degraded and decides locally
  for a cool-down before it tries Redis again.
* Local decisions enforce this process's share (1 / (expected replicas x workers per replica), rounded
  down, at least one token: every worker of a replica decides locally on its own) of each limit, starting
  from what Redis last said of the bucket (every shared decision leaves its result, scaled to the share, in
  the local bucket), not from a full bucket. What is granted locally is owed to Redis and charged with the
  key's next shared decision (also when the bucket expired in Redis meanwhile); a key Redis lost (it
  restarted: `EPOCH_KEY` is younger than the bucket's refill time) starts from this replica's estimate
  instead of a full bucket. So neither a false alarm nor a Redis restart hands out a burst of extra grants.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError

from pricer.ratelimit.buckets import BucketSpec, Decision
from pricer.ratelimit.leases import LEASE_SECONDS, Leases, lease_size
from pricer.ratelimit.memory import MemoryLimiter
from pricer.ratelimit.script import BUCKET_SCRIPT, EPOCH_KEY

__all__ = ["BUCKET_SCRIPT", "EPOCH_KEY", "RedisLimiter"]

log = logging.getLogger("pricer.ratelimit")

# Estimates go with each call while Redis's data is younger than this (it restarted, or this replica does
# not know yet): longer than the refill time of any bucket but one whose burst is ten times its rate per
# minute (such a bucket lost longer ago starts full).
_SEED_WINDOW_MICROSECONDS = 600 * 1_000_000
_MAX_DEBTS = 100_000
_MAX_SHARES = 10_000
_CONFIRM_TURNS = 4


class _Pending:
    __slots__ = ("cost", "future", "lease", "local_grant", "spec")

    def __init__(
        self, spec: BucketSpec, cost: int, future: asyncio.Future[Decision] | None, lease: int = 0
    ) -> None:
        self.spec = spec
        self.cost = cost
        self.future = future  # None: nobody waits (a lease's refill, a refund)
        self.lease = lease  # tokens asked to lease besides the cost
        self.local_grant = 0  # tokens granted locally because its call was overdue

    @property
    def waiting(self) -> bool:
        return self.future is not None and not self.future.done()


class RedisLimiter:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        expected_replicas: int,
        workers: int = 1,
        budget_seconds: float = 0.005,
        cooldown_seconds: float = 1.0,
        stall_limit_seconds: float = 0.25,
        trip_after: int = 2,
        slow_seconds: float | None = None,
        max_batch: int = 512,
        linger_seconds: float = 0.0002,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._script = client.register_script(BUCKET_SCRIPT)
        self._connection: AbstractConnection | None = None
        # Each worker of each replica decides locally on its own: its share is one of this many.
        self._deciders = max(1, expected_replicas) * max(1, workers)
        self._budget = budget_seconds
        self._lag_tolerance = budget_seconds / 2
        self._cooldown = cooldown_seconds
        self._trip_after = max(1, trip_after)
        # An overdue call still unanswered this long counts toward opening the breaker.
        self._slow = max(budget_seconds, 4 * budget_seconds if slow_seconds is None else slow_seconds)
        self._stall_limit = max(stall_limit_seconds, self._slow)
        self._max_batch = max_batch
        self._linger = linger_seconds
        self._last_flush = float("-inf")
        self._clock = clock
        self._local = MemoryLimiter(clock=clock)
        self._shares: dict[BucketSpec, tuple[BucketSpec, float, tuple[bytes, bytes]]] = {}
        self._seeding = True  # send estimates: Redis's data may be young (see _SEED_WINDOW_MICROSECONDS)
        self._debts: OrderedDict[str, float] = OrderedDict()  # key -> tokens granted locally, owed to Redis
        self._queue: list[_Pending] = []
        self._flushing = False
        self._flush_task: asyncio.Task[None] | None = None
        self._call = 0  # number of the call in flight (or of the last one)
        self._in_flight: list[_Pending] | None = None
        self._overdue = False  # the call in flight is past its budget: its decisions were taken locally
        self._watch_handle: asyncio.Handle | None = None
        self._timeouts = 0  # slow calls in a row (overdue, and still unanswered at `_slow`)
        self._open_until = 0.0  # circuit open (decide locally) until this monotonic time
        self.local_decisions = 0
        self.shared_decisions = 0
        self.round_trips = 0
        self.late_watches = 0  # budget watches that fired late (a busy event loop) and waited again
        self.overdue_calls = 0
        self._leases = Leases()
        self._sweep_handle: asyncio.TimerHandle | None = None

    @property
    def degraded(self) -> bool:
        return self._clock() < self._open_until

    async def acquire(self, spec: BucketSpec, cost: int = 1) -> Decision:
        leases = self._leases
        if leases.held:
            # Tokens leased are already paid for in Redis: granted here, even while Redis is away.
            decision, refill = leases.spend(spec, cost, self._clock())
            if decision is not None:
                if refill is not None:
                    if self._overdue or self.degraded:
                        refill.refilling = False
                    else:
                        self._enqueue(_Pending(spec, 0, None, refill.size))
                return decision
        if self._overdue or self.degraded:
            return self._decide_locally(spec, cost, owe=True)
        size = lease_size(spec, self._deciders)
        wanted = leases.wanted(spec, size, self._clock()) if size else 0
        pending = _Pending(spec, cost, asyncio.get_running_loop().create_future(), wanted)
        self._enqueue(pending)
        # No timer per decision: the call that carries it is watched (`_watch`).
        assert pending.future is not None
        return await pending.future

    def _enqueue(self, pending: _Pending) -> None:
        self._queue.append(pending)
        if not self._flushing:
            loop = asyncio.get_running_loop()
            self._flushing = True
            if self._linger and self._clock() - self._last_flush < 10 * self._linger:
                # Steady traffic: a call costs the replica ~50 µs of CPU whatever it decides, so the
                # decisions of the next fraction of a millisecond join this one. An idle replica (no call
                # for a while) calls at once.
                loop.call_later(self._linger, self._start_flush)
            else:
                self._start_flush()

    def _start_flush(self) -> None:
        self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        self._last_flush = self._clock()
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                batch = [item for item in batch if item.future is None or not item.future.done()]
                if batch:
                    await self._run(batch)
        finally:
            self._flushing = False

    async def _run(self, batch: list[_Pending]) -> None:
        keys = [EPOCH_KEY]
        args: list[bytes | float | int] = []
        extras: list[float | int] = []
        owed: dict[str, float] = {}
        refunded: dict[str, tuple[BucketSpec, int]] = {}
        debts = self._debts
        leases = self._leases
        seeding = self._seeding
        for index, item in enumerate(batch, start=1):
            spec = item.spec
            keys.append(spec.key)
            args += [*self._share_of(spec)[2], item.cost, item.lease]
            if spec.key not in owed:
                # The first decision of a key in the call carries what is owed, unused leased tokens given
                # back, and the estimate while Redis may have lost the bucket.
                debt = owed[spec.key] = debts.pop(spec.key, 0.0) if debts else 0.0
                refund = leases.take_refund(spec.key)
                if refund:
                    refunded[spec.key] = (spec, refund)
                seed = self._estimate(spec) if seeding else -1.0
                if debt or seed >= 0 or refund:
                    extras += [index, debt, seed, refund]
        args += extras
        loop = asyncio.get_running_loop()
        self._call += 1
        call = self._call
        self._in_flight = batch
        self._overdue = False
        started = loop.time()
        self._watch_handle = loop.call_later(self._budget, self._watch, call, started, started + self._budget)
        try:
            reply = await self._evaluate(keys, args)
        except (RedisError, OSError) as error:
            self._end_call()
            self._seeding = True  # Redis may come back without its data
            self._unsent(batch, owed, refunded)
            self._trip(type(error).__name__)
            for item in batch:
                if item.local_grant:
                    self._owe(item.spec.key, item.local_grant)  # it may never have reached Redis
                if item.waiting:
                    assert item.future is not None
                    item.future.set_result(self._decide_locally(item.spec, item.cost, owe=True))
            return
        except BaseException:
            self._end_call()
            self._unsent(batch, owed, refunded)
            raise
        overdue = self._end_call()
        self.round_trips += 1
        self._seeding = int(reply[0]) < _SEED_WINDOW_MICROSECONDS
        if not overdue:
            # Only a reply within the budget closes the breaker: a late one means Redis is still slow.
            self._timeouts = 0
            self._open_until = 0.0
        now = self._clock()
        debts = self._debts
        for index, item in enumerate(batch):
            tokens = float(reply[3 * index + 2])
            spec = item.spec
            share, scale, _ = self._share_of(spec)
            # What Redis said, less what this replica granted meanwhile and still owes (a late reply), is
            # where a local decision of this bucket starts (at this replica's share).
            allowed = int(reply[3 * index + 1]) == 1
            if item.local_grant and not allowed:
                # Granted locally (its call was overdue) where Redis refused: Redis has not charged it.
                self._owe(spec.key, item.local_grant)
            unpaid = debts.get(spec.key, 0.0) if debts else 0.0
            self._local.set_tokens(share, (tokens - unpaid) * scale, now)
            held = 0
            if item.lease:
                lease = leases.add(spec, item.lease, int(reply[3 * index + 3]), tokens, now)
                lease.refilling = False
                held = lease.tokens
                self._sweep_later()
            elif spec.key in leases.held:
                held = leases.said(spec, tokens)
            if item.waiting:
                assert item.future is not None
                self.shared_decisions += 1
                item.future.set_result(
                    Decision(allowed=allowed, tokens=tokens + held, spec=spec, cost=item.cost)
                )

    def _unsent(
        self, batch: list[_Pending], owed: dict[str, float], refunded: dict[str, tuple[BucketSpec, int]]
    ) -> None:
        """A call failed: what it carried is owed again, and its leases were not granted."""
        for key, debt in owed.items():
            self._owe(key, debt)
        for spec, refund in refunded.values():
            self._leases.refund(spec, refund)
        for item in batch:
            if item.lease:
                self._leases.settled(item.spec.key)

    def _sweep_later(self) -> None:
        if self._sweep_handle is None:
            self._sweep_handle = asyncio.get_running_loop().call_later(LEASE_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Leases not refilled for LEASE_SECONDS go back to their buckets (the call is made now)."""
        self._sweep_handle = None
        leases = self._leases
        leases.expire(self._clock())
        if leases.refunds and not (self._overdue or self.degraded):
            for spec, _ in list(leases.refunds.values()):
                self._enqueue(_Pending(spec, 0, None))
        if leases.held or leases.refunds:
            self._sweep_later()

    def _end_call(self) -> bool:
        """The call in flight is over; returns whether it was overdue."""
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        self._in_flight = None
        overdue, self._overdue = self._overdue, False
        return overdue

    def _watch(self, call: int, started: float, deadline: float) -> None:
        """The call's budget is up. A reply already in this process, or a watch that fires late (the
        event loop was busy, so a reply may be waiting, unread), means Redis gets its budget again,
        counted from now (a late watch: up to the stall limit). A punctual watch with no reply gives the
        loop a few turns to parse one just read before it gives up."""
        if call != self._call or self._in_flight is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._reply_waiting() or (
            now - deadline > self._lag_tolerance and now - started < self._stall_limit
        ):
            self.late_watches += 1
            self._watch_handle = loop.call_later(self._budget, self._watch, call, started, now + self._budget)
            return
        self._watch_handle = loop.call_soon(self._confirm, call, started, now, _CONFIRM_TURNS)

    def _confirm(self, call: int, started: float, watched: float, turns: int) -> None:
        if call != self._call or self._in_flight is None:
            return
        loop = asyncio.get_running_loop()
        if turns > 0:
            self._watch_handle = loop.call_soon(self._confirm, call, started, watched, turns - 1)
            return
        now = loop.time()
        if self._reply_waiting() or (
            now - watched > self._lag_tolerance and now - started < self._stall_limit
        ):
            # Those turns were slow, or the reply is there, unread: the loop is busy after all.
            self.late_watches += 1
            self._watch_handle = loop.call_later(self._budget, self._watch, call, started, now + self._budget)
            return
        self._give_up(call, started)

    def _reply_waiting(self) -> bool:
        """Whether Redis's reply has reached this process (bytes wait on the limiter's socket, or in its
        stream's buffer, unparsed): then Redis answered, and what is late is this event loop. False when
        unknown."""
        connection = self._connection
        if getattr(getattr(connection, "_reader", None), "_buffer", None):
            return True
        writer = getattr(connection, "_writer", None)
        transport = getattr(writer, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return False

    def _give_up(self, call: int, started: float) -> None:
        """The call in flight is overdue: its decisions, and the queued ones, are taken locally now."""
        self._overdue = True
        self.overdue_calls += 1
        loop = asyncio.get_running_loop()
        # Whether it counts toward opening the breaker is judged later: a reply a few ms late (Redis
        # waiting for a CPU) is not an outage.
        self._watch_handle = loop.call_at(started + self._slow, self._judge, call, started)
        for item in self._in_flight or ():
            if item.waiting:
                assert item.future is not None
                # Not owed yet: Redis may still execute the call and charge it (if it refuses, it is owed).
                decision = self._decide_locally(item.spec, item.cost, owe=False)
                if decision.allowed:
                    item.local_grant = item.cost
                item.future.set_result(decision)
        queued, self._queue = self._queue, []
        for item in queued:
            if item.lease:
                self._leases.settled(item.spec.key)
            if item.waiting:
                assert item.future is not None
                item.future.set_result(self._decide_locally(item.spec, item.cost, owe=True))

    def _judge(self, call: int, started: float) -> None:
        """An overdue call with no reply yet after `slow_seconds` counts toward opening the breaker
        (`trip_after` in a row); one that never answers opens it at the stall limit."""
        if call != self._call or self._in_flight is None or self._reply_waiting():
            return
        self._timeouts += 1
        if self._timeouts >= self._trip_after:
            self._trip("timeout")
        loop = asyncio.get_running_loop()
        self._watch_handle = loop.call_at(max(loop.time(), started + self._stall_limit), self._stalled, call)

    def _stalled(self, call: int) -> None:
        if call == self._call and self._in_flight is not None:
            self._trip("timeout")

    async def _evaluate(self, keys: list[str], args: list[bytes | float | int]) -> list[bytes | int]:
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

    def _share_of(self, spec: BucketSpec) -> tuple[BucketSpec, float, tuple[bytes, bytes]]:
        """This process's share of a limit (never more than 1 / (expected replicas x workers) of the rate
        and of the burst, but at least one token), the factor from the shared bucket's tokens to the
        share's, and the limit as the script's arguments."""
        cached = self._shares.get(spec)
        if cached is None:
            share = BucketSpec(
                key=spec.key,
                per_minute=max(1, spec.per_minute // self._deciders),
                capacity=max(1, spec.capacity // self._deciders),
            )
            cached = (
                share,
                share.capacity / spec.capacity,
                (str(spec.per_minute).encode(), str(spec.capacity).encode()),
            )
            if len(self._shares) >= _MAX_SHARES:
                self._shares.clear()
            self._shares[spec] = cached
        return cached

    def _estimate(self, spec: BucketSpec) -> float:
        """Tokens of the shared bucket as this replica knows them (its local bucket scaled back up), or -1
        when it knows nothing (the bucket is full, or never used)."""
        share, scale, _ = self._share_of(spec)
        tokens = self._local.tokens(share)
        return -1.0 if tokens is None else min(float(spec.capacity), tokens / scale)

    def _owe(self, key: str, tokens: float) -> None:
        if tokens <= 0:
            return
        debts = self._debts
        debts[key] = debts.pop(key, 0.0) + tokens
        if len(debts) > _MAX_DEBTS:
            debts.popitem(last=False)  # forgotten: at worst that many tokens granted twice

    def _decide_locally(self, spec: BucketSpec, cost: int, *, owe: bool) -> Decision:
        self.local_decisions += 1
        share = self._share_of(spec)[0]
        # Reported as decided: against this replica's share, so the headers tell the limit in force.
        decision = self._local.decide(share, cost, local=True)
        if owe and decision.allowed:
            self._owe(spec.key, cost)
        return decision

    async def warm_up(self) -> None:
        """Connect and load the script before the first request, so that it is decided within budget."""
        try:
            await self._redis.script_load(BUCKET_SCRIPT)
        except (RedisError, OSError) as error:
            self._trip(type(error).__name__)

    async def _refund_leases(self) -> None:
        """Give the unused leased tokens back to their buckets (a graceful stop), within a second."""
        call = self._leases.refund_call(lambda spec: self._share_of(spec)[2])
        if call is None or self._flushing or self.degraded:
            return  # a call in flight owns the connection; a process that dies loses them just as well
        try:
            await asyncio.wait_for(self._evaluate(*call), 1.0)
        except (RedisError, OSError, TimeoutError):
            log.info("Rate limit leases not returned: Redis did not answer")

    async def ping(self) -> float:
        """Round-trip time in ms; raises when Redis is unreachable."""
        started = time.perf_counter()
        await self._redis.ping()
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        await self._refund_leases()
        if self._connection is not None:
            await self._redis.connection_pool.release(self._connection)
            self._connection = None
        await self._redis.aclose()
