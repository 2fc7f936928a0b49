"""Small helpers shared by the endpoints."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


def msgpack_response(body: Any, status: int = 200) -> Response:
    return Response(_msgpack_encoder.encode(body), status_code=status, media_type="application/msgpack")


def wants_msgpack(accept: str | None) -> bool:
    return accept is not None and "msgpack" in accept
