"""Provider answers are data from outside (DESIGN §3.1): each one is checked here before anything is
priced from it. A check that fails raises `BadAnswer` with a short reason (logged and counted by the
caller; the last good value stays in force).

Refused: a status other than 200 (404 too, except where it means "unknown ticker"), a redirect, a body
that is not one JSON object (HTML error pages, truncated text), wrong types, missing fields, NaN or
Infinity (not JSON, and overflowing literals like 1e999), negative rates, rates above MAX_BORROW_RATE or
with more than 12 significant digits (the pricing core's exact domain), V outside 0-200, dates that are
not dates, risk factors outside 0-10. Bodies over 64 KiB and answers dripping past the deadline are
refused by the HTTP client before they get here.
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from typing import Any

import msgspec

from pricer.models import BorrowStatus, MarketEvent

MAX_ANSWER_BYTES = 64 * 1024
MAX_VOLATILITY = 200.0
MAX_EVENTS = 1000
_SIGNIFICANT_DIGITS = 12
_decode = msgspec.json.Decoder().decode


class BadAnswer(Exception):
    """A provider's answer that must not be priced from; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def json_object(status: int, body: bytes) -> dict[str, Any]:
    """The body of a 200 answer as a JSON object."""
    if 300 <= status < 400:
        raise BadAnswer(f"redirect (HTTP {status}), not followed")
    if status != 200:
        raise BadAnswer(f"HTTP {status}")
    if len(body) > MAX_ANSWER_BYTES:
        raise BadAnswer("body over 64 KiB")
    try:
        value = _decode(body)
    except msgspec.DecodeError:
        raise BadAnswer("body is not JSON") from None
    if not isinstance(value, dict):
        raise BadAnswer("body is not a JSON object")
    return value


def finite_number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAnswer(f"{field} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits: JSON allows it
        raise BadAnswer(f"{field} is not finite") from None
    if not math.isfinite(number):
        raise BadAnswer(f"{field} is not finite")
    return number


def lender_rate(status: int, body: bytes, *, max_rate: Decimal) -> tuple[float, BorrowStatus] | None:
    """(rate, status) of a lender answer; None for 404 (the lender does not know the ticker)."""
    if status == 404:
        return None
    answer = json_object(status, body)
    if "rate" not in answer:
        raise BadAnswer("rate missing")
    rate = finite_number(answer["rate"], "rate")
    if rate < 0:
        raise BadAnswer("rate is negative")
    exact = Decimal(repr(rate))
    if exact > max_rate:
        raise BadAnswer("rate above MAX_BORROW_RATE")
    if rate != 0 and len(exact.normalize().as_tuple().digits) > _SIGNIFICANT_DIGITS:
        raise BadAnswer("rate has more than 12 significant digits")
    raw_status = answer.get("status")
    if raw_status is not None and not isinstance(raw_status, str):
        raise BadAnswer("status is not a string")
    return rate, borrow_status(raw_status)


def borrow_status(raw: str | None) -> BorrowStatus:
    """EASY[_TO_BORROW] -> EASY, MEDIUM... -> MEDIUM, anything else (HARD..., unknown, none) -> HARD."""
    text = (raw or "").strip().upper()
    if text in ("EASY", "EASY_TO_BORROW"):
        return BorrowStatus.EASY
    if text.startswith("MEDIUM"):
        return BorrowStatus.MEDIUM
    return BorrowStatus.HARD


def volatility_reading(status: int, body: bytes) -> tuple[float, dt.datetime]:
    """(V, as of) of a volatility answer."""
    answer = json_object(status, body)
    if "value" not in answer:
        raise BadAnswer("value missing")
    value = finite_number(answer["value"], "value")
    if not 0 <= value <= MAX_VOLATILITY:
        raise BadAnswer("value outside 0-200")
    if len(Decimal(repr(value)).normalize().as_tuple().digits) > _SIGNIFICANT_DIGITS:
        raise BadAnswer("value has more than 12 significant digits")
    stamp = answer.get("timestamp")
    if not isinstance(stamp, str):
        raise BadAnswer("timestamp missing or not a string")
    try:
        as_of = dt.datetime.fromisoformat(stamp)
    except ValueError:
        raise BadAnswer("timestamp is not ISO-8601") from None
    if as_of.tzinfo is None:
        raise BadAnswer("timestamp has no time zone")
    try:
        return value, as_of.astimezone(dt.UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is after datetime.max in UTC
        raise BadAnswer("timestamp out of range") from None


def market_events(status: int, body: bytes) -> list[MarketEvent]:
    """The events of an event-calendar answer."""
    answer = json_object(status, body)
    raw = answer.get("events")
    if not isinstance(raw, list):
        raise BadAnswer("events missing or not a list")
    if len(raw) > MAX_EVENTS:
        raise BadAnswer("too many events")
    events = []
    for item in raw:
        if not isinstance(item, dict):
            raise BadAnswer("an event is not an object")
        kind, date, risk = item.get("type"), item.get("date"), item.get("risk_factor")
        if not isinstance(kind, str) or not 1 <= len(kind) <= 50:
            raise BadAnswer("event type missing or not a string")
        if not isinstance(date, str) or len(date) != 10:
            raise BadAnswer("event date missing or not YYYY-MM-DD")
        try:
            day = dt.date.fromisoformat(date)
        except ValueError:
            raise BadAnswer("event date is not YYYY-MM-DD") from None
        if risk is not None and (isinstance(risk, bool) or not isinstance(risk, int) or not 0 <= risk <= 10):
            raise BadAnswer("risk_factor is not an integer 0-10")
        events.append(MarketEvent(date=day, type=kind, risk_factor=risk))
    return events
