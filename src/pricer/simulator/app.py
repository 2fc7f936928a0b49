"""The simulator's ASGI app (Starlette): the three provider APIs of DESIGN §3.1 and the control API that
changes their data, switches their faults and reads how they were called. See the README's "Provider
simulator" section for the contract.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pricer.simulator.data import (
    EventItem,
    LenderRate,
    ProviderData,
    VolatilityValue,
    derive_status,
    iso_z,
    lookup_ticker,
)
from pricer.simulator.faults import (
    DRIP_INTERVAL_SECONDS,
    PROVIDERS,
    BadAnswer,
    FaultPlan,
    Provider,
    bad_answer,
    huge_body,
)

__all__ = ["TRANSPORT_EXTENSION", "ProviderStats", "SimulatorState", "create_simulator_app"]

# The scope extension under which the simulator's protocol hands the connection's transport to the app, so
# that the `down` fault can drop the connection without an answer (ASGI itself has no way to).
TRANSPORT_EXTENSION = "pricer.simulator.transport"

_JSON = "application/json"
_encoder = msgspec.json.Encoder()


class ProviderStats(msgspec.Struct):
    """How one provider was called since the last reset: calls past the key check, per ticker (lender and
    calendar), calls refused for their key, and the most calls it held at once."""

    calls: int = 0
    by_ticker: dict[str, int] = msgspec.field(default_factory=dict)
    unauthorized: int = 0
    in_flight: int = 0
    max_concurrent: int = 0


class SimulatorState:
    """The providers' data, faults and call counts (one event loop: no locks needed)."""

    def __init__(self, data: ProviderData, api_key: str | None, *, seed: int | None = None) -> None:
        self.data = data
        self.api_key = api_key.encode() if api_key else None
        self.faults: dict[Provider, FaultPlan] = {provider: FaultPlan() for provider in PROVIDERS}
        self.stats: dict[Provider, ProviderStats] = {provider: ProviderStats() for provider in PROVIDERS}
        self.redirects_followed = 0
        # Which calls of the `error` mode fail: a simulation's draw, nothing secret.
        self.random = random.Random(seed)  # noqa: S311

    def reset_stats(self) -> None:
        for provider in PROVIDERS:
            in_flight = self.stats[provider].in_flight
            # Calls still held (a hang) stay counted as in flight, so the counter comes back to zero.
            self.stats[provider] = ProviderStats(in_flight=in_flight, max_concurrent=in_flight)
        self.redirects_followed = 0

    def stats_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for provider in PROVIDERS:
            stats = self.stats[provider]
            entry: dict[str, Any] = {"calls": stats.calls, "unauthorized": stats.unauthorized}
            if provider != "volatility":
                entry["by_ticker"] = dict(stats.by_ticker)
            document[provider] = entry
        document["max_concurrent"] = {provider: self.stats[provider].max_concurrent for provider in PROVIDERS}
        document["in_flight"] = {provider: self.stats[provider].in_flight for provider in PROVIDERS}
        document["redirects_followed"] = self.redirects_followed
        return document

    def faults_document(self) -> dict[str, Any]:
        return {provider: msgspec.to_builtins(self.faults[provider]) for provider in PROVIDERS}

    def key_ok(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("x-api-key", "").encode()
        return hmac.compare_digest(given, self.api_key)


def _json(content: object, status: int = 200) -> Response:
    return Response(_encoder.encode(content), status_code=status, media_type=_JSON)


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


# ---- valid answers ----------------------------------------------------------------------------------------


def _lender_answer(state: SimulatorState, ticker_text: str) -> Response:
    ticker = lookup_ticker(ticker_text)
    rate = state.data.lender.get(ticker) if ticker is not None else None
    if rate is None:
        return _error(404, "unknown")
    return _json(rate)


def _volatility_answer(state: SimulatorState) -> Response:
    return _json(state.data.volatility)


def _events_answer(state: SimulatorState, ticker_text: str | None) -> Response:
    if not ticker_text:
        return _error(400, "the ticker query parameter is required")
    ticker = lookup_ticker(ticker_text)
    events = state.data.events.get(ticker, []) if ticker is not None else []
    return _json({"events": events})


# ---- faults -----------------------------------------------------------------------------------------------


async def _until_disconnect(request: Request) -> None:
    """Hold the call until the client goes away (a request without a body has nothing else to receive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _drip(body: bytes) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        for index in range(len(body)):
            if index:
                await asyncio.sleep(DRIP_INTERVAL_SECONDS)
            yield body[index : index + 1]

    return chunks()


async def _faulty(
    state: SimulatorState, provider: Provider, request: Request, valid: Callable[[], Response]
) -> Response | None:
    """The answer under the provider's fault plan; None when the connection was dropped (`down`) or the
    client left while held (`hang`): there is nothing to send then."""
    plan = state.faults[provider]
    if plan.latency_ms:
        await asyncio.sleep(plan.latency_ms / 1000)
    if plan.mode == "ok":
        return valid()
    if plan.mode == "error":
        if state.random.random() < plan.error_rate:
            status = state.random.choice((500, 503))
            return _error(status, "simulated provider error")
        return valid()
    if plan.mode == "hang":
        await _until_disconnect(request)
        return None
    if plan.mode == "down":
        transport = request.scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
        if transport is None:
            raise RuntimeError("the down fault needs the simulator's own server (pricer simulate-sources)")
        transport.abort()
        await _until_disconnect(request)
        return None
    kind = plan.malformed
    assert kind is not None  # FaultPlan.problem() refused the plan otherwise
    if kind in ("huge_body", "drip"):
        answer = valid()
        body = bytes(answer.body)
        if kind == "huge_body":
            return Response(huge_body(body), status_code=answer.status_code, media_type=_JSON)
        headers = {"content-length": str(len(body))}
        return StreamingResponse(
            _drip(body), status_code=answer.status_code, media_type=_JSON, headers=headers
        )
    if kind == "redirect":
        target = request.url.replace(path="/redirected" + request.url.path)
        return Response(b"", status_code=302, headers={"location": str(target)})
    return _bad(bad_answer(provider, kind))


def _bad(answer: BadAnswer) -> Response:
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type)


async def _provider_call(
    state: SimulatorState,
    provider: Provider,
    request: Request,
    ticker: str | None,
    valid: Callable[[], Response],
) -> Response:
    stats = state.stats[provider]
    if not state.key_ok(request):
        stats.unauthorized += 1
        return _error(401, "missing or wrong X-API-Key")
    stats.calls += 1
    if ticker is not None:
        stats.by_ticker[ticker] = stats.by_ticker.get(ticker, 0) + 1
    stats.in_flight += 1
    stats.max_concurrent = max(stats.max_concurrent, stats.in_flight)
    streaming = False
    try:
        answer = await _faulty(state, provider, request, valid)
        if isinstance(answer, StreamingResponse):
            # A drip is in flight until its last byte is sent or its client leaves.
            answer.body_iterator = _counted(state, provider, answer.body_iterator)
            streaming = True
    finally:
        if not streaming:
            _call_ended(state, provider)
    # Nothing to send: the client is gone; an empty 204 is what uvicorn is told (it writes nothing then).
    return answer if answer is not None else Response(status_code=204)


def _call_ended(state: SimulatorState, provider: Provider) -> None:
    # The stats may have been reset meanwhile: count down on the current record.
    state.stats[provider].in_flight -= 1


async def _counted(
    state: SimulatorState, provider: Provider, chunks: AsyncIterable[str | bytes | memoryview]
) -> AsyncIterator[str | bytes | memoryview]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        _call_ended(state, provider)


def _provider_routes(state: SimulatorState) -> list[Route]:
    async def borrows(request: Request) -> Response:
        ticker = request.path_params["ticker"]
        return await _provider_call(state, "lender", request, ticker, lambda: _lender_answer(state, ticker))

    async def vix(request: Request) -> Response:
        return await _provider_call(state, "volatility", request, None, lambda: _volatility_answer(state))

    async def events(request: Request) -> Response:
        ticker = request.query_params.get("ticker")
        return await _provider_call(state, "events", request, ticker, lambda: _events_answer(state, ticker))

    async def redirected_borrows(request: Request) -> Response:
        state.redirects_followed += 1
        return _lender_answer(state, request.path_params["ticker"])

    async def redirected_vix(request: Request) -> Response:
        state.redirects_followed += 1
        return _volatility_answer(state)

    async def redirected_events(request: Request) -> Response:
        state.redirects_followed += 1
        return _events_answer(state, request.query_params.get("ticker"))

    return [
        Route("/api/borrows/{ticker}", borrows, methods=["GET"]),
        Route("/api/market/vix", vix, methods=["GET"]),
        Route("/api/calendar/events", events, methods=["GET"]),
        Route("/redirected/api/borrows/{ticker}", redirected_borrows, methods=["GET"]),
        Route("/redirected/api/market/vix", redirected_vix, methods=["GET"]),
        Route("/redirected/api/calendar/events", redirected_events, methods=["GET"]),
    ]


# ---- control API ------------------------------------------------------------------------------------------


class LenderUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rate: float
    status: str | None = None


class VolatilityUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    value: float
    timestamp: dt.datetime | None = None


class ControlEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    date: dt.date
    type: str = "earnings"
    risk_factor: int | None = None


class EventsUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    events: list[ControlEvent]


T = TypeVar("T")


async def _decode(request: Request, kind: type[T]) -> T | Response:
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except msgspec.DecodeError as error:  # ValidationError is a DecodeError
        return _error(400, str(error))


def _control_routes(state: SimulatorState) -> list[Route]:
    async def lender(request: Request) -> Response:
        ticker = lookup_ticker(request.path_params["ticker"])
        if ticker is None:
            return _error(400, "not a ticker")
        if request.method == "DELETE":
            state.data.lender.pop(ticker, None)
            return _json({"ticker": ticker, "rate": None, "status": None})
        update = await _decode(request, LenderUpdate)
        if isinstance(update, Response):
            return update
        status = update.status if update.status is not None else derive_status(update.rate)
        state.data.lender[ticker] = LenderRate(rate=update.rate, status=status)
        return _json({"ticker": ticker, "rate": update.rate, "status": status})

    async def volatility(request: Request) -> Response:
        update = await _decode(request, VolatilityUpdate)
        if isinstance(update, Response):
            return update
        moment = update.timestamp or dt.datetime.now(dt.UTC)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        state.data.volatility = VolatilityValue(value=update.value, timestamp=iso_z(moment))
        return _json(state.data.volatility)

    async def events(request: Request) -> Response:
        ticker = lookup_ticker(request.path_params["ticker"])
        if ticker is None:
            return _error(400, "not a ticker")
        update = await _decode(request, EventsUpdate)
        if isinstance(update, Response):
            return update
        items = [
            EventItem(type=event.type, date=event.date.isoformat(), risk_factor=event.risk_factor)
            for event in update.events
        ]
        state.data.events[ticker] = items
        return _json({"ticker": ticker, "events": items})

    async def fault(request: Request) -> Response:
        target = request.path_params["provider"]
        if target != "all" and target not in PROVIDERS:
            return _error(404, "provider is one of lender, volatility, events, all")
        plan = await _decode(request, FaultPlan)
        if isinstance(plan, Response):
            return plan
        problem = plan.problem()
        if problem is not None:
            return _error(400, problem)
        for provider in PROVIDERS if target == "all" else (target,):
            state.faults[provider] = plan
        return _json(state.faults_document())

    async def faults(request: Request) -> Response:
        if request.method == "DELETE":
            for provider in PROVIDERS:
                state.faults[provider] = FaultPlan()
        return _json(state.faults_document())

    async def stats(request: Request) -> Response:
        if request.method == "DELETE":
            state.reset_stats()
        return _json(state.stats_document())

    async def health(request: Request) -> Response:
        return _json(
            {
                "status": "ok",
                "lender_tickers": len(state.data.lender),
                "event_tickers": len(state.data.events),
                "volatility": state.data.volatility,
            }
        )

    return [
        Route("/control/lender/{ticker}", lender, methods=["PUT", "DELETE"]),
        Route("/control/volatility", volatility, methods=["PUT"]),
        Route("/control/events/{ticker}", events, methods=["PUT"]),
        Route("/control/faults/{provider}", fault, methods=["PUT"]),
        Route("/control/faults", faults, methods=["GET", "DELETE"]),
        Route("/control/stats", stats, methods=["GET", "DELETE"]),
        Route("/control/health", health, methods=["GET"]),
    ]


def create_simulator_app(state: SimulatorState) -> Starlette:
    return Starlette(routes=[*_provider_routes(state), *_control_routes(state)])
