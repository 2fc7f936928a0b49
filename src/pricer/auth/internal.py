"""The gateway's internal credential: how a backend (ROLE=calculation or data) knows that a call comes
from a gateway, and for whom it acts (DESIGN §1 Roles).

The gateway authenticates the client (key or JWT), then signs a short-lived statement of the principal it
admitted: `v1.<payload>.<signature>` in the `X-Internal-Credential` header, where the payload is the
base64url of `client_id 0x1f key_id 0x1f scopes 0x1f expiry (unix seconds) 0x1f request id` and the
signature the base64url of HMAC-SHA256 under INTERNAL_SERVICE_SECRET over the payload's text. A payload
with an empty client id states "no principal" (the gateway runs with ENABLE_AUTHENTICATION=false: the
backend then acts, and charges, as the client the request names, as `all` does).

The backend checks the signature in constant time, the expiry, and that the request id is the request's
own (a credential is good for the call it was made for and a retry of it, within its lifetime). Checks
are cached by the whole header value for the credential's lifetime, so a retried call costs a dict
lookup; a first check costs one HMAC (a few µs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
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


class InternalCredentials:
    """Signs (gateway) and verifies (backends) the internal credential with one shared secret."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        self._key = secret.encode()
        self._clock = clock
        # header value -> (principal or None, expiry, request id)
        self._verified: dict[bytes, tuple[Principal | None, int, str]] = {}

    def sign(self, principal: Principal | None, request_id: str) -> str:
        expiry = int(self._clock()) + LIFETIME_SECONDS
        if principal is None:
            fields = ("", "", "", str(expiry), request_id)
        else:
            scopes = ",".join(sorted(scope.value for scope in principal.scopes))
            fields = (principal.client_id, principal.key_id or "", scopes, str(expiry), request_id)
        payload = base64.urlsafe_b64encode(_SEPARATOR.join(fields).encode()).rstrip(b"=")
        signature = base64.urlsafe_b64encode(self._mac(payload)).rstrip(b"=")
        return f"v1.{payload.decode()}.{signature.decode()}"

    def verify(self, header: bytes | None, request_id: str) -> Principal | None:
        """The principal the credential states (None: the gateway authenticates no one); Unauthorized
        when it is missing, forged, expired or made for another request."""
        if header is None:
            raise Unauthorized("internal_credential_missing")
        now = self._clock()
        cached = self._verified.get(header)
        if cached is None:
            cached = self._check(header)
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()  # expired entries go with the rest; a miss costs one HMAC
            self._verified[header] = cached
        principal, expiry, bound_to = cached
        if expiry < now or not hmac.compare_digest(bound_to, request_id):
            raise Unauthorized("internal_credential_invalid")
        return principal

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def _check(self, header: bytes) -> tuple[Principal | None, int, str]:
        version, _, rest = header.partition(b".")
        payload, _, signature = rest.partition(b".")
        if version != b"v1" or not payload or not signature:
            raise Unauthorized("internal_credential_invalid")
        try:
            presented = base64.urlsafe_b64decode(signature + b"=" * (-len(signature) % 4))
            text = base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)).decode()
        except ValueError:
            raise Unauthorized("internal_credential_invalid") from None
        if not hmac.compare_digest(presented, self._mac(payload)):
            raise Unauthorized("internal_credential_invalid")
        parts = text.split(_SEPARATOR)
        if len(parts) != 5 or not parts[3].isdigit():
            raise Unauthorized("internal_credential_invalid")
        client_id, key_id, scopes, expiry, request_id = parts
        if not client_id:
            return None, int(expiry), request_id
        try:
            granted = frozenset(Scope(name) for name in scopes.split(",") if name)
        except ValueError:
            raise Unauthorized("internal_credential_invalid") from None
        return Principal(key_id=key_id or None, client_id=client_id, scopes=granted), int(expiry), request_id
