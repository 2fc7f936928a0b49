"""Request decoding and the value rules msgspec cannot state (decimal places, ticker syntax).

Every rejection names the field and the rule, as `InvalidParameter` with one `FieldProblem` per field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, TypeVar

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

# "At most N decimals" is read on the number as written (DESIGN §2), trailing zeros aside (100.10 has 2).
# Up to 15 significant digits a float's shortest round-trip text is the written value itself, so the float
# check (`require_places`) is exact; a longer literal (100.00999999999999999, 17 places, parsed as 100.01)
# can only hide in a run of 16 or more digits, dots and exponent letters: a body without such a run skips
# the second, exact reading. The run is found with `translate` + `in`, cheap even on a 10^6-row batch.
_NUMBER_MARKS = bytes(ord("d") if chr(code) in "0123456789.eE" else ord("x") for code in range(256))
_LONG_RUN = b"d" * 16
_WRITTEN = msgspec.json.Decoder(float_hook=Decimal)


def may_hide_places(body: bytes) -> bool:
    """Whether a JSON body holds a literal long enough for its float to hide decimals it was written with."""
    return _LONG_RUN in body.translate(_NUMBER_MARKS)


def written_places(value: object) -> int:
    """Decimal places of a number as written (trailing zeros aside); 0 for what is not a decimal number."""
    if not (isinstance(value, Decimal) and value.is_finite()):
        return 0
    # From the digits as written, not `normalize()`: that rounds to the context's 28 digits (hiding the
    # places of a longer number) and overflows on a huge exponent.
    _, digits, exponent = value.as_tuple()
    significant = len(digits)
    while significant and digits[significant - 1] == 0:
        significant -= 1
    if not significant or not isinstance(exponent, int):
        return 0
    return max(0, -(exponent + len(digits) - significant))


def written_json(body: bytes) -> Any:
    """The body with every JSON number that has a fraction or exponent as the exact `Decimal` written."""
    return _WRITTEN.decode(body)


def text_places(text: str) -> int:
    """Decimal places of a query-string number as written; 0 when it is not a decimal number (the type
    check then names the rule)."""
    try:
        return written_places(Decimal(text.strip()))
    except InvalidOperation:
        return 0


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

    def __init__(
        self, kind: type[T], *, accept_msgpack: bool = False, places: Mapping[str, int] | None = None
    ) -> None:
        self._kind = kind
        # The most decimals each top-level number field may be written with (checked on the text sent).
        self._places = dict(places or {})
        self._json = msgspec.json.Decoder(kind)
        self._msgpack = msgspec.msgpack.Decoder(kind) if accept_msgpack else None
        fields = getattr(kind, "__struct_fields__", ())
        self.valid_params: list[str] = list(fields)
        self.media_types = [JSON, MSGPACK] if accept_msgpack else [JSON]

    def media_type(self, request: Request) -> str:
        content_type = b""
        for name, value in request.scope["headers"]:  # the first Content-Type, as request.headers reads it
            if name == b"content-type":
                content_type = value
                break
        media = content_type.partition(b";")[0].strip().lower().decode("latin-1")
        if media == JSON or (self._msgpack is not None and media in (MSGPACK, "application/x-msgpack")):
            return JSON if media == JSON else MSGPACK
        raise UnsupportedMediaType(media or "(none)", self.media_types)

    def decode(self, body: bytes, media: str = JSON) -> T:
        try:
            if media == MSGPACK and self._msgpack is not None:
                return self._msgpack.decode(body)
            decoded = self._json.decode(body)
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
        if self._places and may_hide_places(body):
            written = written_json(body)
            for name, places in self._places.items():
                if written_places(written.get(name)) > places:
                    self._too_many_places(name, places, "body")
        return decoded

    def _too_many_places(self, field: str, places: int, location: str) -> None:
        raise InvalidParameter.for_field(
            field, f"at most {places} decimals allowed", location=location, valid_params=self.valid_params
        )

    def convert_query(self, params: QueryParams) -> T:
        """Query-string parameters into the same Struct (strings converted to numbers); a parameter given
        twice is refused rather than silently taking one of its values."""
        reject_duplicate_query_params(params.multi_items())
        for name, places in self._places.items():
            if name in params and text_places(params[name]) > places:
                self._too_many_places(name, places, "query")
        try:
            return msgspec.convert(dict(params), self._kind, strict=False)
        except msgspec.ValidationError as error:
            problem = problem_from(error, "query")
            raise InvalidParameter(
                f"Invalid request: {problem.field}: {problem.message}",
                problems=[problem],
                valid_params=self.valid_params,
            ) from None


# The tickers of single quotes as written -> normalised: a desk quotes the same few hundred names all day,
# and the lookup costs less than the normalisation. Bounded: emptied when full.
_NORMALIZED: dict[str, str] = {}
_NORMALIZED_KEPT = 4096


def require_ticker(
    raw: str, *, field: str = "ticker", location: str = "body", valid_params: Sequence[str] = ()
) -> str:
    ticker = _NORMALIZED.get(raw)
    if ticker is None:
        ticker = normalize_ticker(raw)
        if ticker is not None:
            if len(_NORMALIZED) >= _NORMALIZED_KEPT:
                _NORMALIZED.clear()
            _NORMALIZED[raw] = ticker
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


def whole_number(
    value: float, field: str, *, location: str = "body", valid_params: Sequence[str] = ()
) -> int:
    """An integer field's value (the schema's bounds already checked) as an `int`; 30.0 and 3e1 are 30, as
    in JSON Schema, while 30.5 is refused naming the field."""
    if not math.isfinite(value) or value != int(value):
        raise InvalidParameter.for_field(
            field, "expected an integer", location=location, valid_params=valid_params
        )
    return int(value)


def reject_unknown_query_params(names: Iterable[str], allowed: Collection[str]) -> None:
    """The same rule on every route: a query parameter the route does not define is a 400 naming it."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise InvalidParameter.for_field(
            unknown[0], "unknown parameter", location="query", valid_params=sorted(allowed)
        )


def reject_duplicate_query_params(items: Sequence[tuple[str, str]], location: str = "query") -> None:
    seen: set[str] = set()
    for name, _ in items:
        if name in seen:
            raise InvalidParameter.for_field(name, "given more than once", location=location)
        seen.add(name)
