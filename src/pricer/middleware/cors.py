"""CORS for an allow-list of origins (`CORS_ORIGINS`): preflights answered here, allowed origins echoed,
a disallowed origin gets no CORS headers at all. `*` allows any origin but never with credentials."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ALLOWED_METHODS = b"GET, POST, PUT, DELETE, OPTIONS"
_ALLOWED_HEADERS = b"X-API-Key, Authorization, Content-Type, Accept, X-Request-ID, X-Correlation-ID"
_EXPOSED_HEADERS = (
    b"X-Request-ID, X-Correlation-ID, RateLimit, RateLimit-Policy, X-RateLimit-Limit, "
    b"X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"
)


class CORS:
    def __init__(self, app: ASGIApp, *, origins: Sequence[str], max_age: int = 600) -> None:
        self.app = app
        self._any = "*" in origins
        self._origins = frozenset(origin.encode() for origin in origins if origin != "*")
        self._max_age = str(max_age).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (self._any or self._origins):
            await self.app(scope, receive, send)
            return
        origin = b""
        preflight = False
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight = True
        if not origin or not (self._any or origin in self._origins):
            await self.app(scope, receive, send)
            return
        headers = self._headers(origin)
        if preflight and scope["method"] == "OPTIONS":
            headers += [
                (b"access-control-allow-methods", _ALLOWED_METHODS),
                (b"access-control-allow-headers", _ALLOWED_HEADERS),
                (b"access-control-max-age", self._max_age),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        if self._any:
            return [
                (b"access-control-allow-origin", b"*"),
                (b"access-control-expose-headers", _EXPOSED_HEADERS),
            ]
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-expose-headers", _EXPOSED_HEADERS),
            (b"vary", b"Origin"),
        ]
