"""Tokens a process holds out of a shared Redis bucket, so that most decisions need no round trip.

A busy client's decision takes, with its own token, a lease of a few more whole tokens from the shared
bucket (`BUCKET_SCRIPT`); the process then grants that client's next requests from the lease, at once,
and asks for the next lease in the background when half of it is spent. The guarantees:

* Never more than the limit: a leased token was taken from the one shared bucket, so every grant of every
  replica is paid for there, leased or not (the bucket's count over any window is unchanged).
* What a lease costs is fairness at the edge, and it is bounded: a decider (a worker of a replica) holds
  at most one and a half leases of a bucket, and a lease is at most 1/LEASE_DIVISOR of the burst per
  decider (`lease_size`), so all replicas together hold under 1 % of a bucket's burst unused. Only these
  tokens can be refused to one replica while another still holds them.
* Small buckets are not leased at all (a lease under two tokens): their decisions go to Redis one by
  one, exactly as without leases (the default 60 per minute is such a bucket).
* Unused tokens go back: a lease not refilled for LEASE_SECONDS (its client went quiet, or its limit
  changed) is refunded to the bucket with the next call, and all leases are refunded when the limiter
  closes (graceful shutdown). A process that dies (SIGKILL) loses what it held, at most one and a half
  leases per bucket: those tokens come back as the bucket refills, at its rate.
* Headers stay exact for one process: a granted decision reports the bucket's tokens as Redis last said
  them, less the lease spent since, which is what one exact bucket would report (without the refill of
  the few milliseconds since the lease).
"""

from __future__ import annotations

from collections.abc import Callable

from pricer.ratelimit.buckets import BucketSpec, Decision
from pricer.ratelimit.script import EPOCH_KEY

LEASE_DIVISOR = 200  # a decider's lease is at most this fraction of the burst (1 / (200 x deciders))
MAX_LEASE = 256  # tokens: a refill asked at half has 128 decisions of runway (~50 ms at 2,500/s)
LEASE_SECONDS = 1.0  # a lease not refilled for this long goes back to the bucket
_MAX_REFUNDS = 100_000


def lease_size(spec: BucketSpec, deciders: int) -> int:
    """Tokens one decider leases at a time out of `spec`'s shared bucket; 0: not leased."""
    size = min(MAX_LEASE, spec.capacity // (deciders * LEASE_DIVISOR))
    return size if size >= 2 else 0


class Lease:
    __slots__ = ("refilling", "shared_tokens", "size", "spec", "taken_at", "tokens")

    def __init__(self, spec: BucketSpec, size: int, taken_at: float) -> None:
        self.spec = spec
        self.size = size
        self.tokens = 0  # leased, not granted yet
        self.shared_tokens = 0.0  # what Redis said was left in the bucket, leases taken
        self.taken_at = taken_at  # when the lease was last refilled
        self.refilling = False  # a call asking for more is queued or in flight


class Leases:
    """This process's leases by bucket key, and the unused tokens it owes back."""

    def __init__(self) -> None:
        self.held: dict[str, Lease] = {}
        # key -> (its limit, unused leased tokens), given back with the key's next call
        self.refunds: dict[str, tuple[BucketSpec, int]] = {}
        self.granted = 0  # decisions granted from a lease

    def spend(self, spec: BucketSpec, cost: int, now: float) -> tuple[Decision | None, Lease | None]:
        """A decision granted from the lease of `spec` (None: the lease cannot pay for it), and the lease
        when it should be refilled now."""
        lease = self.held.get(spec.key)
        if lease is None:
            return None, None
        if lease.spec != spec or now - lease.taken_at >= LEASE_SECONDS:
            self.release(spec.key)
            return None, None
        if lease.tokens < cost:
            return None, None
        lease.tokens -= cost
        self.granted += 1
        decision = Decision(allowed=True, tokens=lease.shared_tokens + lease.tokens, spec=spec, cost=cost)
        if lease.tokens * 2 < lease.size and not lease.refilling:
            lease.refilling = True
            return decision, lease
        return decision, None

    def wanted(self, spec: BucketSpec, size: int, now: float) -> int:
        """How many tokens a decision of `spec` that goes to Redis asks to lease."""
        if size <= 0:
            return 0
        lease = self.held.get(spec.key)
        if lease is None or lease.spec != spec:
            self.release(spec.key)
            lease = self.held[spec.key] = Lease(spec, size, now)
        elif lease.refilling:
            return 0  # the call in flight brings them
        lease.refilling = True
        return size

    def add(self, spec: BucketSpec, size: int, leased: int, shared_tokens: float, now: float) -> Lease:
        """Redis leased `leased` tokens of `spec` (maybe none) and said `shared_tokens` are left."""
        lease = self.held.get(spec.key)
        if lease is None or lease.spec != spec:
            if lease is not None:
                self.release(spec.key)
            lease = self.held[spec.key] = Lease(spec, size, now)
        lease.tokens += leased
        lease.shared_tokens = shared_tokens
        if leased:
            lease.taken_at = now
        return lease

    def settled(self, key: str) -> None:
        """The call that asked for more tokens of `key` is over (answered, failed or dropped)."""
        lease = self.held.get(key)
        if lease is not None:
            lease.refilling = False

    def said(self, spec: BucketSpec, shared_tokens: float) -> int:
        """Redis said `shared_tokens` are left in `spec`'s bucket: the tokens this process holds of it."""
        lease = self.held.get(spec.key)
        if lease is None or lease.spec != spec:
            return 0
        lease.shared_tokens = shared_tokens
        return lease.tokens

    def release(self, key: str) -> None:
        """Give the lease of `key` up: its unused tokens go back with the next call."""
        lease = self.held.pop(key, None)
        if lease is not None:
            self.refund(lease.spec, lease.tokens)

    def refund(self, spec: BucketSpec, tokens: int) -> None:
        if tokens <= 0:
            return
        refunds = self.refunds
        owed = refunds.get(spec.key)
        refunds[spec.key] = (spec, tokens + (owed[1] if owed is not None else 0))
        if len(refunds) > _MAX_REFUNDS:
            refunds.pop(next(iter(refunds)))  # forgotten: at worst that many tokens refused too early

    def take_refund(self, key: str) -> int:
        owed = self.refunds.pop(key, None) if self.refunds else None
        return 0 if owed is None else owed[1]

    def expire(self, now: float) -> None:
        """Release the leases not refilled for LEASE_SECONDS."""
        for key in [key for key, lease in self.held.items() if now - lease.taken_at >= LEASE_SECONDS]:
            if not self.held[key].refilling:
                self.release(key)

    def refund_call(
        self, limits: Callable[[BucketSpec], tuple[bytes, bytes]]
    ) -> tuple[list[str], list[bytes | float | int]] | None:
        """Give every lease up (the limiter closes): the script's keys and arguments that give all unused
        tokens back (`limits`: a limit as the script's arguments), None when there are none."""
        for key in list(self.held):
            self.release(key)
        if not self.refunds:
            return None
        keys = [EPOCH_KEY]
        args: list[bytes | float | int] = []
        extras: list[float | int] = []
        for index, (spec, tokens) in enumerate(self.refunds.values(), start=1):
            keys.append(spec.key)
            args += [*limits(spec), 0, 0]
            extras += [index, 0, -1, tokens]
        self.refunds = {}
        return keys, args + extras
