"""Borrow rates of one or several tickers, with their components."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from pricer.endpoints.common import json_response, utc_now
from pricer.endpoints.views import rate_response
from pricer.errors import InvalidParameter, TickerNotFound
from pricer.marketdata.service import MarketData
from pricer.schemas import RateListError, RateListResponse
from pricer.tickers import TICKER_RULE, normalize_ticker
from pricer.validation import reject_duplicate_query_params, require_ticker

MAX_TICKERS_PER_CALL = 1000


class RateEndpoints:
    def __init__(self, market: MarketData) -> None:
        self._market = market

    async def rate(self, request: Request) -> Response:
        ticker = require_ticker(request.path_params["ticker"], location="path")
        (rate,) = await self._market.ticker_rates([ticker], utc_now())
        if rate is None:
            raise TickerNotFound(ticker)
        return json_response(rate_response(rate))

    async def rates(self, request: Request) -> Response:
        # Unknown parameters are refused before the endpoint runs (pricer.routing), as on every route.
        reject_duplicate_query_params(request.query_params.multi_items())
        raw = request.query_params.get("tickers", "")
        requested = [part for part in (piece.strip() for piece in raw.split(",")) if part]
        if not requested:
            raise InvalidParameter.for_field(
                "tickers", "expected a comma-separated list of tickers", location="query"
            )
        if len(requested) > MAX_TICKERS_PER_CALL:
            raise InvalidParameter.for_field(
                "tickers",
                f"at most {MAX_TICKERS_PER_CALL} tickers per call (got {len(requested)})",
                location="query",
            )
        errors: list[RateListError] = []
        tickers: list[str] = []
        for part in requested:
            ticker = normalize_ticker(part)
            if ticker is None:
                errors.append(
                    RateListError(
                        ticker=part, error_code="INVALID_PARAMETER", error=f"expected {TICKER_RULE}"
                    )
                )
            elif ticker not in tickers:
                tickers.append(ticker)
        found = await self._market.ticker_rates(tickers, utc_now()) if tickers else []
        rates = []
        for ticker, rate in zip(tickers, found, strict=True):
            if rate is None:
                errors.append(
                    RateListError(
                        ticker=ticker, error_code="TICKER_NOT_FOUND", error=f"Unknown ticker: {ticker}"
                    )
                )
            else:
                rates.append(rate_response(rate))
        return json_response(RateListResponse(rates=rates, errors=errors))
