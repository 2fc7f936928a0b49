"""`PricerClient` and `AdminClient`: the blocking clients (one pooled httpx.Client each)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from types import TracebackType
from typing import Any

import httpx

from pricer_client import calls, errors, models
from pricer_client.limits import RateLimits
from pricer_client.session import DEFAULT_RETRY_BUDGET, Session, http_options


class PricerClient:
    """Quotes and rates. A context manager; `limits` holds the last rate-limit headers.

    `api_key` authenticates every request, or, with `use_token=True`, fetches a bearer token that is
    refreshed `token_refresh_margin` seconds before it expires (default: 60 s, or a quarter
    of the token's lifetime if shorter); `token` uses a bearer token as given.
    `retry_budget` is the most seconds one call waits on `Retry-After` (0 turns the retries off); `pace`
    spaces requests to stay under the client's limit."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        token: str | None = None,
        use_token: bool = False,
        timeout: httpx.Timeout | float | None = None,
        retry_budget: float = DEFAULT_RETRY_BUDGET,
        pace: bool = False,
        token_refresh_margin: float | None = None,
        msgpack_threshold: int = calls.DEFAULT_MSGPACK_THRESHOLD,
        max_connections: int = 10,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._session = Session(
            api_key=api_key,
            token=token,
            use_token=use_token,
            token_refresh_margin=token_refresh_margin,
            retry_budget=retry_budget,
            pace=pace,
        )
        self._msgpack_threshold = msgpack_threshold
        options: dict[str, Any] = http_options(timeout, max_connections)
        self._http = httpx.Client(base_url=base_url, transport=transport, **options)
        self._token_lock = threading.Lock()

    # ---- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> PricerClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def limits(self) -> RateLimits:
        """The request bucket as of the last authenticated response."""
        return self._session.limits

    @property
    def tokens_fetched(self) -> int:
        """Bearer tokens fetched so far (with `use_token`)."""
        return self._session.tokens_fetched

    # ---- the API ----------------------------------------------------------------------------

    def quote(
        self, ticker: str, position_value: Decimal | int | str, loan_days: int, client_id: str
    ) -> models.Quote:
        return self.call(calls.quote(ticker, position_value, loan_days, client_id))

    def batch(
        self,
        client_id: str,
        positions: Sequence[calls.PositionLike] | calls.ColumnsLike,
        *,
        atomic: bool = False,
    ) -> models.BatchResult:
        """Many quotes in one call; `.columns()` on the result gives them column by column."""
        return self.call(
            calls.batch(client_id, positions, atomic=atomic, msgpack_threshold=self._msgpack_threshold)
        )

    def get_quote(self, quote_id: str) -> models.Quote:
        return self.call(calls.get_quote(quote_id))

    def rate(self, ticker: str) -> models.Rate:
        return self.call(calls.rate(ticker))

    def rates(self, tickers: Iterable[str]) -> models.RateList:
        return self.call(calls.rates(tickers))

    def health(self) -> models.Health:
        return self.call(calls.health())

    # ---- sending ----------------------------------------------------------------------------

    def call(self, call: calls.Call[calls.T]) -> calls.T:
        """Send one call with the retries it allows (see `pricer_client.session`)."""
        session = self._session
        if session.needs_token(call):
            with self._token_lock:
                if session.needs_token(call):  # another thread may have fetched it meanwhile
                    self._fetch_token()
        waited = 0.0
        resent = refreshed = False
        while True:
            try:
                return session.read(call, self._send(call))
            except httpx.TransportError as failure:
                if not session.may_resend(call, failure, resent):
                    raise errors.TransportError(f"{call.method} {call.path}: {failure!r}") from failure
                resent = True
            except errors.PricerError as error:
                if session.may_refresh_after(error, call) and not refreshed:
                    refreshed = True
                    with self._token_lock:
                        self._fetch_token()
                    continue
                wait = session.retry_wait(error, waited)
                if wait is None:
                    raise
                time.sleep(wait)
                waited += wait

    def _send(self, call: calls.Call[Any]) -> httpx.Response:
        if call.authenticated:
            pause = self._session.pace_wait()
            while pause > 0:
                time.sleep(pause)
                pause = self._session.pace_wait()
            self._session.pace_take()
        return self._http.request(
            call.method,
            call.path,
            params=call.params,
            content=call.content,
            headers=self._session.headers(call),
        )

    def _fetch_token(self) -> None:
        requested_at = self._session.clock()
        self._session.drop_token()
        token = self.call(self._session.token_call())
        self._session.store_token(token, requested_at)


class AdminClient(PricerClient):
    """The admin calls (an admin key): clients, stocks, market data, keys; and every call of PricerClient."""

    def __enter__(self) -> AdminClient:
        return self

    def put_client(
        self,
        client_id: str,
        *,
        markup_percentage: Decimal | int | str,
        transaction_fee_type: str,
        transaction_amount: Decimal | int | str,
        day_count: int | None = None,
        active: bool | None = None,
        rate_limit_per_minute: int | None = None,
        burst: int | None = None,
    ) -> models.ClientRecord:
        return self.call(
            calls.put_client(
                client_id,
                markup_percentage=markup_percentage,
                transaction_fee_type=transaction_fee_type,
                transaction_amount=transaction_amount,
                day_count=day_count,
                active=active,
                rate_limit_per_minute=rate_limit_per_minute,
                burst=burst,
            )
        )

    def put_stock(
        self, ticker: str, *, min_borrow_rate: Decimal | int | str, borrow_status: str | None = None
    ) -> models.StockRecord:
        return self.call(
            calls.put_stock(ticker, min_borrow_rate=min_borrow_rate, borrow_status=borrow_status)
        )

    def put_volatility(self, value: Decimal | int | str) -> models.Volatility:
        return self.call(calls.put_volatility(value))

    def put_events(self, ticker: str, events: Sequence[models.Event]) -> models.Events:
        return self.call(calls.put_events(ticker, events))

    def upload_availability(self, text: str | bytes) -> models.AvailabilityUpload:
        return self.call(calls.upload_availability(text))

    def upload_vix(self, text: str | bytes) -> models.LoadResult:
        return self.call(calls.upload_vix(text))

    def upload_earnings(self, text: str | bytes) -> models.LoadResult:
        return self.call(calls.upload_earnings(text))

    def issue_key(
        self, client_id: str, *, scopes: Sequence[str] | None = None, expires_in_days: int | None = None
    ) -> models.IssuedKey:
        return self.call(calls.issue_key(client_id, scopes=scopes, expires_in_days=expires_in_days))

    def revoke_key(self, key_id: str) -> None:
        self.call(calls.revoke_key(key_id))
