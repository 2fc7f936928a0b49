"""Admin endpoints: clients, stocks, market data, keys. Every action is logged as an audit event."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response

from pricer.auth.keys import KeyHasher, make_record, new_key
from pricer.context import principal
from pricer.endpoints.common import json_response, utc_now
from pricer.errors import ClientNotFound, InvalidParameter, NotFound, UnsupportedMediaType
from pricer.logs import fields
from pricer.marketdata.loaders import parse_availability, parse_earnings, parse_vix_history
from pricer.marketdata.service import MarketDataWriter
from pricer.models import Client, FeeType, MarketEvent, Stock, VolatilityReading
from pricer.schemas import (
    AvailabilityUploadResponse,
    ClientBody,
    ClientView,
    EventsBody,
    EventsView,
    EventView,
    IssuedKey,
    KeyBody,
    StockBody,
    StockView,
    VolatilityBody,
    VolatilityView,
    earnings_load_result,
    utc_text,
    vix_load_result,
)
from pricer.stores.protocols import Stores
from pricer.validation import Decoder, require_places, require_ticker, whole_number

audit_log = logging.getLogger("pricer.audit")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{3,50}")
_KEY_ID = re.compile(r"[a-z0-9]{8,16}")


def client_from_body(
    client_id: str, body: ClientBody, now: dt.datetime, *, valid_params: Sequence[str] = ()
) -> Client:
    """The client a ClientBody describes, past the rules its schema cannot say (the client_id's form, the
    decimals, a PERCENTAGE fee's 0-100): the admin endpoint and `pricer clients put` both come through here.

    Raises `InvalidParameter` naming the field.
    """
    if not _CLIENT_ID.fullmatch(client_id):
        raise InvalidParameter.for_field(
            "client_id", "expected 3 to 50 letters, digits, '_' or '-'", location="path"
        )
    require_places(body.markup_percentage, 4, "markup_percentage", valid_params=valid_params)
    if body.transaction_fee_type is FeeType.FLAT:
        require_places(body.transaction_amount, 2, "transaction_amount", valid_params=valid_params)
    else:
        if body.transaction_amount > 100:
            raise InvalidParameter.for_field(
                "transaction_amount", "a PERCENTAGE fee must be from 0 to 100", valid_params=valid_params
            )
        require_places(body.transaction_amount, 4, "transaction_amount", valid_params=valid_params)
    limits = {
        name: None if value is None else whole_number(value, name, valid_params=valid_params)
        for name, value in (("rate_limit_per_minute", body.rate_limit_per_minute), ("burst", body.burst))
    }
    return Client(
        client_id=client_id,
        markup_percentage=body.markup_percentage,
        transaction_fee_type=body.transaction_fee_type,
        transaction_amount=body.transaction_amount,
        day_count=body.day_count,
        active=body.active,
        rate_limit_per_minute=limits["rate_limit_per_minute"],
        burst=limits["burst"],
        updated_at=now,
    )


def client_view(client: Client, *, default_rate: int, default_burst: int) -> ClientView:
    return ClientView(
        client_id=client.client_id,
        markup_percentage=client.markup_percentage,
        transaction_fee_type=client.transaction_fee_type,
        transaction_amount=client.transaction_amount,
        day_count=client.day_count,
        active=client.active,
        rate_limit_per_minute=client.rate_limit_per_minute or default_rate,
        burst=client.burst
        or (client.rate_limit_per_minute if client.rate_limit_per_minute else default_burst),
        updated_at=client.updated_at,
    )


class AdminEndpoints:
    def __init__(
        self,
        stores: Stores,
        writer: MarketDataWriter,
        hasher: KeyHasher,
        *,
        default_rate_limit: int,
        default_burst: int,
    ) -> None:
        self._stores = stores
        self._writer = writer
        self._hasher = hasher
        self._default_rate = default_rate_limit
        self._default_burst = default_burst
        self._client = Decoder(ClientBody, places={"markup_percentage": 4, "transaction_amount": 4})
        self._stock = Decoder(StockBody, places={"min_borrow_rate": 8})
        self._volatility = Decoder(VolatilityBody, places={"value": 4})
        self._events = Decoder(EventsBody)
        self._key = Decoder(KeyBody)

    def _audit(self, request: Request, action: str, **details: object) -> None:
        actor = principal(request.scope)
        audit_log.info(
            "Admin action",
            extra=fields(action=action, key_id=actor.key_id, client_id=actor.client_id, **details),
        )

    async def put_client(self, request: Request) -> Response:
        client_id = request.path_params["client_id"]
        body = self._client.decode(await request.body(), self._client.media_type(request))
        client = client_from_body(client_id, body, utc_now(), valid_params=self._client.valid_params)
        created = await self._stores.clients.put(client)
        self._audit(request, "client.put", target=client_id, created=created)
        view = client_view(client, default_rate=self._default_rate, default_burst=self._default_burst)
        return json_response(view, status=201 if created else 200)

    async def put_stock(self, request: Request) -> Response:
        ticker = require_ticker(request.path_params["ticker"], location="path")
        body = self._stock.decode(await request.body(), self._stock.media_type(request))
        require_places(body.min_borrow_rate, 8, "min_borrow_rate", valid_params=self._stock.valid_params)
        stock = Stock(
            ticker=ticker,
            min_borrow_rate=body.min_borrow_rate,
            borrow_status=body.borrow_status,
            updated_at=utc_now(),
        )
        created = await self._writer.put_stock(stock)
        self._audit(request, "stock.put", target=ticker, created=created)
        view = StockView(
            ticker=ticker,
            min_borrow_rate=stock.min_borrow_rate,
            borrow_status=stock.borrow_status,
            updated_at=stock.updated_at,
        )
        return json_response(view, status=201 if created else 200)

    async def upload_availability(self, request: Request) -> Response:
        _require_text(request)
        snapshot = parse_availability(await request.body(), loaded_at=utc_now())
        in_force = await self._writer.add_availability(snapshot)
        self._audit(
            request, "availability.upload", rows=len(snapshot.entries), as_of=utc_text(snapshot.as_of)
        )
        return json_response(
            AvailabilityUploadResponse(rows=len(snapshot.entries), as_of=snapshot.as_of, in_force=in_force)
        )

    async def upload_vix(self, request: Request) -> Response:
        _require_text(request)
        history = parse_vix_history(await request.body())
        reading = history.reading
        await self._writer.add_volatility(reading)
        self._audit(
            request,
            "volatility.vix_file",
            value=reading.value,
            as_of=utc_text(reading.as_of),
            rows=history.rows,
        )
        return json_response(vix_load_result(reading.value, reading.as_of, history.rows))

    async def upload_earnings(self, request: Request) -> Response:
        _require_text(request)
        calendar = parse_earnings(await request.body())
        await self._writer.replace_events_many(calendar.events)
        self._audit(request, "events.earnings_file", rows=calendar.rows, tickers=len(calendar.events))
        return json_response(earnings_load_result(calendar.rows, len(calendar.events), len(calendar.skipped)))

    async def put_volatility(self, request: Request) -> Response:
        body = self._volatility.decode(await request.body(), self._volatility.media_type(request))
        require_places(body.value, 4, "value", valid_params=self._volatility.valid_params)
        reading = VolatilityReading(value=body.value, as_of=utc_now(), source="admin")
        await self._writer.add_volatility(reading)
        self._audit(request, "volatility.put", value=reading.value)
        return json_response(VolatilityView(value=reading.value, as_of=reading.as_of, source=reading.source))

    async def put_events(self, request: Request) -> Response:
        ticker = require_ticker(request.path_params["ticker"], location="path")
        body = self._events.decode(await request.body(), self._events.media_type(request))
        valid = self._events.valid_params
        events: list[MarketEvent] = []
        for index, event in enumerate(body.events):
            if "\x00" in event.type:
                # PostgreSQL's text cannot hold it: refused here in every mode, never a database error.
                raise InvalidParameter.for_field(
                    f"events[{index}].type", "a NUL character is not allowed", valid_params=valid
                )
            risk = event.risk_factor
            field = f"events[{index}].risk_factor"
            risk_factor = None if risk is None else whole_number(risk, field, valid_params=valid)
            events.append(MarketEvent(date=event.date, type=event.type, risk_factor=risk_factor))
        await self._writer.replace_events(ticker, events)
        self._audit(request, "events.put", target=ticker, events=len(events))
        views = [
            EventView(date=event.date, type=event.type, risk_factor=event.risk_factor) for event in events
        ]
        return json_response(EventsView(ticker=ticker, events=sorted(views, key=lambda event: event.date)))

    async def issue_key(self, request: Request) -> Response:
        body = self._key.decode(await request.body(), self._key.media_type(request))
        if await self._stores.clients.get(body.client_id) is None:
            raise ClientNotFound(body.client_id)
        now = utc_now()
        key_id, key = new_key()
        days = whole_number(body.expires_in_days, "expires_in_days", valid_params=self._key.valid_params)
        expires_at = now + dt.timedelta(days=days)
        record = make_record(
            self._hasher, key, client_id=body.client_id, scopes=body.scopes, now=now, expires_at=expires_at
        )
        await self._stores.keys.put(record)
        self._audit(
            request,
            "key.issue",
            target=key_id,
            for_client=body.client_id,
            scopes=",".join(sorted(body.scopes)),
        )
        issued = IssuedKey(
            key_id=key_id,
            api_key=key,
            client_id=body.client_id,
            scopes=sorted(record.scopes),
            expires_at=expires_at,
        )
        return json_response(issued, status=201)

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if not _KEY_ID.fullmatch(key_id) or not await self._stores.keys.revoke(key_id, utc_now()):
            raise NotFound("Unknown key", details={"key_id": key_id})
        self._audit(request, "key.revoke", target=key_id)
        return Response(status_code=204)


def _require_text(request: Request) -> None:
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in ("text/plain", "text/csv", "application/octet-stream"):
        raise UnsupportedMediaType(media or "(none)", ["text/plain", "text/csv", "application/octet-stream"])
