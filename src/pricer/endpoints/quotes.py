"""Locate-fee quotes: single (POST body or GET query), batch (JSON or msgpack), and read-back."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from pricer.auth.admission import Admission
from pricer.batch_pool import BatchPool
from pricer.context import principal, request_id
from pricer.endpoints.common import json_response, utc_now, wants_msgpack
from pricer.endpoints.views import quote_response
from pricer.errors import FieldProblem, InvalidParameter, NotFound
from pricer.models import Scope
from pricer.quotes import new_batch_id, split_quote_id
from pricer.quoting import Quoter
from pricer.ratelimit.limits import ClientLimits
from pricer.schemas import BatchRequest, QuoteRequest, RowError
from pricer.stores.protocols import QuoteStore
from pricer.validation import (
    JSON,
    MSGPACK,
    Decoder,
    require_places,
    require_ticker,
    whole_number,
)


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
        # Runs the batch steps: inline for a small body, in a worker process for a large one.
        self._pool = pool
        self._single = Decoder(QuoteRequest, places={"position_value": 2})
        # The batch body is decoded by `pricer.batches`; this one only tells its media type.
        self._batch = Decoder(BatchRequest, accept_msgpack=True)

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
        """decode -> who may act for the client -> its terms -> the positions bucket (every decoded row) ->
        market data (once, for the distinct tickers) -> price and encode -> audit. The steps are the
        synchronous functions of `pricer.batches`, run by the batch pool: inline for a small body, in a
        worker process for a large one (`pricer.batch_pool`), so that no batch holds the event loop."""
        media = self._batch.media_type(request)
        atomic = _flag(request.query_params.get("atomic"), "atomic")
        async with self._pool.decode(request, media, max_batch_size=self._max_batch_size) as job:
            decoded = job.summary
            client_id = decoded.client_id
            scope = request.scope
            acting = await self._admission.act_for(scope, client_id)
            terms = await self._quoter.client_terms(client_id)
            if self._limits is not None:
                # Every decoded row costs work, priced or not (DESIGN §2.5): invalid rows are not free.
                await self._limits.draw_positions(scope, client_id, decoded.count)
            now = utc_now()
            rates, market_seconds = await self._quoter.batch_rates(decoded.tickers, now)
            msgpack = wants_msgpack(request.headers.get("accept"), default=media == MSGPACK)
            with self._quoter.tracing.span("pricing", {"positions": decoded.valid}):
                outcome = await job.price(
                    {
                        "terms": terms.terms,
                        "rates": rates,
                        "fee_schedule": terms.view,
                        "batch_id": new_batch_id(),
                        "key_id": acting.key_id,
                        "request_id": request_id(scope),
                        "now": now,
                    },
                    {"fee_schedule": terms.view, "msgpack": msgpack},
                    content_type=b"application/msgpack" if msgpack else b"application/json",
                    # An atomic batch with an invalid row is refused: its response is not encoded.
                    encode_with_errors=not atomic,
                )
        seconds = market_seconds + outcome.pricing_seconds
        self._quoter.record_batch(outcome.batch, seconds, fallback=outcome.fallback_rows)
        if atomic and outcome.error_count:
            # Every invalid row listed, unknown tickers included (market data was asked once for all).
            raise _atomic_failure(outcome.errors, outcome.error_count)
        await self._quotes.add(outcome.batch)
        assert outcome.response is not None
        return outcome.response

    # ---- read-back --------------------------------------------------------------------------

    async def get_quote(self, request: Request) -> Response:
        quote_id = request.path_params["quote_id"]
        quote = await self._quotes.get(quote_id) if split_quote_id(quote_id) is not None else None
        reader = principal(request.scope)
        if quote is None or not (reader.allows(Scope.AUDIT) or reader.client_id == quote.client_id):
            # Another client's quote is not disclosed, not even its existence.
            raise NotFound("Unknown quote", details={"quote_id": quote_id})
        return json_response(quote_response(quote))


def _flag(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    raise InvalidParameter.for_field(name, "expected true or false", location="query")


def _atomic_failure(errors: list[RowError], count: int) -> InvalidParameter:
    """The 400 of an atomic batch with `count` invalid rows, the first of which are `errors`."""
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
