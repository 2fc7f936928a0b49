"""CORS for an allow-list of origins (`CORS_ORIGINS`): preflights answered here, allowed origins echoed,
a disallowed origin gets no CORS headers at all. `*` allows any origin but never with credentials."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import Scope

_ALLOWED_METHODS = b"GET, POST, PUT, DELETE, OPTIONS"
_ALLOWED_HEADERS = b"X-API-Key, Authorization, Content-Type, Accept, X-Request-ID, X-Correlation-ID"
_EXPOSED_HEADERS = (
    b"X-Request-ID, X-Correlation-ID, RateLimit, RateLimit-Policy, X-RateLimit-Limit, "
    b"X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"
)


class CorsPolicy:
    """The CORS headers of a request, computed by the request edge before anything else runs (so that
    error responses carry them too); a preflight is answered by the edge with them."""

    def __init__(self, origins: Sequence[str], *, max_age: int = 600) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origin.encode() for origin in origins if origin != "*")
        self._max_age = str(max_age).encode()
        self.active = self._any or bool(self._origins)

    def headers(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], bool]:
        """(the CORS headers of the response, whether the request is a preflight to answer with them: 204
        and these headers). No headers for a request without an allowed Origin."""
        origin = b""
        preflight = False
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight = True
        if not origin or not (self._any or origin in self._origins):
            return [], False
        headers = self._headers(origin)
        if preflight and scope["method"] == "OPTIONS":
            headers += [
                (b"access-control-allow-methods", _ALLOWED_METHODS),
                (b"access-control-allow-headers", _ALLOWED_HEADERS),
                (b"access-control-max-age", self._max_age),
                (b"content-length", b"0"),
            ]
            return headers, True
        return headers, False

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
