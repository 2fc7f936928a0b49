"""uvicorn's request-response cycle with a leaner response start.

uvicorn checks, lowercases and copies a response's headers one by one in Python (two regular expression
searches and a handful of comparisons per header); a single quote's response has about sixteen headers
(content, request ids, security, RateLimit, date), and that loop was the largest Python cost of the
protocol per quote. Here the same checks run once over all the names and once over all the values (a
character that is forbidden in one name is forbidden in their concatenation, and the same for values), and
the header block is joined by C-level calls. Anything the fast path does not handle exactly as uvicorn
would (upper-case or repeated names, no Content-Length, `Connection` or `Transfer-Encoding` set by the
app, an access log, a paused or gone transport) goes through uvicorn's own `send`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

# Every byte uvicorn's header checks (HEADER_RE for names, HEADER_VALUE_RE for values) allow: `translate`
# deleting them leaves what they forbid (one pass in C over the joined names or values, no regex engine).
_NAME_ALLOWED = bytes(code for code in range(256) if not HEADER_RE.search(bytes((code,))))
_VALUE_ALLOWED = bytes(code for code in range(256) if not HEADER_VALUE_RE.search(bytes((code,))))
# Header names already found lower-case and valid: a response whose every name is one of them skips the
# name checks (responses repeat the same few dozen names). Bounded: emptied when full.
_CHECKED_NAMES: set[bytes] = set()
_CHECKED_NAMES_KEPT = 1024
_FIELD = b": ".join  # (name, value) -> b"name: value"
_LINE_BREAK = b"\r\n".join
_END = b"\r\n\r\n"
_END_CLOSE = b"\r\nconnection: close\r\n\r\n"


class ResponseCycle(RequestResponseCycle):
    async def send(self, message: Any) -> None:
        if self.response_started:
            if (
                message["type"] != "http.response.body"
                or self.response_complete
                or self.chunked_encoding
                or self.disconnected
                or self.flow.write_paused
            ):
                await super().send(message)
                return
            # uvicorn's body step for a response framed by Content-Length, without a second coroutine.
            body = message.get("body", b"")
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            else:
                if len(body) > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= len(body)
                self.transport.write(body)
            if not message.get("more_body", False):
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
            return
        if (
            message["type"] != "http.response.start"
            or self.access_log
            or self.disconnected
            or self.flow.write_paused
        ):
            await super().send(message)
            return
        # uvicorn's default headers (the date it refreshes every second) first, as uvicorn sends them.
        headers = [*self.default_headers, *message.get("headers", ())]
        fields = dict(headers)
        if (
            len(fields) != len(headers)
            or b"content-length" not in fields
            or b"transfer-encoding" in fields
            or b"connection" in fields
        ):
            await super().send(message)
            return
        if not _CHECKED_NAMES.issuperset(fields):
            names = b"".join(fields)
            if names != names.lower():
                await super().send(message)
                return
            if names.translate(None, _NAME_ALLOWED):
                raise RuntimeError("Invalid HTTP header name.")
            if len(_CHECKED_NAMES) >= _CHECKED_NAMES_KEPT:
                _CHECKED_NAMES.clear()
            _CHECKED_NAMES.update(fields)
        if b"".join(fields.values()).translate(None, _VALUE_ALLOWED):
            raise RuntimeError("Invalid HTTP header value.")
        self.expected_content_length = int(fields[b"content-length"])
        self.chunked_encoding = False
        self.response_started = True
        self.waiting_for_100_continue = False
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[message["status"]],
                    _LINE_BREAK(map(_FIELD, headers)),
                    _END if self.keep_alive else _END_CLOSE,
                )
            )
        )


class MessageEvent:
    """What a cycle uses of `asyncio.Event` (set, clear, wait, is_set), with its semantics: made for every
    request, at a fifth of asyncio.Event's cost to create (its waiters list is made by the first wait)."""

    __slots__ = ("_is_set", "_waiters")

    def __init__(self) -> None:
        self._is_set = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        if not self._is_set:
            self._is_set = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> bool:
        if self._is_set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)
