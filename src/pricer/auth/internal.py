"""The gateway's internal credential: how a backend (ROLE=calculation or data) knows that a call comes
from a gateway, and for whom it acts (DESIGN §1 Roles).

The gateway authenticates the client (key or JWT), then signs a short-lived statement of the principal it
admitted: `v1.<payload>.<signature>` in the `X-Internal-Credential` header, where the payload is the
base64url of `client_id 0x1f key_id 0x1f scopes 0x1f expiry (unix seconds) 0x1f request id` and the
signature the base64url of HMAC-SHA256 under INTERNAL_SERVICE_SECRET over the payload's text. A payload
with an empty client id states "no principal" (the gateway runs with ENABLE_AUTHENTICATION=false: the
backend then acts, and charges, as the client the request names, as `all` does).

The backend checks the signature in constant time, the expiry, and that the request id is the request's
own (a credential is good for the call it was made for and a retry of it, within its lifetime).

Every call pays this on both sides, so each side does the least it can (benchmarks/bench_roles.py): one
HMAC from its keyed states made once, the signature compared as the text it is sent as (no
decoding of it), and the principal's part of the payload (client, key id, scopes) formatted once per
principal by the gateway and parsed once per distinct text by a backend (a parse cache: the signature
is still checked on every call, over the whole payload).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Callable

from pricer.auth.keys import Principal
from pricer.errors import Unauthorized
from pricer.models import Scope

HEADER = "x-internal-credential"
HEADER_BYTES = HEADER.encode()
# Long enough for a batch's deadline plus clock skew between pods, short enough that a leaked header
# (a log, a packet capture) is worthless soon.
LIFETIME_SECONDS = 120
_SEPARATOR = "\x1f"
_CACHE_LIMIT = 4096
_BLOCK = hashlib.sha256().block_size
_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


class InternalCredentials:
    """Signs (gateway) and verifies (backends) the internal credential with one shared secret."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        # HMAC-SHA256 (RFC 2104) with its two keyed states made once: a call copies them instead of
        # hashing the padded key twice, which is most of what `hmac.digest` costs for a short payload.
        key = secret.encode()
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_INNER_PAD))
        self._outer = hashlib.sha256(key.translate(_OUTER_PAD))
        self._clock = clock
        # gateway: principal -> its fields' text, ending with the separator (None: no principal)
        self._formatted: dict[Principal | None, str] = {None: _SEPARATOR * 3}
        # backend: the principal's fields' text -> the principal it states (verified payloads only)
        self._parsed: dict[str, Principal | None] = {}

    def sign(self, principal: Principal | None, request_id: str) -> str:
        head = self._formatted.get(principal)
        if head is None:
            assert principal is not None  # no principal is formatted from the start
            head = self._format(principal)
        expiry = int(self._clock()) + LIFETIME_SECONDS
        payload = urlsafe_b64encode(f"{head}{expiry}{_SEPARATOR}{request_id}".encode()).rstrip(b"=")
        return f"v1.{payload.decode()}.{self._signature(payload).decode()}"

    def verify(self, header: bytes | None, request_id: str) -> Principal | None:
        """The principal the credential states (None: the gateway authenticates no one); Unauthorized
        when it is missing, forged, expired or made for another request."""
        if header is None:
            raise Unauthorized("internal_credential_missing")
        parts = header.split(b".")
        if len(parts) != 3 or parts[0] != b"v1" or not parts[1]:
            raise Unauthorized("internal_credential_invalid")
        payload = parts[1]
        if not hmac.compare_digest(parts[2], self._signature(payload)):
            raise Unauthorized("internal_credential_invalid")
        # Signed by the gateway from here on: what is left is its text's fields.
        try:
            text = urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)).decode()
        except ValueError:
            raise Unauthorized("internal_credential_invalid") from None
        head, _, bound_to = text.rpartition(_SEPARATOR)
        head, _, expiry = head.rpartition(_SEPARATOR)
        if not expiry.isdigit() or int(expiry) < self._clock():
            raise Unauthorized("internal_credential_invalid")
        if not hmac.compare_digest(bound_to, request_id):
            raise Unauthorized("internal_credential_invalid")
        try:
            return self._parsed[head]
        except KeyError:
            pass
        principal = _parse(head)
        if len(self._parsed) >= _CACHE_LIMIT:
            self._parsed.clear()
        self._parsed[head] = principal
        return principal

    def mac(self, payload: bytes) -> bytes:
        """HMAC-SHA256 of `payload` under the secret (the same bytes as `hmac.digest`)."""
        inner = self._inner.copy()
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def _signature(self, payload: bytes) -> bytes:
        return urlsafe_b64encode(self.mac(payload)).rstrip(b"=")

    def _format(self, principal: Principal) -> str:
        scopes = ",".join(sorted(scope.value for scope in principal.scopes))
        head = _SEPARATOR.join((principal.client_id, principal.key_id or "", scopes, ""))
        if len(self._formatted) >= _CACHE_LIMIT:
            self._formatted = {None: _SEPARATOR * 3}
        self._formatted[principal] = head
        return head


def _parse(head: str) -> Principal | None:
    """The principal of a signed payload's first three fields (client id, key id, scopes)."""
    parts = head.split(_SEPARATOR)
    if len(parts) != 3:
        raise Unauthorized("internal_credential_invalid")
    client_id, key_id, scopes = parts
    if not client_id:
        return None
    try:
        granted = frozenset(Scope(name) for name in scopes.split(",") if name)
    except ValueError:
        raise Unauthorized("internal_credential_invalid") from None
    return Principal(key_id=key_id or None, client_id=client_id, scopes=granted)
