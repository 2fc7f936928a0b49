"""`pricer simulate-sources`: the provider simulator served by uvicorn on one port.

uvicorn's httptools protocol is extended by one line: each request's scope carries the connection's
transport (under `TRANSPORT_EXTENSION`), which the `down` fault aborts to drop a call without an answer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pricer.simulator.app import TRANSPORT_EXTENSION, SimulatorState, create_simulator_app
from pricer.simulator.data import load_provider_data

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_PORT", "SimulatorProtocol", "run_simulator"]

DEFAULT_PORT = 8100
DEFAULT_DATA_DIR = Path("../shared/data")
API_KEY_VARIABLE = "SIMULATOR_API_KEY"
# A held (`hang`) call keeps its task until its client leaves; at shutdown it is cancelled after this long.
SHUTDOWN_GRACE_SECONDS = 1


class SimulatorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests carry their connection's transport."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions: dict[str, object] = dict(self.scope.get("extensions") or {})
        extensions[TRANSPORT_EXTENSION] = self.transport
        self.scope["extensions"] = extensions  # type: ignore[typeddict-item]


class _AnnouncingServer(uvicorn.Server):
    """Prints the line scripts wait for once the socket listens."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            # The bound port, which differs from the configured one when that is 0 (any free port).
            port = next(
                (sock.getsockname()[1] for server in self.servers for sock in server.sockets),
                self.config.port,
            )
            print(f"simulator listening on http://{self.config.host}:{port}", flush=True)


def run_simulator(*, host: str, port: int, data_dir: Path, api_key: str | None) -> int:
    """Serve the simulator until interrupted; 2 when the data directory does not exist."""
    try:
        data = load_provider_data(data_dir)
    except FileNotFoundError as error:
        print(f"pricer: {error}", file=sys.stderr)
        return 2
    key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    app = create_simulator_app(SimulatorState(data, key))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=SimulatorProtocol,
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )
    server = _AnnouncingServer(config)
    asyncio.run(server.serve())
    return 0 if server.started else 1
