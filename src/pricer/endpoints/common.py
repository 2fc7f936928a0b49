"""Small helpers shared by the endpoints."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class EncodedResponse(Response):
    """A response whose body is already encoded: its two headers are made here, without the generic
    header handling of Starlette's `Response` (on the single-quote path that is measurable)."""

    def __init__(self, body: bytes, status_code: int, content_type: bytes) -> None:
        self.status_code = status_code
        self.body = body
        self.background = None
        self.raw_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def json_response(body: Any, status: int = 200) -> Response:
    return EncodedResponse(_encoder.encode(body), status, b"application/json")


def msgpack_response(body: Any, status: int = 200) -> Response:
    return EncodedResponse(_msgpack_encoder.encode(body), status, b"application/msgpack")


def wants_msgpack(accept: str | None) -> bool:
    return accept is not None and "msgpack" in accept
