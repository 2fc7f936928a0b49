"""Request decoding and the value rules msgspec cannot state (decimal places, ticker syntax).

Every rejection names the field and the rule, as `InvalidParameter` with one `FieldProblem` per field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Generic, TypeVar

import msgspec
from starlette.datastructures import QueryParams
from starlette.requests import Request

from pricer.errors import FieldProblem, InvalidParameter, UnsupportedMediaType
from pricer.pricing.core import scaled_int
from pricer.tickers import TICKER_RULE, normalize_ticker

T = TypeVar("T")

JSON = "application/json"
MSGPACK = "application/msgpack"
_AT_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_NAMED_FIELD = re.compile(r"field `(?P<name>[^`]+)`")


def field_names(struct: type[msgspec.Struct]) -> list[str]:
    return list(struct.__struct_fields__)


def problem_from(error: msgspec.ValidationError, location: str) -> FieldProblem:
    """The field and rule of a msgspec validation error (`Expected ... - at `$.loan_days``)."""
    match = _AT_PATH.match(str(error))
    message = match.group("message") if match else str(error)
    path = (match.group("path") or "") if match else ""
    named = _NAMED_FIELD.search(message)
    if named is not None:
        path = f"{path}.{named.group('name')}"
    field = path.lstrip(".") or "body"
    return FieldProblem(field, location, message)


class Decoder(Generic[T]):
    """Decodes JSON or msgpack into one Struct type, mapping every failure to a clear 400."""

    def __init__(self, kind: type[T], *, accept_msgpack: bool = False) -> None:
        self._kind = kind
        self._json = msgspec.json.Decoder(kind)
        self._msgpack = msgspec.msgpack.Decoder(kind) if accept_msgpack else None
        fields = getattr(kind, "__struct_fields__", ())
        self.valid_params: list[str] = list(fields)
        self.media_types = [JSON, MSGPACK] if accept_msgpack else [JSON]

    def media_type(self, request: Request) -> str:
        content_type = request.headers.get("content-type", "")
        media = content_type.partition(";")[0].strip().lower()
        if media == JSON or (self._msgpack is not None and media in (MSGPACK, "application/x-msgpack")):
            return JSON if media == JSON else MSGPACK
        raise UnsupportedMediaType(media or "(none)", self.media_types)

    def decode(self, body: bytes, media: str = JSON) -> T:
        try:
            if media == MSGPACK and self._msgpack is not None:
                return self._msgpack.decode(body)
            return self._json.decode(body)
        except msgspec.ValidationError as error:
            problem = problem_from(error, "body")
            raise InvalidParameter(
                f"Invalid request: {problem.field}: {problem.message}",
                problems=[problem],
                valid_params=self.valid_params,
            ) from None
        except msgspec.DecodeError as error:
            kind = "JSON" if media == JSON else "msgpack"
            raise InvalidParameter(
                f"Malformed {kind} body: {error}",
                problems=[FieldProblem("body", "body", f"malformed {kind}: {error}")],
                valid_params=self.valid_params,
            ) from None

    def convert_query(self, params: QueryParams) -> T:
        """Query-string parameters into the same Struct (strings converted to numbers); a parameter given
        twice is refused rather than silently taking one of its values."""
        reject_duplicate_query_params(params.multi_items())
        try:
            return msgspec.convert(dict(params), self._kind, strict=False)
        except msgspec.ValidationError as error:
            problem = problem_from(error, "query")
            raise InvalidParameter(
                f"Invalid request: {problem.field}: {problem.message}",
                problems=[problem],
                valid_params=self.valid_params,
            ) from None


def require_ticker(
    raw: str, *, field: str = "ticker", location: str = "body", valid_params: Sequence[str] = ()
) -> str:
    ticker = normalize_ticker(raw)
    if ticker is None:
        raise InvalidParameter.for_field(
            field, f"expected {TICKER_RULE}", location=location, valid_params=valid_params
        )
    return ticker


def require_places(
    value: float, places: int, field: str, *, location: str = "body", valid_params: Sequence[str] = ()
) -> int:
    """The exact integer value × 10^places, or a 400 when the value has more decimals."""
    units = scaled_int(value, places)
    if units is None:
        raise InvalidParameter.for_field(
            field, f"at most {places} decimals allowed", location=location, valid_params=valid_params
        )
    return units


def reject_duplicate_query_params(items: Sequence[tuple[str, str]], location: str = "query") -> None:
    seen: set[str] = set()
    for name, _ in items:
        if name in seen:
            raise InvalidParameter.for_field(name, "given more than once", location=location)
        seen.add(name)
