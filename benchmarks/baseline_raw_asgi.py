"""The ceiling for the HTTP benchmark: a bare ASGI callable behind the same uvicorn configuration.

It does the least a quote endpoint can do and still be one: read the whole body, check the API key
header by a constant-time comparison, decode the JSON with msgspec and answer a small JSON document
built from it. No routing table, no middlewares, no pricing. Whatever the engine spends above this
is the cost of its own code; what this spends is uvicorn + httptools + uvloop + the kernel.

    BASELINE_API_KEY=bre_<id>_<secret> HOST=127.0.0.1 PORT=8002 python benchmarks/baseline_raw_asgi.py
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

QUOTE_PATH = "/api/v1/calculate-locate"
_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode
_JSON_HEADERS = [(b"content-type", b"application/json")]


class RawQuoteApp:
    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/health":
            await self._answer(send, 200, b'{"status":"healthy"}')
            return
        if scope["path"] != QUOTE_PATH or scope["method"] != "POST":
            await self._answer(send, 404, b'{"error":"not found"}')
            return
        key = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                key = value
        if not hmac.compare_digest(key, self._key):
            await self._answer(send, 401, b'{"error":"unauthorized"}')
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = _decode(body)
        await self._answer(
            send,
            200,
            _encode({"status": "success", "ticker": request.get("ticker"), "total_fee": 0.0}),
        )

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def serve(app: Any, default_port: int) -> None:
    """Serve a baseline the way the engine is served: uvicorn, uvloop, httptools, access log off."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", str(default_port))),
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
    )
    uvicorn.Server(config).run()


def main() -> None:
    import secrets

    key = os.environ.get("BASELINE_API_KEY") or f"bre_{secrets.token_hex(6)}_{secrets.token_hex(20)}"
    if not os.environ.get("BASELINE_API_KEY"):
        print(f"BASELINE_API_KEY={key}", flush=True)
    serve(RawQuoteApp(key), 8002)


if __name__ == "__main__":
    main()
