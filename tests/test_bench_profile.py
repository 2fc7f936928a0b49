"""The pure helpers of benchmarks/profile_single.py: py-spy stacks in, the per-layer table out."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_profile_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


profile = _load("profile_single")
run = _load("run")

ROOT_FRAMES = (
    "_run_module_as_main (<frozen runpy>:198);_run_code (<frozen runpy>:88);<module> (pricer/__main__.py:5);"
    "main (pricer/cli.py:108);serve_one (pricer/server.py:521);Server.run (uvicorn/server.py:86);"
    "asyncio_run (uvicorn/_compat.py:30);Runner.run (asyncio/runners.py:118)"
)
CHAIN = (
    ROOT_FRAMES + ";RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:420);"
    "PricerApp.__call__ (pricer/app.py:108);"
    "RequestContext.__call__ (pricer/middleware/request_context.py:56);"
    "RequestTelemetry.__call__ (pricer/middleware/telemetry.py:40);"
    "ErrorEnvelope.__call__ (pricer/middleware/errors.py:123)"
)
ENDPOINT = (
    CHAIN + ";Dispatch.__call__ (pricer/middleware/route_match.py:74);"
    "asgi_endpoint.<locals>.app (pricer/routing.py:41);"
    "QuoteEndpoints.calculate_locate (pricer/endpoints/quotes.py:64)"
)
# A collapsed-stacks profile as py-spy writes it (--format raw): one stack per line, its sample count last.
RAW = "\n".join(
    [
        f"{ROOT_FRAMES} 10",  # the loop's own C code: no frame of a request
        # socket write: uvicorn's send below our send wrapper
        f"{ENDPOINT.rsplit(';', 1)[0]};EncodedResponse.__call__ (pricer/endpoints/common.py:31);"
        "RequestContext.__call__.<locals>.send_with_headers (pricer/middleware/request_context.py:54);"
        "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:522) 30",
        # our send wrapper's own time
        f"{ENDPOINT.rsplit(';', 1)[0]};EncodedResponse.__call__ (pricer/endpoints/common.py:31);"
        "RequestContext.__call__.<locals>.send_with_headers (pricer/middleware/request_context.py:50) 5",
        # NumPy's Python code below the core counts for the core
        f"{ENDPOINT};Quoter.price (pricer/quoting.py:151);price_locates (pricer/pricing/core.py:251);"
        "full (numpy/_core/numeric.py:386) 20",
        # hmac below the key check counts for it, not for the authentication middleware
        f"{CHAIN};Authentication.__call__ (pricer/middleware/authentication.py:54);"
        "KeyVerifier.verify (pricer/auth/keys.py:107);KeyHasher.hash (pricer/auth/keys.py:64);"
        "new (hmac.py:184);HMAC.__init__ (hmac.py:60) 15",
        # a middleware no rule names (renamed, or new): middleware (other)
        f"{CHAIN};FusedGate.__call__ (pricer/middleware/fused_gate.py:12) 7",
        # a call into C seen as time of the calling line: the line's text decides
        f"{ENDPOINT.rsplit(';', 1)[0]};QuoteEndpoints.calculate_locate (pricer/endpoints/quotes.py:78);"
        "json_response (pricer/endpoints/common.py:36) 6",
        f"{ENDPOINT.rsplit(';', 1)[0]};QuoteEndpoints.calculate_locate (pricer/endpoints/quotes.py:67) 4",
        f"{ENDPOINT.rsplit(';', 1)[0]};QuoteEndpoints.calculate_locate (pricer/endpoints/quotes.py:60) 3",
        "not a stack line",
        "",
    ]
)
SOURCE = {
    (
        "pricer/endpoints/common.py",
        36,
    ): '    return EncodedResponse(_encoder.encode(body), status, b"application/json")',
    ("pricer/endpoints/quotes.py", 67): "            position_cents=np.array([cents], dtype=np.int64),",
    (
        "pricer/endpoints/quotes.py",
        60,
    ): "        principal = await acting_principal(request.scope, quote.client_id)",
}


def fake_source(file: str, line: int) -> str:
    return SOURCE.get((file, line), "")


def test_parse_collapsed_reads_frames_and_counts() -> None:
    stacks = profile.parse_collapsed(RAW)
    assert len(stacks) == 9  # the line without a count and the empty line are skipped
    frames, count = stacks[0]
    assert count == 10
    assert frames[0] == profile.Frame("_run_module_as_main", "<frozen runpy>", 198)
    assert frames[-1] == profile.Frame("Runner.run", "asyncio/runners.py", 118)
    assert profile.parse_frame("<module> (pricer/__main__.py:5)") == profile.Frame(
        "<module>", "pricer/__main__.py", 5
    )
    nested = profile.parse_frame("RequestContext.__call__.<locals>.send_with_headers (pricer/x.py:54)")
    assert nested == profile.Frame("RequestContext.__call__.<locals>.send_with_headers", "pricer/x.py", 54)
    assert profile.parse_frame("idle") == profile.Frame("idle", "", 0)


def test_each_sample_counts_for_its_deepest_layer() -> None:
    counts = profile.attribute_layers(profile.parse_collapsed(RAW), profile.LAYER_RULES, fake_source)
    assert counts == {
        profile.EVENT_LOOP: 10,
        profile.PROTOCOL: 30,
        profile.RESPONSE_HEADERS: 5,
        "pricing core (NumPy)": 20,
        "key verification": 15,
        profile.MIDDLEWARE_OTHER: 7,
        profile.JSON_ENCODING: 6,
        profile.NUMPY_OUTSIDE_CORE: 4,
        "endpoint handler": 3,
    }


@pytest.mark.parametrize(
    ("frame", "layer"),
    [
        # The modules of the refactors under way (issue 13) have their rows; renamed or new ones fall back.
        ("RequestEdge.__call__ (pricer/middleware/edge.py:95)", profile.REQUEST_EDGE),
        ("_Response.send (pricer/middleware/edge.py:64)", profile.RESPONSE_HEADERS),
        ("Admit.__call__ (pricer/middleware/admission.py:18)", "admission"),
        ("Admission.admit (pricer/auth/admission.py:51)", "admission"),
        ("KeyVerifier.verify (pricer/auth/keys.py:107)", "key verification"),
        ("rate_limit_headers (pricer/ratelimit/limits.py:129)", profile.RESPONSE_HEADERS),
        ("ClientLimits.charge (pricer/ratelimit/limits.py:75)", "rate limit"),
        ("GuardedHttpToolsProtocol.data_received (pricer/protocol.py:117)", profile.PROTOCOL),
        ("DrainingServer.serve (pricer/draining.py:40)", profile.EVENT_LOOP),
        ("quote_body (pricer/endpoints/views.py:20)", profile.HTTP_SHAPES),
        ("api_routes.<locals>.quote (pricer/routes.py:60)", "dispatch"),
        ("Gate.__call__ (pricer/middleware/gate.py:3)", profile.MIDDLEWARE_OTHER),
        ("helper (pricer/something_new.py:3)", profile.ENGINE_OTHER),
        ("full (numpy/_core/numeric.py:386)", None),
    ],
)
def test_frames_of_each_module_find_their_layer(frame: str, layer: str | None) -> None:
    assert profile.frame_layer(profile.parse_frame(frame), profile.LAYER_RULES) == layer


def test_source_rules_need_the_line_text() -> None:
    """Without the source text, calls into C fall back to their function's layer."""
    counts = profile.attribute_layers(profile.parse_collapsed(RAW), profile.LAYER_RULES)
    assert counts["endpoint handler"] == 3 + 4  # the np.array line is the handler's own time then
    assert counts[profile.JSON_ENCODING] == 6  # json_response is named by its function as well
    assert profile.NUMPY_OUTSIDE_CORE not in counts


