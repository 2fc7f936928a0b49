"""Load-test scenarios: TOML files in `benchmarks/scenarios/` turned into the raw HTTP requests a generator
sends in rotation.

A scenario file names weighted request kinds and the data they draw from:

    description = "..."
    expect_status = [200]          # any other status makes the run invalid
    require_status = []            # statuses the run must see at least once (e.g. 429)
    records = 2000                 # distinct requests generated (sent in rotation)
    seed = 1
    tickers = ["AAPL", "GME"]
    position_value = [1000.0, 5000000.0]   # dollars, 2 decimals, uniform
    loan_days = [1, 365]

    [[request]]
    kind = "quote-post"            # quote-post | quote-get | rate | rates | batch
    weight = 70
    # batch only: positions = 10000, format = "json" | "msgpack"

Every request carries the `X-API-Key` of one key from the key pool (round robin), and quotes name that key's
client. Keys never live in code or scenario files: they come from the environment or a keys file (see
`load_keys`).
"""

from __future__ import annotations

import json
import os
import random
import struct
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
KINDS = ("quote-post", "quote-get", "rate", "rates", "batch")
QUOTE_PATH = "/api/v1/calculate-locate"


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKey:
    client_id: str
    key: str


@dataclass(frozen=True)
class RequestKind:
    kind: str
    weight: int
    positions: int = 0
    format: str = "json"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    requests: tuple[RequestKind, ...]
    expect_status: frozenset[int] = frozenset({200})
    require_status: frozenset[int] = frozenset()
    records: int = 2000
    seed: int = 1
    tickers: tuple[str, ...] = ("AAPL", "MSFT", "NVDA", "TSLA", "GME", "AMC", "BRK B")
    position_value: tuple[float, float] = (1000.0, 5_000_000.0)
    loan_days: tuple[int, int] = (1, 365)
    extra: Mapping[str, Any] = field(default_factory=dict)
    # A batch sent back to back on a connection of its own for the whole run (`[background]`): what the
    # generator's requests meet, e.g. single quotes while 10^6-position batches are priced.
    background: RequestKind | None = None


def available() -> list[str]:
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ScenarioError(f"no scenario {name_or_path!r} (known: {', '.join(available())})")
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path.name}: {error}") from None
    return parse_scenario(path.stem, document)


def parse_scenario(name: str, document: Mapping[str, Any]) -> Scenario:
    known = {
        "description",
        "expect_status",
        "require_status",
        "records",
        "seed",
        "tickers",
        "position_value",
        "loan_days",
        "request",
        "background",
    }
    unknown = sorted(set(document) - known)
    if unknown:
        raise ScenarioError(f"{name}: unknown keys {unknown}")
    raw_requests = document.get("request")
    if not isinstance(raw_requests, list) or not raw_requests:
        raise ScenarioError(f"{name}: at least one [[request]] table is needed")
    requests = tuple(_request_kind(name, index, raw) for index, raw in enumerate(raw_requests))
    records = _int(name, "records", document.get("records", 2000), low=1, high=1_000_000)
    tickers = document.get("tickers", list(Scenario.tickers))
    if not isinstance(tickers, list) or not tickers or not all(isinstance(t, str) and t for t in tickers):
        raise ScenarioError(f"{name}: tickers must be a non-empty list of strings")
    value_range = _pair(name, "position_value", document.get("position_value", [1000.0, 5_000_000.0]))
    if not 0 < value_range[0] <= value_range[1] <= 1_000_000_000:
        raise ScenarioError(f"{name}: position_value must be within (0, 1e9] and ordered")
    days = _pair(name, "loan_days", document.get("loan_days", [1, 365]))
    if not (1 <= days[0] <= days[1] <= 365) or days != (int(days[0]), int(days[1])):
        raise ScenarioError(f"{name}: loan_days must be whole days within 1-365 and ordered")
    background = None
    if "background" in document:
        background = _request_kind(name, -1, document["background"])
        if background.kind != "batch":
            raise ScenarioError(f'{name}: background: only kind = "batch" runs in the background')
    return Scenario(
        background=background,
        name=name,
        description=str(document.get("description", "")),
        requests=requests,
        expect_status=frozenset(_statuses(name, "expect_status", document.get("expect_status", [200]))),
        require_status=frozenset(_statuses(name, "require_status", document.get("require_status", []))),
        records=records,
        seed=_int(name, "seed", document.get("seed", 1), low=0, high=2**31),
        tickers=tuple(tickers),
        position_value=(float(value_range[0]), float(value_range[1])),
        loan_days=(int(days[0]), int(days[1])),
    )


