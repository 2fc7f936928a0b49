"""Body size limit, applied by the request edge as the body streams: 413 before an oversized body is read
whole, with or without Content-Length (chunked bodies too). A body sent with a Content-Encoding other than
`identity` is 415 before it is read: bodies are never decoded (so no decompression bomb), and reading a gzip
body as JSON would only give a misleading 400."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Message, Receive, Scope

from pricer.errors import InvalidParameter, PayloadTooLarge, UnsupportedMediaType

# Methods whose requests carry no body here: their Content-Encoding, if any, describes nothing read.
_WITHOUT_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def _refuse_encoded_body(encodings: Iterable[bytes]) -> None:
    """415 naming Content-Encoding when any coding listed (in any of its headers) is not `identity`."""
    for value in encodings:
        codings = [coding.strip() for coding in value.decode("latin-1").split(",")]
        refused = [coding for coding in codings if coding and coding.lower() != "identity"]
        if refused:
            raise UnsupportedMediaType(", ".join(refused), ["identity"], header="Content-Encoding")


def limit_body(scope: Scope, limit: int, receive: Receive) -> Receive:
    """`receive` for a request whose body may be at most `limit` bytes: raises at once for a refused
    encoding or a declared length over the limit, else counts the bytes of a body without a length."""
    length: bytes | None = None
    encodings: list[bytes] = []
    for name, value in scope["headers"]:  # one pass over the headers
        if name == b"content-length":
            if length is None:
                length = value
        elif name == b"content-encoding":
            encodings.append(value)
    if encodings and scope["method"] not in _WITHOUT_BODY:
        _refuse_encoded_body(encodings)
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise InvalidParameter.for_field(
                "Content-Length", "must be an integer", location="header"
            ) from None
        if declared > limit:
            raise PayloadTooLarge(limit)
        # The server frames the body by Content-Length (never more bytes than declared), so a declared
        # length within the limit needs no counting.
        return receive
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(limit)
        return message

    return limited_receive