def test_a_stack_without_a_frame_of_ours_is_named_so() -> None:
    frames = (profile.Frame("worker", "threading.py", 10), profile.Frame("run", "queue.py", 3))
    assert profile.stack_layer(frames, profile.LAYER_RULES) == profile.NO_FRAME_OF_OURS


def test_rules_match_file_function_and_source() -> None:
    rules = (
        profile.LayerRule("encode", "pkg/", source=r"encode\("),
        profile.LayerRule("wrapper", "pkg/mw/", function=r"<locals>\.send"),
        profile.LayerRule("mw", "pkg/mw/"),
    )
    source = {("pkg/mw/a.py", 3): "x = enc.encode(y)"}.get

    def line(file: str, number: int) -> str:
        return source((file, number), "")

    assert profile.frame_layer(profile.Frame("A.__call__", "pkg/mw/a.py", 3), rules, line) == "encode"
    assert profile.frame_layer(profile.Frame("A.__call__", "pkg/mw/a.py", 4), rules, line) == "mw"
    assert (
        profile.frame_layer(profile.Frame("A.__call__.<locals>.send_x", "pkg/mw/a.py", 9), rules) == "wrapper"
    )
    assert profile.frame_layer(profile.Frame("f", "other/b.py", 1), rules) is None


def test_layer_table_divides_the_cpu_per_quote_by_share() -> None:
    counts = {profile.PROTOCOL: 30, "pricing core (NumPy)": 60, "a layer nobody foresaw": 10}
    rows = profile.layer_table(counts, 200.0)
    assert [row["layer"] for row in rows] == [
        profile.PROTOCOL,
        "pricing core (NumPy)",
        "a layer nobody foresaw",
    ]
    assert [row["us_per_quote"] for row in rows] == [60.0, 120.0, 20.0]
    assert [row["share_percent"] for row in rows] == [30.0, 60.0, 10.0]
    assert sum(row["us_per_quote"] for row in rows) == pytest.approx(200.0)
    # binomial standard error of a 30 % share of 100 samples: sqrt(0.3 * 0.7 / 100) of 200 µs
    assert rows[0]["sampling_error_us"] == pytest.approx(200.0 * (0.3 * 0.7 / 100) ** 0.5, abs=0.01)
    assert "before_us_per_quote" not in rows[0]
    assert profile.layer_table({}, 200.0) == []


