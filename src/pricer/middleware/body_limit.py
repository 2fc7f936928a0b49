"""Body size limit, checked while streaming: 413 before an oversized body is read whole, with or
without Content-Length (chunked bodies too)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pricer.context import request_state
from pricer.errors import InvalidParameter, PayloadTooLarge


class BodyLimit:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = request_state(scope).route if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        limit = route.body_limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise InvalidParameter.for_field(
                        "Content-Length", "must be an integer", location="header"
                    ) from None
                if declared > limit:
                    raise PayloadTooLarge(limit)
                # The server frames the body by Content-Length (never more bytes than declared), so a
                # declared length within the limit needs no counting.
                await self.app(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)
