"""What the guarded protocol (header/body timers, header size accounting) costs per request, against
uvicorn's own httptools protocol: both parse the same keep-alive requests from an in-memory transport
and hand them to the same trivial ASGI app, in one process, alternating rounds (CPU time of this
process, so that other load on the machine counts less).

    python benchmarks/bench_protocol.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from pricer.protocol import ConnectionHygiene, GuardedHttpToolsProtocol, ServerConfig

REQUEST = (
    b"POST /api/v1/calculate-locate HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: bench\r\n"
    b"Accept: */*\r\nContent-Type: application/json\r\nX-API-Key: bre_abcdefghijkl_" + b"x" * 40 + b"\r\n"
    b"Content-Length: 80\r\n\r\n"
    + b'{"ticker":"AAPL","position_value":100000,"loan_days":30,"client_id":"demo_client"}'[:80]
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(protocol_class: type[HttpToolsProtocol], requests: int) -> float:
    config = ServerConfig(
        app,
        hygiene=ConnectionHygiene(),
        drain_seconds=0,
        lifespan="off",
        log_config=None,
        proxy_headers=False,
    )
    config.load()
    state = ServerState()
    protocol = protocol_class(config=config, server_state=state, app_state={})  # type: ignore[arg-type]
    transport = Transport()
    protocol.connection_made(transport)
    started = time.process_time()
    for _ in range(requests):
        protocol.data_received(REQUEST)
        while state.tasks:
            await asyncio.gather(*state.tasks)
    elapsed = time.process_time() - started
    assert transport.written >= requests, transport.written
    protocol.connection_lost(None)
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import uvloop

    plain: list[float] = []
    guarded: list[float] = []
    for _ in range(args.rounds):
        plain.append(uvloop.run(run(HttpToolsProtocol, args.requests)))
        guarded.append(uvloop.run(run(GuardedHttpToolsProtocol, args.requests)))
    p, g = statistics.median(plain), statistics.median(guarded)
    print(f"uvicorn httptools: {p:.2f} µs/request; guarded: {g:.2f} µs/request; difference {g - p:+.2f} µs")
    print(f"(medians of {args.rounds} rounds of {args.requests} requests; uvicorn {uvicorn.__version__})")


if __name__ == "__main__":
    main()
