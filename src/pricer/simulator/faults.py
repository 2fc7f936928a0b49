"""The faults a simulated provider can be switched into at run time, and the bad answers it then gives.

A provider's plan is `FaultPlan` (the body of `PUT /control/faults/{provider}`): `mode` says what happens to
each call (`ok`, `error`, `hang`, `down`, `malformed`), `latency_ms` delays every answer whatever the mode,
`error_rate` is the share of calls that fail in `error` mode, and `malformed` names the bad answer of the
`malformed` mode. The bad answers are the ones issue 20 point 4 lists as "data from outside" that a client
must reject; each exists for every provider (where a kind does not fit a provider, the nearest out-of-range
value stands in: `vix_out_of_range` is a rate above any `MAX_BORROW_RATE` for the lender and a risk factor of
11 for the calendar).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

__all__ = [
    "DRIP_INTERVAL_SECONDS",
    "HUGE_BODY_BYTES",
    "PROVIDERS",
    "BadAnswer",
    "FaultPlan",
    "MalformedKind",
    "Provider",
    "bad_answer",
    "huge_body",
]

Provider = Literal["lender", "volatility", "events"]
PROVIDERS: tuple[Provider, ...] = ("lender", "volatility", "events")

FaultMode = Literal["ok", "error", "hang", "down", "malformed"]
MalformedKind = Literal[
    "html",
    "non_json",
    "wrong_types",
    "missing_fields",
    "nan",
    "infinity",
    "negative",
    "too_high",
    "vix_out_of_range",
    "huge_body",
    "redirect",
    "drip",
]

# A huge body must pass the 64 KiB a client accepts by a margin (issue 20 point 4).
HUGE_BODY_BYTES = 96 * 1024
DRIP_INTERVAL_SECONDS = 0.2
# An hour: a latency longer than any client deadline, short enough that a forgotten fault ends.
MAX_LATENCY_MS = 3_600_000


class FaultPlan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a provider does with each call (see the module's docstring)."""

    mode: FaultMode = "ok"
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    latency_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_LATENCY_MS)] = 0.0
    malformed: MalformedKind | None = None

    def problem(self) -> str | None:
        """Why the plan cannot be followed, None when it can."""
        if self.mode == "malformed" and self.malformed is None:
            return 'mode "malformed" needs "malformed": the kind of bad answer'
        return None


class BadAnswer(msgspec.Struct, frozen=True):
    """A whole answer: status, content type and body (the body as sent, byte for byte)."""

    status: int
    content_type: str
    body: bytes


_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
_JSON = "application/json"

# JSON a strict parser refuses but Python's `json.loads` takes (NaN, Infinity), or takes but must not
# price from (wrong types, missing fields, values out of range). Written out as text: an encoder would not
# emit them.
_LENDER_BODIES: dict[str, bytes] = {
    "non_json": b"rate=0.15;status=HARD",
    "wrong_types": b'{"rate": "0.15", "status": 3}',
    "missing_fields": b'{"status": "HARD"}',
    "nan": b'{"rate": NaN, "status": "HARD"}',
    "infinity": b'{"rate": Infinity, "status": "HARD"}',
    "negative": b'{"rate": -0.05, "status": "HARD"}',
    "too_high": b'{"rate": 1000000.0, "status": "HARD"}',
    "vix_out_of_range": b'{"rate": 1000000.0, "status": "HARD"}',
}
_VOLATILITY_BODIES: dict[str, str] = {
    "non_json": "VIX 20.5 {timestamp}",
    "wrong_types": '{{"value": "20.5", "timestamp": 1733322600}}',
    "missing_fields": '{{"timestamp": "{timestamp}"}}',
    "nan": '{{"value": NaN, "timestamp": "{timestamp}"}}',
    "infinity": '{{"value": Infinity, "timestamp": "{timestamp}"}}',
    "negative": '{{"value": -5.0, "timestamp": "{timestamp}"}}',
    "too_high": '{{"value": 1000000.0, "timestamp": "{timestamp}"}}',
    "vix_out_of_range": '{{"value": 200.5, "timestamp": "{timestamp}"}}',
}
_EVENT_BODIES: dict[str, bytes] = {
    "non_json": b"earnings 2026-12-08 risk 7",
    "wrong_types": b'{"events": [{"type": 7, "date": 20261208, "risk_factor": "high"}]}',
    "missing_fields": b'{"events": [{"type": "earnings"}]}',
    "nan": b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": NaN}]}',
    "infinity": b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": Infinity}]}',
    "negative": b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": -3}]}',
    "too_high": b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": 11}]}',
    "vix_out_of_range": b'{"events": [{"type": "earnings", "date": "2026-12-08", "risk_factor": 11}]}',
}


def _now_z() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def bad_answer(provider: Provider, kind: MalformedKind) -> BadAnswer:
    """The bad answer of `kind` for `provider`, for the kinds that are a fixed body (not `huge_body`,
    `redirect` or `drip`, which are built from the valid answer: see the app)."""
    if kind == "html":
        # 200 with an HTML page: what a misrouted proxy answers; the status alone does not reveal it.
        return BadAnswer(200, "text/html; charset=utf-8", _HTML_PAGE)
    if provider == "lender":
        body = _LENDER_BODIES[kind]
    elif provider == "volatility":
        body = _VOLATILITY_BODIES[kind].format(timestamp=_now_z()).encode()
    else:
        body = _EVENT_BODIES[kind]
    return BadAnswer(200, _JSON, body)


def huge_body(valid: bytes) -> bytes:
    """The valid JSON object padded past `HUGE_BODY_BYTES`: still valid JSON, just too big to accept."""
    padding = b"x" * HUGE_BODY_BYTES
    return valid.rstrip()[:-1] + b', "padding": "' + padding + b'"}'
