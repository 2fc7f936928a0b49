"""Per-client token buckets: in-memory (embedded default) and Redis (shared by every replica)."""

from pricer.ratelimit.buckets import BucketSpec, Decision, RateLimiter

__all__ = ["BucketSpec", "Decision", "RateLimiter"]
