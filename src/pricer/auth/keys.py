"""API keys: `bre_<key_id>_<secret>`, stored as HMAC-SHA256(pepper, secret), found by key id.

The format lets secret scanners find leaked keys; only the HMAC is stored, compared in constant time,
with a dummy comparison for unknown ids so that timing does not tell which ids exist.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass

from pricer.errors import Unauthorized
from pricer.models import ApiKeyRecord, Scope
from pricer.stores.protocols import KeyStore

KEY_PREFIX = "bre_"
KEY_ID_LENGTH = 12
SECRET_LENGTH = 40
_KEY = re.compile(r"bre_([a-z0-9]{8,16})_([A-Za-z0-9]{32,64})")
_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_DUMMY_HASH = bytes(32)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as. `key_id` is None when authentication is disabled (local development)."""

    key_id: str | None
    client_id: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def may_act_for(self, client_id: str) -> bool:
        return client_id == self.client_id or Scope.ADMIN in self.scopes


def new_key() -> tuple[str, str]:
    """A fresh (key_id, full key)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


def parse_key(text: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    match = _KEY.fullmatch(text)
    return (match.group(1), match.group(2)) if match else None


class KeyHasher:
    def __init__(self, pepper: str) -> None:
        self._pepper = pepper.encode()

    def hash(self, secret: str) -> bytes:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).digest()


def normalize_scopes(scopes: Iterable[Scope]) -> frozenset[Scope]:
    return frozenset(scopes)


def make_record(
    hasher: KeyHasher,
    key: str,
    *,
    client_id: str,
    scopes: Iterable[Scope],
    now: dt.datetime,
    expires_at: dt.datetime,
) -> ApiKeyRecord:
    parsed = parse_key(key)
    if parsed is None:
        raise ValueError("not a well-formed key: expected bre_<8-16 [a-z0-9]>_<32-64 [A-Za-z0-9]>")
    key_id, secret = parsed
    return ApiKeyRecord(
        key_id=key_id,
        client_id=client_id,
        secret_hash=hasher.hash(secret),
        scopes=normalize_scopes(scopes),
        created_at=now,
        expires_at=expires_at,
    )


class KeyVerifier:
    """Turns a presented key into a Principal, or raises Unauthorized with the reason for metrics."""

    # Keys verified lately (presented key -> the record it matched, its principal): a key presented again
    # against the same record skips the HMAC (a tenth of a single quote's CPU). Records are replaced
    # whole on any change (revocation included), so a changed record is verified anew; revocation and
    # expiry are checked on every request. Only keys that matched are kept: a guess never gets here.
    MAX_VERIFIED = 10_000

    def __init__(self, keys: KeyStore, hasher: KeyHasher) -> None:
        self._keys = keys
        self._hasher = hasher
        self._verified: dict[str, tuple[ApiKeyRecord, Principal]] = {}

    async def verify(self, presented: str, now: dt.datetime) -> Principal:
        known = self._verified.get(presented)
        if known is not None:
            record = await self._keys.get(known[1].key_id or "")
            if record is known[0]:
                _check_in_force(record, now)
                return known[1]
            self._verified.pop(presented, None)  # a concurrent request may have dropped it already
        parsed = parse_key(presented)
        if parsed is None:
            raise Unauthorized("invalid_key")
        key_id, secret = parsed
        record = await self._keys.get(key_id)
        digest = self._hasher.hash(secret)
        if record is None:
            hmac.compare_digest(digest, _DUMMY_HASH)
            raise Unauthorized("invalid_key")
        if not hmac.compare_digest(digest, record.secret_hash):
            raise Unauthorized("invalid_key")
        _check_in_force(record, now)
        principal = Principal(key_id=record.key_id, client_id=record.client_id, scopes=record.scopes)
        if len(self._verified) >= self.MAX_VERIFIED:
            self._verified.clear()
        self._verified[presented] = (record, principal)
        return principal


def _check_in_force(record: ApiKeyRecord, now: dt.datetime) -> None:
    if record.revoked_at is not None:
        raise Unauthorized("revoked")
    if record.expires_at <= now:
        raise Unauthorized("expired")