def test_layer_table_with_a_before_run() -> None:
    before = {profile.PROTOCOL: 50.0, "rate limit": 12.5, "pricing core (NumPy)": 100.0}
    rows = profile.layer_table({profile.PROTOCOL: 1, "pricing core (NumPy)": 3}, 80.0, before=before)
    by_layer = {row["layer"]: row for row in rows}
    assert by_layer[profile.PROTOCOL]["us_per_quote"] == 20.0
    assert by_layer[profile.PROTOCOL]["change_us"] == -30.0
    assert by_layer["pricing core (NumPy)"]["change_us"] == -40.0
    # A layer that went away keeps its row: 0 now, its before figure beside it.
    assert by_layer["rate limit"]["us_per_quote"] == 0
    assert by_layer["rate limit"]["change_us"] == -12.5
    # The request's order: protocol, rate limit, pricing.
    assert [row["layer"] for row in rows] == [profile.PROTOCOL, "rate limit", "pricing core (NumPy)"]
    saved = {"layers": rows}
    assert profile.before_figures(saved) == {
        profile.PROTOCOL: 20.0,
        "rate limit": 0.0,
        "pricing core (NumPy)": 60.0,
    }
    assert profile.before_figures(None) is None


def test_hotspots_name_the_deepest_frame_of_ours() -> None:
    stacks = profile.parse_collapsed(RAW)
    counts = profile.hotspot_counts(stacks)
    assert counts["price_locates (pricer/pricing/core.py)"] == 20  # numpy's frame below it is included
    assert counts["KeyHasher.hash (pricer/auth/keys.py)"] == 15  # hmac's too
    assert counts["RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py)"] == 30
    assert counts[profile.EVENT_LOOP_HOTSPOT] == 10
    assert counts["QuoteEndpoints.calculate_locate (pricer/endpoints/quotes.py)"] == 7
    lines = profile.hotspot_counts(stacks, by_line=True)
    assert lines["QuoteEndpoints.calculate_locate (pricer/endpoints/quotes.py:67)"] == 4
    table = profile.hotspot_table(counts, 100.0, top=2)
    assert [row["function"] for row in table] == [
        "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py)",
        "price_locates (pricer/pricing/core.py)",
    ]
    assert table[0]["us_per_quote"] == pytest.approx(100.0 * 30 / 100)


def test_source_line_reads_the_profiled_code() -> None:
    core = Path(__file__).resolve().parent.parent / "src" / "pricer" / "pricing" / "core.py"
    first = core.read_text().splitlines()[0]
    assert profile.source_line("pricer/pricing/core.py", 1).rstrip("\n") == first
    assert profile.source_line("no_such_package_xyz/a.py", 1) == ""


def _document(before: dict[str, object] | None) -> dict[str, object]:
    counts = {profile.PROTOCOL: 25, "pricing core (NumPy)": 75}
    return {
        "valid": True,
        "settings": {
            "server_cpu": "0",
            "wrk_cpu": "1",
            "connections": 32,
            "rounds": 2,
            "py_spy_rate_hz": 100,
        },
        "samples": 100,
        "cpu_us_per_quote": 80.0,
        "layers": profile.layer_table(counts, 80.0, before=profile.before_figures(before)),
        "hotspots": profile.hotspot_table({"price_locates (pricer/pricing/core.py)": 3}, 80.0),
        "before": None
        if before is None
        else {"cpu_us_per_quote": before["cpu_us_per_quote"], "git_commit": "abc"},
    }


def test_report_section_shows_before_and_after() -> None:
    before = {
        "cpu_us_per_quote": 200.0,
        "layers": [
            {"layer": profile.PROTOCOL, "us_per_quote": 50.0},
            {"layer": "pricing core (NumPy)", "us_per_quote": 150.0},
        ],
    }
    text = "\n".join(run.profile_section(_document(before), ["python", "benchmarks/profile_single.py"], None))
    assert "## Where a single quote's microseconds go" in text
    assert "| layer | before µs per quote | µs per quote | share | change µs |" in text
    assert f"| {profile.PROTOCOL} | 50.0 | 20.0 ± 3.5 | 25.0 % | -30.0 |" in text
    assert "| pricing core (NumPy) | 150.0 | 60.0 ± 3.5 | 75.0 % | -90.0 |" in text
    assert "| **total (server CPU per quote)** | **200.0** | **80.0** | 100 % | -120.0 |" in text
    assert "`price_locates (pricer/pricing/core.py)`" in text
    assert "python benchmarks/profile_single.py" in text


def test_report_section_without_before_and_with_an_error() -> None:
    text = "\n".join(run.profile_section(_document(None), [], None))
    assert "| layer | µs per quote | share |" in text
    assert f"| {profile.PROTOCOL} | 20.0 ± 3.5 | 25.0 % |" in text
    failed = "\n".join(run.profile_section(None, [], "profile_single.py exited with status 2"))
    assert "**Problem:** profile_single.py exited with status 2." in failed
    assert "profile" in run.SECTIONS
    assert run.section_command("profile", Path("x.json"), quick=True)[-2:] == ["--rounds", "1"]
