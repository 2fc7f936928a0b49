"""What the sync and async clients share besides the calls: credentials, the bearer token's lifetime, the
last rate-limit headers, pacing and the retry rules. No I/O here; the clients do the sending and sleeping.

Retries, only where they cannot price twice:
- 429 and 503 are answered before anything is priced; they are retried after `Retry-After` as long as the
  waits fit in the caller's `retry_budget` (seconds per call), else raised (`RateLimited.retry_after`).
- A 401 on a bearer token is retried once with a new token (the engine refused the request at the door).
- A broken connection is retried once for reads and PUTs (which change nothing when repeated); a POST only
  when the connection was never made (`httpx.ConnectError`, `ConnectTimeout`: nothing was sent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from pricer_client import calls, errors
from pricer_client.limits import Pacer, RateLimits
from pricer_client.models import Token

log = logging.getLogger("pricer_client")

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# Refresh a bearer token this long before it expires (the engine's tokens live 15 minutes by default), or a
# quarter of its lifetime when that is shorter (an engine with 60 s tokens would otherwise get a token fetch
# before every request).
DEFAULT_TOKEN_REFRESH_MARGIN = 60.0
DEFAULT_RETRY_BUDGET = 30.0
USER_AGENT = "pricer-client/0.1"
TOKEN_PATH = calls.token().path


@dataclass(slots=True)
class _BearerToken:
    value: str
    expires_at: float  # time.monotonic()
    refresh_at: float  # time.monotonic()


class Session:
    """Credentials, limits and the retry rules of one client."""

    def __init__(
        self,
        *,
        api_key: str | None,
        token: str | None,
        use_token: bool,
        token_refresh_margin: float | None,
        retry_budget: float,
        pace: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if use_token and api_key is None:
            raise ValueError("use_token needs the api_key the tokens are fetched with")
        if api_key is None and token is None:
            raise ValueError("give an api_key or a bearer token")
        self.api_key = api_key
        self.use_token = use_token
        self.token_refresh_margin = token_refresh_margin
        self.retry_budget = retry_budget
        self.clock = clock
        self.limits = RateLimits()
        self.pacer: Pacer | None = Pacer(clock) if pace else None
        # A token given by the caller is used as is (its lifetime is unknown to the client).
        self._token = _BearerToken(token, float("inf"), float("inf")) if token is not None else None
        self.tokens_fetched = 0

    # ---- authentication ---------------------------------------------------------------------

    def needs_token(self, call: calls.Call[Any]) -> bool:
        if not self.use_token or not call.authenticated or call.path == TOKEN_PATH:
            return False
        token = self._token
        return token is None or self.clock() >= token.refresh_at

    def token_call(self) -> calls.Call[Token]:
        return calls.token()

    def store_token(self, token: Token, requested_at: float) -> None:
        # The lifetime counts from when the request went out: the token cannot outlive that.
        margin = self.token_refresh_margin
        if margin is None:
            margin = min(DEFAULT_TOKEN_REFRESH_MARGIN, token.expires_in / 4)
        expires_at = requested_at + token.expires_in
        self._token = _BearerToken(token.access_token, expires_at, expires_at - margin)
        self.tokens_fetched += 1

    def drop_token(self) -> None:
        if self.use_token:
            self._token = None

    def headers(self, call: calls.Call[Any]) -> dict[str, str]:
        headers = {"Accept": call.accept, **call.headers}
        if call.content_type is not None:
            headers["Content-Type"] = call.content_type
        if not call.authenticated:
            return headers
        if call.path == TOKEN_PATH or self._token is None:
            # Tokens are exchanged for keys only.
            assert self.api_key is not None
            headers["X-API-Key"] = self.api_key
        else:
            headers["Authorization"] = f"Bearer {self._token.value}"
        return headers

    def may_refresh_after(self, error: errors.PricerError, call: calls.Call[Any]) -> bool:
        return isinstance(error, errors.Unauthorized) and self.use_token and call.path != TOKEN_PATH

    # ---- answers ----------------------------------------------------------------------------

    def read(self, call: calls.Call[calls.T], response: httpx.Response) -> calls.T:
        """The call's result from a response, or the error it answered."""
        self.observe(response.headers)
        if not response.is_success:
            raise errors.error_for(response.status_code, response.content, response.headers)
        try:
            return call.decode(response.content, response.headers.get("content-type", ""))
        except msgspec.DecodeError as undecodable:
            # Not the engine's answer (a proxy's page with a 200, a newer engine's changed shape).
            raise errors.UnexpectedResponse(
                f"{call.method} {call.path}: body not as expected: {undecodable}",
                status=response.status_code,
                request_id=response.headers.get("x-request-id"),
            ) from undecodable

    def observe(self, headers: Mapping[str, str]) -> None:
        limits = RateLimits.from_headers(headers, self.clock())
        if limits is not None:
            self.limits = limits
            if self.pacer is not None:
                self.pacer.observe(limits)

    # ---- retries ----------------------------------------------------------------------------

    def retry_wait(self, error: errors.PricerError, waited: float) -> float | None:
        """Seconds to wait before sending again, None to raise `error`."""
        if not isinstance(error, errors.RateLimited | errors.ServiceUnavailable):
            return None
        # At least a tenth of a second: a `Retry-After: 0` loop still ends when the budget is spent.
        wait = max(error.retry_after if error.retry_after is not None else 1.0, 0.1)
        if waited + wait > self.retry_budget:
            return None
        log.info(
            "Retrying after %s %s in %.1f s (request id %s)",
            error.status,
            error.error_code,
            wait,
            error.request_id,
        )
        return wait

    @staticmethod
    def may_resend(call: calls.Call[Any], failure: httpx.TransportError, resent: bool) -> bool:
        never_sent = isinstance(failure, httpx.ConnectError | httpx.ConnectTimeout)
        if resent or not (call.idempotent or never_sent):
            return False
        log.info("Resending %s %s once after a connection error: %r", call.method, call.path, failure)
        return True

    def pace_wait(self) -> float:
        return self.pacer.wait() if self.pacer is not None else 0.0

    def pace_take(self) -> None:
        if self.pacer is not None:
            self.pacer.take()


def http_options(timeout: httpx.Timeout | float | None, max_connections: int) -> dict[str, object]:
    """Pooled keep-alive connections and timeouts, the same for both clients."""
    return {
        "timeout": DEFAULT_TIMEOUT if timeout is None else timeout,
        "limits": httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        "headers": {"User-Agent": USER_AGENT},
    }
