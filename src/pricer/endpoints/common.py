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


class PartsResponse(Response):
    """A 200 whose encoded body comes in parts, sent one ASGI message each and let go of once sent (a large
    batch's answer is never joined into one copy)."""

    def __init__(self, parts: list[bytes], content_type: bytes) -> None:
        self.status_code = 200
        self.background = None
        self._parts = parts
        length = sum(len(part) for part in parts)
        self.raw_headers = [(b"content-type", content_type), (b"content-length", str(length).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        parts = self._parts
        parts.reverse()
        if not parts:
            parts.append(b"")
        while parts:
            part = parts.pop()
            await send({"type": "http.response.body", "body": part, "more_body": bool(parts)})


def json_response(body: Any, status: int = 200) -> Response:
    return EncodedResponse(_encoder.encode(body), status, b"application/json")


def msgpack_response(body: Any, status: int = 200) -> Response:
    return EncodedResponse(_msgpack_encoder.encode(body), status, b"application/msgpack")


def _quality(accept: str, full: tuple[str, ...]) -> float:
    """The q-value `accept` gives to a media type named by any of `full` (`type/subtype`, lower case): the
    q of the most specific range that matches (`type/subtype`, then `type/*`, then `*/*`), 0 when none does.
    A range with a q-value that is not a number from 0 to 1 is ignored (RFC 9110 §12.5.1)."""
    kind = full[0].partition("/")[0]
    best_rank, best_q = -1, 0.0
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        media = media.lower()
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if not 0.0 <= q <= 1.0:
            continue
        rank = 2 if media in full else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
        if rank > best_rank:
            best_rank, best_q = rank, q
    return best_q


def wants_msgpack(accept: str | None, *, default: bool = False) -> bool:
    """Whether to answer msgpack rather than JSON: media ranges are parsed with their q-values (no substring
    test, so `application/msgpack;q=0` refuses msgpack). msgpack when its q is higher than JSON's, JSON when
    lower; on a tie (no Accept, `*/*`, equal q, neither acceptable) `default`: the request body's own type."""
    if accept is None or not accept.strip():
        return default
    msgpack = _quality(accept, ("application/msgpack", "application/x-msgpack"))
    json = _quality(accept, ("application/json",))
    if msgpack != json:
        return msgpack > json
    return default
