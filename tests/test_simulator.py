"""The provider simulator (`pricer simulate-sources`, issue 20 point 7) as a real process on loopback, called
by a real HTTP client: each provider's answer against the data files read independently here, the API key,
the control API, the stats, and each fault mode as a client observes it (drip, hang, down and the huge body
included).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import msgspec
import pytest

from tests.conftest import free_port
from tests.shared_data import SHARED_DATA

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sim-test-key-3f9a"
KEYED = {"X-API-Key": API_KEY}
PROVIDER_PATHS = {
    "lender": "/api/borrows/GME",
    "volatility": "/api/market/vix",
    "events": "/api/calendar/events?ticker=AAPL",
}
MALFORMED_KINDS = (
    "html",
    "non_json",
    "wrong_types",
    "missing_fields",
    "nan",
    "infinity",
    "negative",
    "too_high",
    "vix_out_of_range",
)


@dataclass
class Simulator:
    base_url: str
    process: subprocess.Popen[str]
    first_line: str
    client: httpx.Client

    def control(self, method: str, path: str, body: object = None) -> Any:
        response = self.client.request(method, path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def stats(self) -> Any:
        return self.control("GET", "/control/stats")


def _start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Simulator:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "SIMULATOR_API_KEY"} | (env or {})
    process = subprocess.Popen(
        [sys.executable, "-m", "pricer", "simulate-sources", "--port", str(port), *args],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    # The simulator writes nothing after its first line but warnings; they stay in the pipe (never full).
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline and not line.startswith("simulator listening"):
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = process.stdout.readline()
        if not line:
            break
    selector.close()
    if not line.startswith("simulator listening"):
        process.kill()
        output = process.stdout.read()
        process.stdout.close()
        process.wait()
        raise RuntimeError(f"simulator did not start: {line!r} {output}")
    base_url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base_url, timeout=5)
    return Simulator(base_url=base_url, process=process, first_line=line.strip(), client=client)


def _stop(simulator: Simulator) -> None:
    simulator.client.close()
    simulator.process.terminate()
    try:
        simulator.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        simulator.process.kill()
        simulator.process.wait()
    assert simulator.process.stdout is not None
    simulator.process.stdout.close()


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    # Started from the repository root without --data-dir: the default ../shared/data is the data.
    running = _start([], cwd=ROOT, env={"SIMULATOR_API_KEY": API_KEY})
    yield running
    _stop(running)


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> None:
    if "simulator" in request.fixturenames:
        sim: Simulator = request.getfixturevalue("simulator")
        sim.control("DELETE", "/control/faults")
        sim.control("DELETE", "/control/stats")


def _get(sim: Simulator, path: str, **options: Any) -> httpx.Response:
    return sim.client.get(path, headers=KEYED, **options)


# ---- the data, read here without the engine's parsers ----------------------------------------------------


def _newest_ibkr_rows() -> dict[str, list[str]]:
    def bof(path: Path) -> str:
        return path.read_text(errors="replace").split("\n", 1)[0]

    newest = max(SHARED_DATA.glob("ibkr_*.txt"), key=bof)  # '#BOF|YYYY.MM.DD|HH:MM:SS' sorts as time
    rows = newest.read_text(errors="replace").splitlines()[2:-1]
    return {row.split("|")[0]: row.split("|") for row in rows}


def _expected_rate(feerate: str) -> float:
    return float(Decimal(feerate) / 100)


# ---- provider answers -------------------------------------------------------------------------------------


def test_it_announces_its_address(simulator: Simulator) -> None:
    assert simulator.first_line == f"simulator listening on {simulator.base_url}"
    assert simulator.client.get("/control/health").status_code == 200


def test_lender_answers_the_newest_ibkr_files_feerate_with_the_derived_status(simulator: Simulator) -> None:
    rows = _newest_ibkr_rows()
    # One ticker in each status band (EASY <= 1 %, MEDIUM <= 10 %, HARD above), as the file states them.
    for ticker, status in (("AAPL", "EASY"), ("AAA", "MEDIUM"), ("GME", "HARD")):
        response = _get(simulator, f"/api/borrows/{ticker}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"rate": _expected_rate(rows[ticker][6]), "status": status}
    assert _get(simulator, "/api/borrows/GME").json()["rate"] == 0.303849


def test_lender_answers_404_for_a_ticker_it_has_no_rate_for(simulator: Simulator) -> None:
    rows = _newest_ibkr_rows()
    no_rate = next(ticker for ticker, row in rows.items() if row[6] == "NA" and ticker.isalpha())
    for ticker in ("NOSUCHTICKER", no_rate):
        response = _get(simulator, f"/api/borrows/{ticker}")
        assert (response.status_code, response.json()) == (404, {"error": "unknown"})


def test_volatility_answers_the_vix_historys_last_close(simulator: Simulator) -> None:
    last = (SHARED_DATA / "VIX_History.csv").read_text().strip().splitlines()[-1].split(",")
    month, day, year = last[0].split("/")
    response = _get(simulator, "/api/market/vix")
    assert response.status_code == 200
    assert response.json() == {"value": float(last[4]), "timestamp": f"{year}-{month}-{day}T00:00:00Z"}


def test_events_answer_the_earnings_calendar(simulator: Simulator) -> None:
    (calendar,) = SHARED_DATA.glob("*earnings*.csv")
    with calendar.open(newline="") as file:
        dates = sorted({row["reportDate"] for row in csv.DictReader(file) if row["symbol"] == "AAPL"})
    assert dates
    response = _get(simulator, "/api/calendar/events", params={"ticker": "AAPL"})
    assert response.json() == {"events": [{"type": "earnings", "date": day} for day in dates]}
    assert _get(simulator, "/api/calendar/events?ticker=NOSUCHTICKER").json() == {"events": []}
    assert _get(simulator, "/api/calendar/events").status_code == 400


def test_provider_calls_need_the_api_key_and_control_calls_do_not(simulator: Simulator) -> None:
    for path in PROVIDER_PATHS.values():
        assert simulator.client.get(path).status_code == 401
        wrong = simulator.client.get(path, headers={"X-API-Key": "wrong"})
        assert wrong.status_code == 401
        assert _get(simulator, path).status_code == 200
    stats = simulator.stats()
    assert [stats[p]["unauthorized"] for p in PROVIDER_PATHS] == [2, 2, 2]
    assert [stats[p]["calls"] for p in PROVIDER_PATHS] == [1, 1, 1]


def test_without_a_key_configured_any_call_is_answered(tmp_path: Path) -> None:
    (tmp_path / "VIX_History.csv").write_text("DATE,OPEN,HIGH,LOW,CLOSE\n01/02/2026,1,2,1,17.5\n")
    sim = _start(["--data-dir", str(tmp_path)], cwd=tmp_path)
    try:
        assert sim.client.get("/api/market/vix").json() == {
            "value": 17.5,
            "timestamp": "2026-01-02T00:00:00Z",
        }
        # No IBKR file and no calendar in that directory: those providers start empty.
        assert sim.client.get("/api/borrows/AAPL").status_code == 404
        assert sim.client.get("/api/calendar/events?ticker=AAPL").json() == {"events": []}
    finally:
        _stop(sim)


def _ibkr_file(bof: str, rows: list[str]) -> str:
    header = "#SYM|CUR|NAME|CON|ISIN|REBATERATE|FEERATE|AVAILABLE|"
    return "\n".join([f"#BOF|{bof}", header, *rows, f"#EOF|{len(rows)}"]) + "\n"


def test_the_lender_serves_the_file_with_the_newest_bof_and_skips_a_damaged_one(tmp_path: Path) -> None:
    # Named so that their names sort the other way round from their #BOF times.
    (tmp_path / "ibkr_a_newest_but_damaged.txt").write_text("#BOF|2024.01.02|09:00:00\nnot a header\n")
    (tmp_path / "ibkr_b_newer.txt").write_text(
        _ibkr_file(
            "2023.01.02|10:00:00", ["ZZA|USD|ZZA INC|1|X|1.0|12.5|1000|", "ZZB|USD|ZZB INC|2|X|NA|NA|5|"]
        )
    )
    (tmp_path / "ibkr_z_older.txt").write_text(
        _ibkr_file("2020.01.01|10:00:00", ["ZZA|USD|ZZA INC|1|X|1|0.5|9|"])
    )
    sim = _start(["--data-dir", str(tmp_path)], cwd=tmp_path)
    try:
        assert sim.client.get("/api/borrows/ZZA").json() == {"rate": 0.125, "status": "HARD"}
        assert sim.client.get("/api/borrows/ZZB").status_code == 404  # FEERATE NA: no rate, unknown
    finally:
        _stop(sim)


def test_a_missing_data_directory_stops_it_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pricer", "simulate-sources", "--data-dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr


# ---- control API ------------------------------------------------------------------------------------------


def test_control_sets_and_removes_lender_rates(simulator: Simulator) -> None:
    state = simulator.control("PUT", "/control/lender/ZZSIM", {"rate": 0.12, "status": "HARD_TO_BORROW"})
    assert state == {"ticker": "ZZSIM", "rate": 0.12, "status": "HARD_TO_BORROW"}
    assert _get(simulator, "/api/borrows/ZZSIM").json() == {"rate": 0.12, "status": "HARD_TO_BORROW"}
    simulator.control("PUT", "/control/lender/ZZSIM", {"rate": 0.05})  # status derived when not given
    assert _get(simulator, "/api/borrows/ZZSIM").json() == {"rate": 0.05, "status": "MEDIUM"}
    simulator.control("DELETE", "/control/lender/ZZSIM")
    assert _get(simulator, "/api/borrows/ZZSIM").status_code == 404
    bad = simulator.client.put("/control/lender/ZZSIM", json={"rate": "high"}, timeout=5)
    assert bad.status_code == 400


def test_control_sets_volatility_and_events(simulator: Simulator) -> None:
    before = _get(simulator, "/api/market/vix").json()
    try:
        state = simulator.control(
            "PUT", "/control/volatility", {"value": 31.5, "timestamp": "2026-12-04T14:30:00Z"}
        )
        assert state == {"value": 31.5, "timestamp": "2026-12-04T14:30:00Z"}
        assert _get(simulator, "/api/market/vix").json() == state
    finally:
        simulator.control("PUT", "/control/volatility", before)
    events = [
        {"type": "earnings", "date": "2026-12-08", "risk_factor": 7},
        {"type": "fda", "date": "2026-12-20"},
    ]
    simulator.control("PUT", "/control/events/ZZSIM", {"events": events})
    assert _get(simulator, "/api/calendar/events?ticker=ZZSIM").json() == {"events": events}
    bad = simulator.client.put("/control/events/ZZSIM", json={"events": [{"date": "soon"}]}, timeout=5)
    assert bad.status_code == 400


def test_stats_count_calls_per_provider_and_ticker_and_reset(simulator: Simulator) -> None:
    for ticker in ("GME", "GME", "AAPL"):
        _get(simulator, f"/api/borrows/{ticker}")
    _get(simulator, "/api/market/vix")
    _get(simulator, "/api/calendar/events?ticker=AAPL")
    stats = simulator.stats()
    assert stats["lender"]["calls"] == 3
    assert stats["lender"]["by_ticker"] == {"GME": 2, "AAPL": 1}
    assert stats["volatility"]["calls"] == 1
    assert stats["events"] == {"calls": 1, "unauthorized": 0, "by_ticker": {"AAPL": 1}}
    assert stats["max_concurrent"] == {"lender": 1, "volatility": 1, "events": 1}
    reset = simulator.control("DELETE", "/control/stats")
    assert reset["lender"]["calls"] == 0
    assert reset["lender"]["by_ticker"] == {}


def test_fault_plans_are_checked_and_reset(simulator: Simulator) -> None:
    url = "/control/faults/"
    assert simulator.client.put(url + "lender", json={"mode": "malformed"}, timeout=5).status_code == 400
    assert (
        simulator.client.put(url + "lender", json={"mode": "error", "error_rate": 2}, timeout=5).status_code
        == 400
    )
    assert simulator.client.put(url + "lender", json={"mode": "sometimes"}, timeout=5).status_code == 400
    assert simulator.client.put(url + "nobody", json={"mode": "error"}, timeout=5).status_code == 404
    state = simulator.control("PUT", "/control/faults/all", {"mode": "error"})
    assert {plan["mode"] for plan in state.values()} == {"error"}
    assert {_get(simulator, path).status_code for path in PROVIDER_PATHS.values()} <= {500, 503}
    simulator.control("DELETE", "/control/faults")
    assert {_get(simulator, path).status_code for path in PROVIDER_PATHS.values()} == {200}


# ---- faults as a client sees them -------------------------------------------------------------------------


def test_error_mode_fails_the_given_share_of_calls(simulator: Simulator) -> None:
    simulator.control("PUT", "/control/faults/lender", {"mode": "error"})
    assert {_get(simulator, "/api/borrows/GME").status_code for _ in range(10)} <= {500, 503}
    simulator.control("PUT", "/control/faults/lender", {"mode": "error", "error_rate": 0.5})
    statuses = [_get(simulator, "/api/borrows/GME").status_code for _ in range(60)]
    assert set(statuses) == {200, 500, 503}
    # Only the lender was switched: the others still answer.
    assert _get(simulator, "/api/market/vix").status_code == 200


def test_latency_delays_every_answer(simulator: Simulator) -> None:
    simulator.control("PUT", "/control/faults/volatility", {"mode": "ok", "latency_ms": 300})
    started = time.monotonic()
    response = _get(simulator, "/api/market/vix")
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.29


def test_hang_holds_calls_until_the_client_leaves(simulator: Simulator) -> None:
    simulator.control("PUT", "/control/faults/lender", {"mode": "hang"})
    errors: list[BaseException] = []

    def call() -> None:
        try:
            _get(simulator, "/api/borrows/GME", timeout=3)
        except httpx.ReadTimeout as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while simulator.stats()["in_flight"]["lender"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert simulator.stats()["in_flight"]["lender"] == 3
    for thread in threads:
        thread.join()
    assert len(errors) == 3  # no answer at all within the client's deadline
    deadline = time.monotonic() + 5
    while simulator.stats()["in_flight"]["lender"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = simulator.stats()
    assert stats["in_flight"]["lender"] == 0  # released when the clients gave up
    assert stats["max_concurrent"]["lender"] == 3


def test_down_drops_the_connection_without_an_answer(simulator: Simulator) -> None:
    simulator.control("PUT", "/control/faults/events", {"mode": "down"})
    # Closed before any byte of an answer: "disconnected without a response", or a reset if the RST wins.
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        _get(simulator, "/api/calendar/events?ticker=AAPL")
    assert simulator.stats()["events"]["calls"] == 1
    assert _get(simulator, "/api/borrows/GME").status_code == 200


class StrictLender(msgspec.Struct, forbid_unknown_fields=True):
    rate: Annotated[float, msgspec.Meta(ge=0, le=10)]
    status: str


class StrictVolatility(msgspec.Struct, forbid_unknown_fields=True):
    value: Annotated[float, msgspec.Meta(ge=0, le=200)]
    timestamp: dt.datetime


class StrictEvent(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    date: dt.date
    risk_factor: Annotated[int, msgspec.Meta(ge=0, le=10)] | None = None


class StrictEvents(msgspec.Struct, forbid_unknown_fields=True):
    events: list[StrictEvent]


STRICT = {"lender": StrictLender, "volatility": StrictVolatility, "events": StrictEvents}


@pytest.mark.parametrize("provider", list(PROVIDER_PATHS))
def test_each_malformed_answer_fails_a_strict_reading(simulator: Simulator, provider: str) -> None:
    # The healthy answer passes the strict reading; each bad one does not (and NaN/Infinity pass Python's
    # lenient json module: the trap a client must not fall into).
    assert msgspec.json.decode(_get(simulator, PROVIDER_PATHS[provider]).content, type=STRICT[provider])
    for kind in MALFORMED_KINDS:
        simulator.control("PUT", f"/control/faults/{provider}", {"mode": "malformed", "malformed": kind})
        response = _get(simulator, PROVIDER_PATHS[provider])
        assert response.status_code == 200, kind
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(response.content, type=STRICT[provider])
        if kind in ("nan", "infinity"):
            json.loads(response.content)
        if kind == "html":
            assert response.headers["content-type"].startswith("text/html")
    assert simulator.stats()[provider]["calls"] == 1 + len(MALFORMED_KINDS)


def test_huge_body_is_valid_json_past_64_kib(simulator: Simulator) -> None:
    simulator.control("PUT", "/control/faults/lender", {"mode": "malformed", "malformed": "huge_body"})
    response = _get(simulator, "/api/borrows/GME")
    assert len(response.content) > 64 * 1024
    assert int(response.headers["content-length"]) == len(response.content)
    body = response.json()
    assert (body["rate"], body["status"]) == (0.303849, "HARD")


def test_redirect_points_elsewhere_and_the_target_counts_followers(simulator: Simulator) -> None:
    simulator.control("PUT", "/control/faults/volatility", {"mode": "malformed", "malformed": "redirect"})
    response = _get(simulator, "/api/market/vix")
    assert response.status_code == 302
    assert response.headers["location"] == simulator.base_url + "/redirected/api/market/vix"
    assert simulator.stats()["redirects_followed"] == 0
    followed = _get(simulator, "/api/market/vix", follow_redirects=True)
    assert followed.status_code == 200
    assert "value" in followed.json()
    assert simulator.stats()["redirects_followed"] == 1


def test_drip_sends_a_valid_body_one_byte_at_a_time(simulator: Simulator) -> None:
    healthy = _get(simulator, "/api/borrows/GME").content
    simulator.control("PUT", "/control/faults/lender", {"mode": "malformed", "malformed": "drip"})
    received = b""
    in_flight_meanwhile = -1
    started = time.monotonic()
    with simulator.client.stream("GET", "/api/borrows/GME", headers=KEYED) as response:
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(healthy)
        for chunk in response.iter_raw():
            received += chunk
            if in_flight_meanwhile < 0:
                in_flight_meanwhile = simulator.stats()["in_flight"]["lender"]
            if len(received) >= 4:
                break  # leaving the loop closes the response: the client is gone
    four_bytes_after = time.monotonic() - started
    assert received == healthy[: len(received)]
    # Byte 4 leaves the simulator three 200 ms pauses after byte 1, whatever the client's pace: the whole
    # body takes ~6 s, past any sane deadline.
    assert four_bytes_after >= 0.58
    assert in_flight_meanwhile == 1  # a drip counts as in flight until its last byte
    deadline = time.monotonic() + 5
    while simulator.stats()["in_flight"]["lender"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert simulator.stats()["in_flight"]["lender"] == 0  # the drip stopped when the client left
