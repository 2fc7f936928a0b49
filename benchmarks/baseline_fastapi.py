"""Baseline for the HTTP benchmark: `POST /api/v1/calculate-locate` as most teams would write it.

FastAPI + pydantic v2 + `decimal.Decimal`, in-memory dicts for keys, clients and market data, the same
validation rules and the same response fields as the engine (DESIGN §2.1, §3). It is deliberately a
straightforward, idiomatic implementation, not a strawman: a pure-ASGI app (no BaseHTTPMiddleware),
an auth dependency, pydantic request/response models, Decimal arithmetic with ROUND_HALF_UP.

Run it the same way as the engine (uvicorn, uvloop, httptools, one worker, access log off):

    BASELINE_API_KEY=bre_<id>_<secret> HOST=127.0.0.1 PORT=8001 python benchmarks/baseline_fastapi.py

The key acts for `BASELINE_CLIENT_ID` (default `demo_client`). Without BASELINE_API_KEY a random key is
generated and printed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, field_validator

# ---- configuration (DESIGN §3 defaults) -----------------------------------------------------------

PEPPER = os.environ.get("API_KEY_PEPPER", "dev-only-pepper-not-for-production").encode()
VOLATILITY_FACTOR = Decimal("0.01")
VOLATILITY_THRESHOLD = Decimal("0")
VOLATILITY_INDEX = Decimal("20")
EVENT_RISK_FACTOR = Decimal("0.05")
EVENT_WINDOW_DAYS = 7
MIN_BORROW_RATE = Decimal("0.0001")
MAX_BORROW_RATE = Decimal("10")
RATE_PLACES = Decimal("0.00000001")
CENTS = Decimal("0.01")

# ---- in-memory data: the engine's demo seed ----------------------------------------------------------


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    markup_percentage: Decimal
    transaction_fee_type: Literal["FLAT", "PERCENTAGE"]
    transaction_amount: Decimal
    day_count: int = 365
    active: bool = True


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    client_id: str
    secret_hash: bytes
    scopes: frozenset[str]
    expires_at: dt.datetime


CLIENTS: dict[str, ClientRecord] = {
    c.client_id: c
    for c in (
        ClientRecord("demo_client", Decimal("5.0"), "FLAT", Decimal("25.0")),
        ClientRecord("xyz123", Decimal("5.0"), "FLAT", Decimal("25.0")),
        ClientRecord("pct_client", Decimal("10.0"), "PERCENTAGE", Decimal("0.05"), day_count=360),
        ClientRecord("admin", Decimal("0.0"), "FLAT", Decimal("0.0")),
    )
}
# Availability file: ticker -> FEERATE in percent (None: "NA", no file rate).
AVAILABILITY: dict[str, Decimal | None] = {
    "AAPL": Decimal("0.2500"),
    "MSFT": Decimal("0.2500"),
    "NVDA": Decimal("0.3000"),
    "TSLA": Decimal("0.5000"),
    "GME": Decimal("30.3849"),
    "AMC": Decimal("18.5000"),
    "SPCE": Decimal("10.7500"),
    "BYND": Decimal("76.0000"),
    "BRK.B": Decimal("0.2500"),
    "XYZQ": None,
}
# Stock records: ticker -> (min_borrow_rate, stored borrow status or None).
STOCKS: dict[str, tuple[Decimal, str | None]] = {
    "AAPL": (Decimal("0.0025"), "EASY"),
    "ACME": (Decimal("0.02"), None),
}
STARTED = dt.datetime.now(dt.UTC).replace(microsecond=0)
AVAILABILITY_AS_OF = STARTED - dt.timedelta(minutes=1)
# Events: ticker -> [(date, type, risk_factor or None for a calendar earnings date)].
EVENTS: dict[str, list[tuple[dt.date, str, int | None]]] = {
    "GME": [(STARTED.date() + dt.timedelta(days=2), "earnings", None)],
}
KEYS: dict[str, KeyRecord] = {}

_KEY = re.compile(r"bre_([a-z0-9]{8,16})_([A-Za-z0-9]{32,64})")
_DUMMY_HASH = bytes(32)


def hash_secret(secret: str) -> bytes:
    return hmac.new(PEPPER, secret.encode(), hashlib.sha256).digest()


def add_key(key: str, client_id: str, scopes: frozenset[str] = frozenset({"quote", "rates"})) -> None:
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError("expected bre_<8-16 [a-z0-9]>_<32-64 [A-Za-z0-9]>")
    KEYS[match.group(1)] = KeyRecord(
        key_id=match.group(1),
        client_id=client_id,
        secret_hash=hash_secret(match.group(2)),
        scopes=scopes,
        expires_at=STARTED + dt.timedelta(days=90),
    )


def random_key() -> str:
    key_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    return f"bre_{key_id}_{secret}"


# ---- models ----------------------------------------------------------------------------------------

TICKER_PATTERN = re.compile(r"^[A-Z0-9]+(?:[.\- /][A-Z0-9]+)?$")


class QuoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ticker: str = Field(min_length=1, max_length=10)
    position_value: Decimal = Field(ge=Decimal("0.01"), le=Decimal("1000000000"), decimal_places=2)
    loan_days: int = Field(ge=1, le=365, strict=True)
    client_id: str = Field(pattern=r"^[A-Za-z0-9_-]{3,50}$")

    @field_validator("ticker")
    @classmethod
    def normalize_ticker(cls, value: str) -> str:
        ticker = value.strip().upper()
        if not TICKER_PATTERN.fullmatch(ticker):
            raise ValueError("expected 1-10 letters/digits with at most one class separator")
        return re.sub(r"[\- /]", ".", ticker)


class FeeSchedule(BaseModel):
    markup_percentage: float
    transaction_fee_type: Literal["FLAT", "PERCENTAGE"]
    transaction_amount: float
    day_count: int


class Breakdown(BaseModel):
    borrow_cost: float
    markup: float
    transaction_fees: float


class RateInfo(BaseModel):
    base_rate: float
    volatility_index: float
    volatility_adjustment: float
    event_risk_factor: int
    event_adjustment: float
    min_rate: float
    borrow_status: Literal["EASY", "MEDIUM", "HARD"]
    source: Literal["lender_api", "availability_file", "fallback"]
    is_fallback: bool
    as_of: dt.datetime


class QuoteResponse(BaseModel):
    status: Literal["success"] = "success"
    quote_id: str
    ticker: str
    client_id: str
    position_value: float
    loan_days: int
    fee_schedule: FeeSchedule
    total_fee: float
    breakdown: Breakdown
    borrow_rate_used: float
    rate: RateInfo
    calculated_at: dt.datetime


# ---- auth ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    key_id: str
    client_id: str
    scopes: frozenset[str]


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=401, detail="Invalid or missing API key", headers={"WWW-Authenticate": "ApiKey"}
    )


async def require_quote_key(api_key: Annotated[str | None, Depends(api_key_header)]) -> Principal:
    if api_key is None:
        raise unauthorized()
    match = _KEY.fullmatch(api_key.strip())
    if match is None:
        raise unauthorized()
    record = KEYS.get(match.group(1))
    digest = hash_secret(match.group(2))
    if record is None:
        hmac.compare_digest(digest, _DUMMY_HASH)
        raise unauthorized()
    if not hmac.compare_digest(digest, record.secret_hash):
        raise unauthorized()
    if record.expires_at <= dt.datetime.now(dt.UTC):
        raise unauthorized()
    if not ({"quote", "admin"} & record.scopes):
        raise HTTPException(status_code=403, detail="This key lacks the quote scope")
    return Principal(key_id=record.key_id, client_id=record.client_id, scopes=record.scopes)


# ---- pricing (DESIGN §3, exact in Decimal) -------------------------------------------------------------


def event_risk(ticker: str, today: dt.date) -> int:
    highest = 0
    for date, _kind, risk_factor in EVENTS.get(ticker, ()):
        days = (date - today).days
        if not 0 <= days <= EVENT_WINDOW_DAYS:
            continue
        if risk_factor is None:
            risk_factor = 8 if days <= 1 else 6 if days <= 3 else 4
        highest = max(highest, risk_factor)
    return highest


def borrow_rate(ticker: str, now: dt.datetime) -> tuple[Decimal, RateInfo] | None:
    """The exact rate (8 decimals) and its components, or None for an unknown ticker."""
    stock = STOCKS.get(ticker)
    if stock is None and ticker not in AVAILABILITY:
        return None
    stock_min, stored_status = stock if stock is not None else (Decimal(0), None)
    min_rate = max(stock_min, MIN_BORROW_RATE)
    fee_rate = AVAILABILITY.get(ticker)
    if fee_rate is not None:
        base, source, fallback = fee_rate / 100, "availability_file", False
    else:
        base, source, fallback = min_rate, "fallback", True
    vol_adj = VOLATILITY_FACTOR * max(Decimal(0), VOLATILITY_INDEX - VOLATILITY_THRESHOLD)
    risk = event_risk(ticker, now.date())
    event_adj = Decimal(risk) / 10 * EVENT_RISK_FACTOR
    adjusted = base * (1 + vol_adj) * (1 + event_adj)
    rate = min(max(adjusted, min_rate).quantize(RATE_PLACES, rounding=ROUND_HALF_UP), MAX_BORROW_RATE)
    status = stored_status or (
        "EASY" if base <= Decimal("0.01") else "MEDIUM" if base <= Decimal("0.1") else "HARD"
    )
    info = RateInfo(
        base_rate=float(base),
        volatility_index=float(VOLATILITY_INDEX),
        volatility_adjustment=float(vol_adj),
        event_risk_factor=risk,
        event_adjustment=float(event_adj),
        min_rate=float(min_rate),
        borrow_status=status,  # type: ignore[arg-type]
        source=source,  # type: ignore[arg-type]
        is_fallback=fallback,
        as_of=AVAILABILITY_AS_OF if not fallback else now,
    )
    return rate, info


def cents(value: Decimal) -> Decimal:
    return value.quantize(CENTS, rounding=ROUND_HALF_UP)


# ---- app ---------------------------------------------------------------------------------------------

app = FastAPI(title="Baseline locate pricer", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        status_code=400,
        content={
            "status": "error",
            "error_code": "INVALID_PARAMETER",
            "error": "Invalid request",
            "validation_errors": [
                {
                    "field": ".".join(str(p) for p in e["loc"][1:]),
                    "location": e["loc"][0],
                    "message": e["msg"],
                }
                for e in exc.errors()
            ],
        },
    )


@app.post("/api/v1/calculate-locate", response_model=QuoteResponse)
async def calculate_locate(
    body: QuoteRequest,
    response: Response,
    principal: Annotated[Principal, Depends(require_quote_key)],
) -> QuoteResponse:
    if body.client_id != principal.client_id and "admin" not in principal.scopes:
        raise HTTPException(status_code=403, detail="This key may not act for that client_id")
    client = CLIENTS.get(body.client_id)
    if client is None:
        raise HTTPException(status_code=404, detail=f"Unknown client: {body.client_id}")
    if not client.active:
        raise HTTPException(status_code=403, detail="Client is inactive")
    now = dt.datetime.now(dt.UTC)
    priced = borrow_rate(body.ticker, now)
    if priced is None:
        raise HTTPException(status_code=404, detail=f"Unknown ticker: {body.ticker}")
    rate, rate_info = priced

    borrow_cost = cents(body.position_value * rate * body.loan_days / client.day_count)
    markup = cents(borrow_cost * client.markup_percentage / 100)
    if client.transaction_fee_type == "FLAT":
        transaction_fees = client.transaction_amount
    else:
        transaction_fees = cents(body.position_value * client.transaction_amount / 100)
    total_fee = borrow_cost + markup + transaction_fees

    request_id = uuid.uuid4().hex
    response.headers["X-Request-ID"] = request_id
    response.headers["X-Correlation-ID"] = request_id
    return QuoteResponse(
        quote_id=uuid.uuid4().hex,
        ticker=body.ticker,
        client_id=body.client_id,
        position_value=float(body.position_value),
        loan_days=body.loan_days,
        fee_schedule=FeeSchedule(
            markup_percentage=float(client.markup_percentage),
            transaction_fee_type=client.transaction_fee_type,
            transaction_amount=float(client.transaction_amount),
            day_count=client.day_count,
        ),
        total_fee=float(total_fee),
        breakdown=Breakdown(
            borrow_cost=float(borrow_cost), markup=float(markup), transaction_fees=float(transaction_fees)
        ),
        borrow_rate_used=float(rate),
        rate=rate_info,
        calculated_at=now,
    )


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy"}


def main() -> None:
    from baseline_raw_asgi import serve

    key = os.environ.get("BASELINE_API_KEY") or random_key()
    add_key(key, os.environ.get("BASELINE_CLIENT_ID", "demo_client"))
    if not os.environ.get("BASELINE_API_KEY"):
        print(f"BASELINE_API_KEY={key}", flush=True)
    serve(app, 8001)


if __name__ == "__main__":
    main()