def _request_kind(name: str, index: int, raw: Any) -> RequestKind:
    where = f"{name}: request {index + 1}" if index >= 0 else f"{name}: background"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a table")
    unknown = sorted(set(raw) - {"kind", "weight", "positions", "format"})
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {unknown}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ScenarioError(f"{where}: kind must be one of {', '.join(KINDS)}")
    weight = _int(where, "weight", raw.get("weight", 1), low=1, high=1_000_000)
    positions = 0
    fmt = "json"
    if kind == "batch":
        positions = _int(where, "positions", raw.get("positions", 100), low=1, high=1_000_000)
        fmt = raw.get("format", "json")
        if fmt not in ("json", "msgpack"):
            raise ScenarioError(f"{where}: format must be json or msgpack")
    elif "positions" in raw or "format" in raw:
        raise ScenarioError(f"{where}: positions and format apply to batch requests only")
    return RequestKind(kind=kind, weight=weight, positions=positions, format=fmt)


def _int(where: str, key: str, value: Any, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ScenarioError(f"{where}: {key} must be an integer within {low}-{high}")
    return value


def _pair(where: str, key: str, value: Any) -> tuple[float, float]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ScenarioError(f"{where}: {key} must be [low, high]")
    return (value[0], value[1])


def _statuses(where: str, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and 100 <= v <= 599 for v in value):
        raise ScenarioError(f"{where}: {key} must be a list of HTTP status codes")
    return list(value)


# ---- keys -----------------------------------------------------------------------------------------------


def load_keys(
    keys_file: str | None, environ: Mapping[str, str] | None = None, default_client: str = "demo_client"
) -> list[ApiKey]:
    """The key pool: a keys file (lines `client_id key`, or `NAME=key` as the engine's demo keys file
    writes, `DEMO_CLIENT_KEY` meaning `demo_client`), else `PRICER_API_KEY` (+ `PRICER_CLIENT_ID`)."""
    env = os.environ if environ is None else environ
    keys: list[ApiKey] = []
    if keys_file:
        for number, line in enumerate(Path(keys_file).read_text().splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if "=" in text and " " not in text:
                name, _, value = text.partition("=")
                if name == "DEMO_CLIENT_KEY":
                    keys.append(ApiKey(default_client, value))
                continue  # other NAME=value lines (admin key, URL) are not quote keys
            parts = text.split()
            if len(parts) != 2 or not parts[1].startswith("bre_"):
                raise ScenarioError(f"{keys_file}:{number}: expected `client_id key`")
            keys.append(ApiKey(parts[0], parts[1]))
    elif env.get("PRICER_API_KEY"):
        keys.append(ApiKey(env.get("PRICER_CLIENT_ID", default_client), env["PRICER_API_KEY"]))
    if not keys:
        raise ScenarioError("no API key: pass --keys-file or set PRICER_API_KEY (and PRICER_CLIENT_ID)")
    return keys


# ---- requests -------------------------------------------------------------------------------------------


def kind_sequence(scenario: Scenario, count: int) -> list[RequestKind]:
    """`count` request kinds in the scenario's proportions (largest remainder), shuffled by its seed."""
    total = sum(kind.weight for kind in scenario.requests)
    shares = [kind.weight * count / total for kind in scenario.requests]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
    for index in by_remainder[: count - sum(counts)]:
        counts[index] += 1
    sequence = [kind for kind, n in zip(scenario.requests, counts, strict=True) for _ in range(n)]
    random.Random(scenario.seed).shuffle(sequence)
    return sequence


def record_count(scenario: Scenario) -> int:
    """Distinct requests to generate: fewer for big batches (each one is large)."""
    largest = max((kind.positions for kind in scenario.requests), default=0)
    if largest >= 1000:
        return max(len(scenario.requests), min(scenario.records, 8))
    return scenario.records


def build_requests(scenario: Scenario, keys: Sequence[ApiKey], host: str) -> list[bytes]:
    rng = random.Random(scenario.seed)
    out = []
    for number, kind in enumerate(kind_sequence(scenario, record_count(scenario))):
        key = keys[number % len(keys)]
        out.append(build_request(kind, scenario, key, host, rng))
    return out


def build_background(scenario: Scenario, keys: Sequence[ApiKey], host: str) -> bytes | None:
    """The raw request of the scenario's background batch (None without one)."""
    if scenario.background is None:
        return None
    return build_request(scenario.background, scenario, keys[0], host, random.Random(scenario.seed + 1))


def _value(rng: random.Random, scenario: Scenario) -> float:
    low, high = scenario.position_value
    return round(rng.uniform(low, high), 2)


def _position(rng: random.Random, scenario: Scenario, client_id: str) -> dict[str, Any]:
    return {
        "ticker": rng.choice(scenario.tickers),
        "position_value": _value(rng, scenario),
        "loan_days": rng.randint(*scenario.loan_days),
        "client_id": client_id,
    }


def build_request(kind: RequestKind, scenario: Scenario, key: ApiKey, host: str, rng: random.Random) -> bytes:
    headers = {"Host": host, "X-API-Key": key.key}
    if kind.kind == "quote-post":
        body = json.dumps(_position(rng, scenario, key.client_id)).encode()
        return raw_request("POST", QUOTE_PATH, headers, body, "application/json")
    if kind.kind == "quote-get":
        query = urllib.parse.urlencode(_position(rng, scenario, key.client_id))
        return raw_request("GET", f"{QUOTE_PATH}?{query}", headers)
    if kind.kind == "rate":
        ticker = urllib.parse.quote(rng.choice(scenario.tickers), safe="")
        return raw_request("GET", f"/api/v1/rates/{ticker}", headers)
    if kind.kind == "rates":
        tickers = ",".join(scenario.tickers)
        return raw_request("GET", "/api/v1/rates?" + urllib.parse.urlencode({"tickers": tickers}), headers)
    document = {
        "client_id": key.client_id,
        "positions": [
            {k: v for k, v in _position(rng, scenario, key.client_id).items() if k != "client_id"}
            for _ in range(kind.positions)
        ],
    }
    if kind.format == "msgpack":
        headers["Accept"] = "application/msgpack"
        return raw_request(
            "POST", f"{QUOTE_PATH}/batch", headers, msgspec.msgpack.encode(document), "application/msgpack"
        )
    return raw_request(
        "POST", f"{QUOTE_PATH}/batch", headers, json.dumps(document).encode(), "application/json"
    )


def raw_request(
    method: str, target: str, headers: Mapping[str, str], body: bytes = b"", content_type: str | None = None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def write_requests_file(requests: Sequence[bytes], path: Path) -> None:
    """The generator's input: each request prefixed by its length (4 bytes, little-endian)."""
    with path.open("wb") as file:
        for request in requests:
            file.write(struct.pack("<I", len(request)))
            file.write(request)


def read_requests_file(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ScenarioError(f"{path}: truncated length prefix")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise ScenarioError(f"{path}: truncated request")
        out.append(data[offset : offset + length])
        offset += length
    return out
