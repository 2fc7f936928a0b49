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

from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

_FIELD = b": ".join  # (name, value) -> b"name: value"
_LINE_BREAK = b"\r\n".join
_END = b"\r\n\r\n"
_END_CLOSE = b"\r\nconnection: close\r\n\r\n"


class ResponseCycle(RequestResponseCycle):
    async def send(self, message: Any) -> None:
        if (
            self.response_started
            or message["type"] != "http.response.start"
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
        names = b"".join(fields)
        if names != names.lower():
            await super().send(message)
            return
        if HEADER_RE.search(names):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"".join(fields.values())):
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
