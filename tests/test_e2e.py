"""End to end: `python -m pricer serve` as a real process on loopback, called over real HTTP with the demo
keys it printed, and `python -m pricer load` sending a real availability file to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from tests.conftest import RunningServer, free_port, start_server, stop_server, wait_for_health
from tests.shared_data import SHARED_DATA

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

IBKR_2022 = SHARED_DATA / "ibkr_usa_2022-08-06.txt"
BOOTSTRAP_KEY = "bre_e2eadmin0001_" + "Kq7Zp2" * 7


def secret_of(key: str) -> str:
    return key.rsplit("_", 1)[1]


def logfmt_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("level=")]


def start_plain_server(tmp_path: Path, **env: str) -> RunningServer:
    """Like `start_server`, for an engine without demo data (no keys file to wait for)."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PRICER_", "DATABASE_URL", "REDIS_URL"))},
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DEMO_KEYS_FILE": "",
        "SHUTDOWN_DRAIN_SECONDS": "0",
        **env,
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pricer", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = RunningServer(base_url=f"http://127.0.0.1:{port}", process=process, keys={}, log_path=log_path)
    return wait_for_health(server)


async def run_cli(*args: str) -> tuple[int, str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PRICER_")}
    result = await anyio.run_process([sys.executable, "-m", "pricer", *args], env=environment, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_the_engine_over_real_http(live_server: RunningServer, tmp_path: Path) -> None:
    client_key = live_server.keys["DEMO_CLIENT_KEY"]
    admin_key = live_server.keys["DEMO_ADMIN_KEY"]
    assert live_server.keys["PRICER_URL"] == live_server.base_url
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as client:
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "healthy"
        assert health.headers["x-request-id"] == health.headers["x-correlation-id"]

        quote = await client.post(
            "/api/v1/calculate-locate",
            json={"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"},
            headers={"X-API-Key": client_key, "X-Request-ID": "e2e-quote-1"},
        )
        assert quote.status_code == 200, quote.text
        assert quote.headers["x-request-id"] == "e2e-quote-1"
        body = quote.json()
        assert body["breakdown"] == {"borrow_cost": 24.66, "markup": 1.23, "transaction_fees": 25.0}
        assert body["total_fee"] == 50.89
        stored = await client.get(f"/api/v1/quotes/{body['quote_id']}", headers={"X-API-Key": client_key})
        assert stored.status_code == 200
        assert stored.json() == body

        positions = [
            {"ticker": "AAPL", "position_value": 100000, "loan_days": 30},
            {"ticker": "NOPE", "position_value": 1, "loan_days": 1},
            {"ticker": "gme", "position_value": 2500.5, "loan_days": 10},
        ]
        batch = await client.post(
            "/api/v1/calculate-locate/batch",
            content=msgspec.msgpack.encode({"client_id": "demo_client", "positions": positions}),
            headers={"X-API-Key": client_key, "Content-Type": "application/msgpack"},
        )
        assert batch.status_code == 200, batch.text
        decoded: dict[str, Any] = msgspec.msgpack.decode(batch.content)
        assert (decoded["count"], decoded["priced"]) == (3, 2)
        assert [q["index"] for q in decoded["quotes"]] == [0, 2]
        assert decoded["quotes"][0]["total_fee"] == 50.89
        assert [(e["index"], e["error_code"]) for e in decoded["errors"]] == [(1, "TICKER_NOT_FOUND")]

        rate = await client.get("/api/v1/rates/GME", headers={"X-API-Key": client_key})
        assert rate.status_code == 200, rate.text
        assert rate.json()["current_rate"] == 0.37555736

        wrong_secret = f"bre_{client_key.split('_')[1]}_" + "W" * 40
        for headers in ({}, {"X-API-Key": wrong_secret}):
            refused = await client.get("/api/v1/rates/GME", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"]
            assert refused.json()["error_code"] == "UNAUTHORIZED"

        admin = await client.put(
            "/api/v1/admin/volatility", json={"value": 20}, headers={"X-API-Key": admin_key}
        )
        assert admin.status_code == 200, admin.text
        assert (await client.get("/nowhere")).status_code == 404

    # `pricer load` sends a real file to the running engine's admin endpoint.
    code, out, err = await run_cli(
        "load", "ibkr", str(IBKR_2022), "--url", live_server.base_url, "--key", admin_key
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "success"
    assert result["rows"] == 17461
    assert result["as_of"].startswith("2022-08-07T02:30:03")  # #BOF 22:30:03 US Eastern (EDT)
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as client:
        loaded = await client.get("/api/v1/rates/AA", headers={"X-API-Key": client_key})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["source"] == "availability_file"
    assert loaded.json()["available_shares"] == 4_000_000
    assert loaded.json()["is_fallback"] is False
    # ... and reports a refusal as such (a small file: see the report on large bodies).
    small = tmp_path / "small.txt"
    small.write_text(
        "#BOF|2022.08.06|22:30:03\r\n#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|\r\n#EOF|0\r\n"
    )
    code, _, err = await run_cli(
        "load", "ibkr", str(small), "--url", live_server.base_url, "--key", client_key
    )
    assert code != 0
    assert "403" in err, err

    log = live_server.log()
    # The demo keys are printed once, at start-up (DESIGN §1); no log line ever carries a secret.
    for key in (client_key, admin_key):
        assert log.count(secret_of(key)) == 1, "a demo key's secret is printed more than once"
    for line in logfmt_lines(log):
        for secret in (secret_of(client_key), secret_of(admin_key), "W" * 40):
            assert secret not in line, line
    assert logfmt_lines(log), "the server logs in logfmt"
    assert any('msg="Authentication error"' in line for line in logfmt_lines(log))


async def test_cli_load_into_an_engine_without_demo_data(tmp_path: Path) -> None:
    """With a bootstrap admin key and no demo data, the loaded file is the snapshot in force."""
    server = start_plain_server(tmp_path, SEED_DEMO_DATA="false", BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY)
    try:
        code, out, err = await run_cli(
            "load", "ibkr", str(IBKR_2022), "--url", server.base_url, "--key", BOOTSTRAP_KEY
        )
        assert code == 0, err
        assert json.loads(out)["rows"] == 17461
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            rate = await client.get("/api/v1/rates/AA", headers={"X-API-Key": BOOTSTRAP_KEY})
            assert rate.status_code == 200, rate.text
            body = rate.json()
            assert body["source"] == "availability_file"
            assert body["available_shares"] == 4_000_000
            assert body["base_rate"] == 0.002664  # FEERATE 0.2664 %
            assert body["is_fallback"] is False
            capped = await client.get("/api/v1/rates/A", headers={"X-API-Key": BOOTSTRAP_KEY})
            assert capped.json()["available_shares"] == 10_000_000  # ">10000000"
    finally:
        stop_server(server)
    assert secret_of(BOOTSTRAP_KEY) not in server.log()  # never printed or logged


async def test_cli_load_reports_a_refusal_of_a_large_file(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"X" * (20 << 20))
    server = start_plain_server(tmp_path, SEED_DEMO_DATA="false", BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            issued = await client.post(
                "/api/v1/admin/keys",
                json={"client_id": "admin", "scopes": ["rates"]},
                headers={"X-API-Key": BOOTSTRAP_KEY},
            )
            assert issued.status_code == 201, issued.text
        rates_key = issued.json()["api_key"]
        code, _, err = await run_cli("load", "ibkr", str(big), "--url", server.base_url, "--key", rates_key)
        assert code != 0
        assert "403" in err, err
        unknown = "bre_unknown00001_" + "A" * 40
        code, _, err = await run_cli("load", "ibkr", str(big), "--url", server.base_url, "--key", unknown)
        assert code != 0
        assert "401" in err, err
    finally:
        stop_server(server)


def test_a_second_serve_on_a_busy_port_leaves_the_first_ones_demo_keys(tmp_path: Path) -> None:
    """A second `pricer serve` on the port of a running one stops before its start-up: it writes no demo
    keys over the running server's file (whose key keeps working) and says in one line which port is busy."""
    first = start_server(tmp_path)
    try:
        keys_file = tmp_path / "demo-keys.env"
        before = keys_file.read_text()
        port = first.base_url.rsplit(":", 1)[1]
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PRICER_", "DATABASE_", "REDIS_"))},
            "HOST": "127.0.0.1",
            "PORT": port,
            "DEMO_KEYS_FILE": str(keys_file),
        }
        second = subprocess.run(
            [sys.executable, "-m", "pricer", "serve"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0, (second.stdout, second.stderr)
        said = [line for line in second.stderr.splitlines() if line.startswith("pricer: ")]
        assert len(said) == 1, second.stderr
        assert said[0].startswith(f"pricer: cannot listen on 127.0.0.1:{port}: "), said
        assert "DEMO_CLIENT_KEY" not in second.stdout + second.stderr  # no keys were seeded or printed
        assert keys_file.read_text() == before
        client_key = first.keys["DEMO_CLIENT_KEY"]
        still = httpx.get(f"{first.base_url}/api/v1/rates/GME", headers={"X-API-Key": client_key}, timeout=10)
        assert still.status_code == 200, still.text
    finally:
        stop_server(first)
