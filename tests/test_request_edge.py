"""The request edge (issue 17): non-ASCII tickers, HEAD, Accept q-values, Content-Encoding."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from pricer.errors import DataFileError
from pricer.marketdata.loaders import parse_availability
from pricer.tickers import normalize_ticker
from tests.conftest import Engine, start_server, stop_server
from tests.test_loaders import LOADED_AT, synthetic_ibkr

pytestmark = pytest.mark.anyio

QUOTE = "/api/v1/calculate-locate"
BATCH = "/api/v1/calculate-locate/batch"
RATES = "/api/v1/rates"

# Each folds into an ASCII ticker under str.upper(): ß -> SS, ﬀ -> FF, ﬆ -> ST, ı -> I; and a Cyrillic А
# that looks like A. None is a ticker.
FOLDING = ["ß", "ﬀ", "ﬆ", "ı", "А", "aß", "ﬀ.b"]


def quote(**overrides: Any) -> dict[str, Any]:
    return {
        "ticker": "AAPL",
        "position_value": 100000,
        "loan_days": 30,
        "client_id": "demo_client",
        **overrides,
    }


def assert_invalid(response: Any, field: str, location: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER"
    assert body["validation_errors"][0]["field"] == field
    assert body["validation_errors"][0]["location"] == location


@pytest.mark.parametrize("raw", FOLDING)
def test_non_ascii_is_not_a_ticker(raw: str) -> None:
    assert normalize_ticker(raw) is None
    assert normalize_ticker(f" {raw} ") is None


@pytest.mark.parametrize("raw", FOLDING)
async def test_non_ascii_ticker_is_400_on_every_quote_entry(engine: Engine, raw: str) -> None:
    posted = await engine.client.post(QUOTE, json=quote(ticker=raw), headers=engine.as_client())
    assert_invalid(posted, "ticker", "body")
    got = await engine.client.get(QUOTE, params=quote(ticker=raw), headers=engine.as_client())
    assert_invalid(got, "ticker", "query")
    rows = [
        {"ticker": raw, "position_value": 10, "loan_days": 1},
        {"ticker": "AAPL", "position_value": 10, "loan_days": 1},
    ]
    batch = await engine.client.post(
        BATCH, json={"client_id": "demo_client", "positions": rows}, headers=engine.as_client()
    )
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert [q["index"] for q in body["quotes"]] == [1]
    assert [(e["index"], e["error_code"], e["field"]) for e in body["errors"]] == [
        (0, "INVALID_PARAMETER", "ticker")
    ]


@pytest.mark.parametrize("raw", FOLDING)
async def test_non_ascii_ticker_is_400_on_rates(engine: Engine, raw: str) -> None:
    single = await engine.client.get(f"{RATES}/{raw}", headers=engine.as_client())
    assert_invalid(single, "ticker", "path")
    listed = await engine.client.get(RATES, params={"tickers": f"{raw},AAPL"}, headers=engine.as_client())
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [rate["ticker"] for rate in body["rates"]] == ["AAPL"]
    assert [error["error_code"] for error in body["errors"]] == ["INVALID_PARAMETER"]


@pytest.mark.parametrize("raw", FOLDING)
async def test_non_ascii_ticker_is_400_on_admin_paths(engine: Engine, raw: str) -> None:
    stock = await engine.client.put(
        f"/api/v1/admin/stocks/{raw}",
        json={"min_borrow_rate": 0.01, "borrow_status": "EASY"},
        headers=engine.as_admin(),
    )
    assert_invalid(stock, "ticker", "path")
    events = await engine.client.put(
        f"/api/v1/admin/events/{raw}", json={"events": []}, headers=engine.as_admin()
    )
    assert_invalid(events, "ticker", "path")


def test_non_ascii_symbol_in_an_availability_file_is_a_damaged_row() -> None:
    """`ß` is refused like any other non-ticker symbol (`A$B`), not loaded as `SS`."""
    for symbol in ("ß", "ﬆ"):
        with pytest.raises(DataFileError) as caught:
            parse_availability(synthetic_ibkr([f"{symbol}|USD|N|1|X|0|1|1|"]), loaded_at=LOADED_AT)
        assert "line 3" in str(caught.value.args) + str(vars(caught.value)), vars(caught.value)


# ---- HEAD (item 3): HEAD answers as GET does, without a body; 405's Allow lists exactly what is answered


def quote_query() -> dict[str, str]:
    return {"ticker": "AAPL", "position_value": "100000", "loan_days": "30", "client_id": "demo_client"}


async def test_head_quote_answers_like_get(engine: Engine) -> None:
    got = await engine.client.get(QUOTE, params=quote_query(), headers=engine.as_client())
    head = await engine.client.head(QUOTE, params=quote_query(), headers=engine.as_client())
    assert got.status_code == 200, got.text
    assert head.status_code == 200, head.headers
    assert head.headers["content-type"] == got.headers["content-type"]
    bad = await engine.client.head(QUOTE, params={**quote_query(), "ticker": "ß"}, headers=engine.as_client())
    assert bad.status_code == 400  # validated as the GET form is, not as a body


async def test_allow_lists_head_only_where_head_is_answered(engine: Engine) -> None:
    for path, allowed in ((QUOTE, {"GET", "HEAD", "POST"}), ("/health", {"GET", "HEAD"}), (BATCH, {"POST"})):
        response = await engine.client.request("PATCH", path, headers=engine.as_client())
        assert response.status_code == 405, response.text
        listed = {method.strip() for method in response.headers["allow"].split(",")}
        assert listed == allowed, (path, listed)
        for method in listed - {"POST"}:
            answered = await engine.client.request(
                method, path, params=quote_query(), headers=engine.as_client()
            )
            assert answered.status_code == 200, (path, method, answered.headers)


def test_head_over_a_real_server_has_no_body(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        headers = {"X-API-Key": server.keys["DEMO_CLIENT_KEY"]}
        for path, params in (("/health", {}), (QUOTE, quote_query())):
            got = httpx.get(server.base_url + path, params=params, headers=headers, timeout=10)
            with socket.create_connection(
                ("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])), timeout=10
            ) as raw:
                target = str(httpx.URL(path, params=params))
                raw.sendall(
                    f"HEAD {target} HTTP/1.1\r\nHost: x\r\nX-API-Key: {headers['X-API-Key']}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                answer = b""
                while chunk := raw.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), (path, head)
            assert body == b"", (path, body)
            length = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            assert got.status_code == 200
            assert int(length.split(b":")[1]) > 0
    finally:
        stop_server(server)


# ---- Accept (item 4): media ranges with q-values, not a substring test

BATCH_ROWS = [{"ticker": "AAPL", "position_value": 10, "loan_days": 1}]


@pytest.mark.parametrize(
    ("accept", "body_msgpack", "answer_msgpack"),
    [
        ("application/json, application/msgpack;q=0", False, False),
        ("application/msgpack;q=0", False, False),
        ("application/msgpack;q=0, application/json;q=0.1", True, False),
        ("application/json;q=0.5, application/msgpack", False, True),
        ("application/json;q=0, */*", False, True),
        ("application/msgpack;q=0.9, application/json", False, False),
        ("application/json", True, False),
        ("application/x-msgpack", False, True),
        ("application/msgpack-like, application/json", False, False),
        ("text/plain, application/vnd.msgpack+json", False, False),
        ("application/msgpack;q=2, application/json;q=0.5", False, False),  # an invalid q is ignored
        ("*/*", False, False),
        ("*/*", True, True),
        (None, False, False),
        (None, True, True),
    ],
)
async def test_batch_accept_negotiation(
    engine: Engine, accept: str | None, body_msgpack: bool, answer_msgpack: bool
) -> None:
    payload = {"client_id": "demo_client", "positions": BATCH_ROWS}
    headers = {**engine.as_client(), **({"Accept": accept} if accept is not None else {})}
    if body_msgpack:
        headers["Content-Type"] = "application/msgpack"
        response = await engine.client.post(BATCH, content=msgspec.msgpack.encode(payload), headers=headers)
    else:
        response = await engine.client.post(BATCH, json=payload, headers=headers)
    assert response.status_code == 200, response.text
    expected = "application/msgpack" if answer_msgpack else "application/json"
    assert response.headers["content-type"] == expected, accept
    decode = msgspec.msgpack.decode if answer_msgpack else msgspec.json.decode
    assert decode(response.content)["priced"] == 1


# ---- Content-Encoding (item 5): 415 naming the header, never decoded


def concrete(path: str) -> str:
    """A route template with each parameter filled by a valid value."""
    values = {"ticker": "AAPL", "client_id": "demo_client", "key_id": "abcdefgh", "quote_id": "q1"}
    for name, value in values.items():
        path = path.replace(f"{{{name}}}", value)
    assert "{" not in path, path
    return path


async def test_every_route_with_a_body_refuses_an_encoded_body(engine: Engine) -> None:
    body = gzip.compress(msgspec.json.encode(quote()))
    checked = []
    for route in engine.app.routes:
        for method in sorted((route.methods or set()) - {"GET", "HEAD"}):
            path = concrete(route.path)
            for coding in ("gzip", "br", "deflate, identity", "GZIP"):
                response = await engine.client.request(
                    method,
                    path,
                    content=body,
                    headers={
                        **engine.as_admin(),
                        "Content-Type": "application/json",
                        "Content-Encoding": coding,
                    },
                )
                assert response.status_code == 415, (method, path, coding, response.text)
                answer = response.json()
                assert answer["error_code"] == "UNSUPPORTED_MEDIA_TYPE"
                assert "Content-Encoding" in answer["error"]
                assert answer["details"]["allowed"] == ["identity"]
            checked.append((method, route.path))
    assert ("POST", QUOTE) in checked
    assert ("POST", BATCH) in checked
    assert ("PUT", "/api/v1/admin/stocks/{ticker}") in checked


async def test_a_plain_body_labelled_br_is_415_and_identity_is_priced(engine: Engine) -> None:
    plain = msgspec.json.encode(quote())
    headers = {**engine.as_client(), "Content-Type": "application/json"}
    labelled = await engine.client.post(QUOTE, content=plain, headers={**headers, "Content-Encoding": "br"})
    assert labelled.status_code == 415, labelled.text
    assert labelled.json()["details"] == {"content_encoding": "br", "allowed": ["identity"]}
    gzipped = await engine.client.post(
        QUOTE, content=gzip.compress(plain), headers={**headers, "Content-Encoding": "gzip"}
    )
    assert gzipped.status_code == 415, gzipped.text
    assert gzipped.json()["details"] == {"content_encoding": "gzip", "allowed": ["identity"]}
    identity = await engine.client.post(
        QUOTE, content=plain, headers={**headers, "Content-Encoding": "identity"}
    )
    assert identity.status_code == 200, identity.text
    get = await engine.client.get(
        QUOTE, params=quote_query(), headers={**headers, "Content-Encoding": "gzip"}
    )
    assert get.status_code == 200, get.text  # no body, nothing encoded
