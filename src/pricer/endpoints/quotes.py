"""Locate-fee quotes: single (POST body or GET query), batch (JSON or msgpack), and read-back."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from pricer.auth.admission import Admission
from pricer.batch_pool import BatchPool
from pricer.context import principal, request_id
from pricer.endpoints.common import json_response, utc_now, wants_msgpack
from pricer.endpoints.views import quote_response
from pricer.errors import FieldProblem, InvalidParameter, NotFound
from pricer.models import FeeType, Scope
from pricer.pricing.core import FeeTerms, to_scaled_int
from pricer.quotes import TickerRate, new_batch_id, split_quote_id
from pricer.quoting import Quoter
from pricer.ratelimit.limits import ClientLimits
from pricer.schemas import (
    BatchPosition,
    BatchRequest,
    FeeScheduleView,
    LenientBatchRequest,
    QuoteRequest,
    RowError,
)
from pricer.stores.protocols import QuoteStore
from pricer.tickers import TICKER_RULE
from pricer.validation import (
    JSON,
    MSGPACK,
    Decoder,
    require_places,
    require_ticker,
    whole_number,
    written_json,
    written_places,
)

MAX_POSITION_VALUE = 1_000_000_000
_POSITION_FIELDS = frozenset(BatchPosition.__struct_fields__)


class QuoteEndpoints:
    def __init__(
        self,
        quoter: Quoter,
        quotes: QuoteStore,
        *,
        admission: Admission,
        limits: ClientLimits | None,
        max_batch_size: int,
        pool: BatchPool,
    ) -> None:
        self._quoter = quoter
        self._quotes = quotes
        # Who may act for the client a body names (and, without authentication, its charge)...
        self._admission = admission
        # ...and the positions bucket the batch endpoint draws from (None: rate limiting is off).
        self._limits = limits
        self._max_batch_size = max_batch_size
        # Large batches are decoded, priced and encoded off the event loop there.
        self._pool = pool
        self._single = Decoder(QuoteRequest, places={"position_value": 2})
        self._batch = Decoder(BatchRequest, accept_msgpack=True)
        self._lenient_batch = Decoder(LenientBatchRequest, accept_msgpack=True)

    # ---- single -----------------------------------------------------------------------------

    async def calculate_locate(self, request: Request) -> Response:
        # HEAD is GET without the body (the route lists it in Allow; the server leaves the body out), so it
        # reads the query, not a request body.
        if request.method in ("GET", "HEAD"):
            location = "query"
            quote = self._single.convert_query(request.query_params)
        else:
            location = "body"
            media = self._single.media_type(request)
            quote = self._single.decode(await request.body(), media)
        valid = self._single.valid_params
        ticker = require_ticker(quote.ticker, location=location, valid_params=valid)
        cents = require_places(
            quote.position_value, 2, "position_value", location=location, valid_params=valid
        )
        loan_days = whole_number(quote.loan_days, "loan_days", location=location, valid_params=valid)
        acting = await self._admission.act_for(request.scope, quote.client_id)
        terms = await self._quoter.client_terms(quote.client_id)
        batch = await self._quoter.price_single(
            terms,
            ticker=ticker,
            position_cents=cents,
            loan_days=loan_days,
            key_id=acting.key_id,
            request_id=request_id(request.scope),
            now=utc_now(),
        )
        await self._quotes.add(batch)
        return json_response(quote_response(batch))

    # ---- batch ------------------------------------------------------------------------------

    async def calculate_batch(self, request: Request) -> Response:
        media = self._batch.media_type(request)
        atomic = _flag(request.query_params.get("atomic"), "atomic")
        async with self._pool.decode(request, media, max_batch_size=self._max_batch_size) as job:
            decoded = job.summary
            scope = request.scope
            now = utc_now()
            rates: list[TickerRate | None] | None = None
            if atomic:
                # Every invalid row listed, unknown tickers included (ticker existence is market data, not
                # anything of the client's), and the whole batch refused before anything is drawn.
                rates = await self._quoter.batch_rates(decoded.tickers, now)
                if decoded.error_count or None in rates:
                    check = await job.price(
                        _price_arguments(rates, CHECK_TERMS, None, None, "", now, decoded.client_id),
                        None,
                        content_type=b"",
                        keep=True,
                    )
                    if check.error_count:
                        raise _atomic_failure(check.errors, check.error_count)
            acting = await self._admission.act_for(scope, decoded.client_id)
            terms = await self._quoter.client_terms(decoded.client_id)
            if rates is None:
                # Market data asked once, for the distinct tickers: one snapshot for the whole batch.
                rates = await self._quoter.batch_rates(decoded.tickers, now)
            if self._limits is not None:
                drawn = decoded.count - decoded.error_count
                await self._limits.draw_positions(scope, decoded.client_id, drawn)
            msgpack = wants_msgpack(request.headers.get("accept"), default=media == MSGPACK)
            outcome = await job.price(
                _price_arguments(rates, terms.terms, terms.view, acting.key_id, request_id(scope), now, ""),
                {"fee_schedule": terms.view, "msgpack": msgpack},
                content_type=b"application/msgpack" if msgpack else b"application/json",
            )
        if atomic and outcome.error_count:
            raise _atomic_failure(outcome.errors, outcome.error_count)
        self._quoter.record_batch(outcome.batch)
        await self._quotes.add(outcome.batch)
        assert outcome.response is not None
        return outcome.response

    async def _add_unknown_ticker_errors(self, tickers: list[str], errors: list[RowError]) -> None:
        in_error = {error.index for error in errors}
        candidates = {ticker for index, ticker in enumerate(tickers) if ticker and index not in in_error}
        unknown = await self._quoter.unknown_tickers(sorted(candidates))
        for index, ticker in enumerate(tickers):
            if ticker in unknown and index not in in_error:
                errors.append(
                    RowError(
                        index=index,
                        error_code="TICKER_NOT_FOUND",
                        error=f"Unknown ticker: {ticker}",
                        field="ticker",
                    )
                )

    # ---- read-back --------------------------------------------------------------------------

    async def get_quote(self, request: Request) -> Response:
        quote_id = request.path_params["quote_id"]
        quote = await self._quotes.get(quote_id) if split_quote_id(quote_id) is not None else None
        reader = principal(request.scope)
        if quote is None or not (reader.allows(Scope.AUDIT) or reader.client_id == quote.client_id):
            # Another client's quote is not disclosed, not even its existence.
            raise NotFound("Unknown quote", details={"quote_id": quote_id})
        return json_response(quote_response(quote))


# Terms an atomic batch's rows are checked with before the client's own are read (the figures are not kept).
CHECK_TERMS = FeeTerms(day_count=365, markup_units=0, percentage_fee=False, transaction_units=0)
_CHECK_VIEW = FeeScheduleView(
    markup_percentage=0.0, transaction_fee_type=FeeType.FLAT, transaction_amount=0.0, day_count=365
)


def _price_arguments(
    rates: list[TickerRate | None],
    terms: FeeTerms,
    view: FeeScheduleView | None,
    key_id: str | None,
    request: str,
    now: dt.datetime,
    _client: str,
) -> dict[str, Any]:
    return {
        "terms": terms,
        "rates": rates,
        "batch_id": new_batch_id(),
        "key_id": key_id,
        "request_id": request,
        "now": now,
        "fee_schedule": view or _CHECK_VIEW,
    }


def _flag(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    raise InvalidParameter.for_field(name, "expected true or false", location="query")


def _lenient_rows(
    positions: list[Any],
) -> tuple[
    list[Any], np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]], list[RowError]
]:
    """Columns of loosely decoded rows; a row of the wrong shape or types gets an error and NaNs."""
    count = len(positions)
    tickers: list[Any] = [None] * count
    values = np.full(count, np.nan)
    days = np.full(count, np.nan)
    errors: list[RowError] = []
    for index, row in enumerate(positions):
        problem = _row_problem(row)
        if problem is not None:
            errors.append(
                RowError(
                    index=index, error_code="INVALID_PARAMETER", error=problem.message, field=problem.field
                )
            )
            continue
        tickers[index] = row["ticker"]
        values[index] = row["position_value"]
        days[index] = row["loan_days"]
    return tickers, values, days, errors


def _add_written_places_errors(body: bytes, errors: list[RowError]) -> None:
    """A row error for each position_value written with more than 2 decimals that its float hides
    (100.00999999999999999 reads as 100.01): the body read again with its numbers exact."""
    positions = written_json(body).get("positions")
    in_error = {error.index for error in errors}
    for index, row in enumerate(positions if isinstance(positions, list) else ()):
        if index not in in_error and isinstance(row, dict) and written_places(row.get("position_value")) > 2:
            errors.append(
                RowError(
                    index=index,
                    error_code="INVALID_PARAMETER",
                    error="position_value: expected a number at most 2 decimals",
                    field="position_value",
                )
            )


def _row_problem(row: Any) -> FieldProblem | None:
    if not isinstance(row, dict):
        return FieldProblem("position", "body", "expected an object with ticker, position_value, loan_days")
    unknown = sorted(set(row) - _POSITION_FIELDS)
    if unknown:
        return FieldProblem(str(unknown[0]), "body", f"unknown field `{unknown[0]}`")
    for name in ("ticker", "position_value", "loan_days"):
        if name not in row:
            return FieldProblem(name, "body", f"missing required field `{name}`")
    if not isinstance(row["ticker"], str):
        return FieldProblem("ticker", "body", "ticker: expected a string")
    value = row["position_value"]
    if isinstance(value, bool) or not isinstance(value, int | float) or abs(value) > 1e15:
        return FieldProblem("position_value", "body", "position_value: expected a number")
    days = row["loan_days"]
    # An integral float (30.0) is an integer, as in JSON Schema; _check_rows refuses 30.5.
    if isinstance(days, bool) or not isinstance(days, int | float) or abs(days) > 1_000_000:
        return FieldProblem("loan_days", "body", "loan_days: expected an integer from 1 to 365")
    return None


def _check_rows(
    tickers: list[str],
    values: np.ndarray[Any, np.dtype[np.float64]],
    days: np.ndarray[Any, np.dtype[np.float64]],
    errors: list[RowError],
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], list[RowError]]:
    """The value rules for every row not already in error (one error per row, first rule broken
    first); exact cents of each position. `tickers` holds "" where a ticker did not normalise."""
    already = np.zeros(len(tickers), dtype=bool)
    for error in errors:
        already[error.index] = True
    for index, ticker in enumerate(tickers):
        if not ticker and not already[index]:
            errors.append(
                RowError(
                    index=index,
                    error_code="INVALID_PARAMETER",
                    error=f"ticker: expected {TICKER_RULE}",
                    field="ticker",
                )
            )
            already[index] = True
    cents, exact = to_scaled_int(np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), 2)
    finite = np.isfinite(values)
    in_range = finite & (values >= 0.01) & (values <= MAX_POSITION_VALUE)
    places_ok = exact & finite
    days_ok = np.isfinite(days) & (days >= 1) & (days <= 365) & (days == np.floor(days))
    for index in np.flatnonzero(~already & ~(in_range & places_ok)).tolist():
        rule = "from 0.01 to 1,000,000,000" if not in_range[index] else "at most 2 decimals"
        errors.append(
            RowError(
                index=index,
                error_code="INVALID_PARAMETER",
                error=f"position_value: expected a number {rule}",
                field="position_value",
            )
        )
        already[index] = True
    for index in np.flatnonzero(~already & ~days_ok).tolist():
        errors.append(
            RowError(
                index=index,
                error_code="INVALID_PARAMETER",
                error="loan_days: expected an integer from 1 to 365",
                field="loan_days",
            )
        )
    return cents, errors


def _atomic_failure(errors: list[RowError], count: int | None = None) -> InvalidParameter:
    errors.sort(key=lambda error: error.index)
    count = len(errors) if count is None else count
    return InvalidParameter(
        f"{count} invalid position(s); atomic batch rejected",
        problems=[
            FieldProblem(f"positions[{error.index}].{error.field or 'position'}", "body", error.error)
            for error in errors[:1000]
        ],
        details={
            "invalid_rows": count,
            "errors": [
                {"index": e.index, "error_code": e.error_code, "error": e.error, "field": e.field}
                for e in errors[:1000]
            ],
        },
    )


__all__ = ["JSON", "QuoteEndpoints"]
