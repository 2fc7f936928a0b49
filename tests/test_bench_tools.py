"""The pure helpers of the benchmark scripts: wrk output parsing, ratios, medians, report rendering."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_tools_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


bench_http = _load("bench_http")
run = _load("run")

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:40000/api/v1/calculate-locate
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.21ms  850.00us  1.20s    85.12%
    Req/Sec    10.01k   500.00    11.00k    70.00%
  Latency Distribution
     50%    1.23ms
     75%  850.00us
     90%    1.2s
     99%    2.00m
  100123 requests in 10.00s, 70.00MB read
Requests/sec:  10012.34
Transfer/sec:      7.00MB
wrk_quote: responses=100123 non2xx=0 connect=0 read=0 write=0 timeout=0 status_errors=0
"""

WRK_OUTPUT_WITH_ERRORS = """\
Running 2s test @ http://127.0.0.1:40000/api/v1/calculate-locate
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.00ms  504.36us  11.59ms   95.10%
    Req/Sec     4.04k   119.04     4.14k    90.48%
  Latency Distribution
     50%    1.97ms
     75%    2.04ms
     90%    2.15ms
     99%    3.33ms
  8433 requests in 2.10s, 4.18MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 4217
Requests/sec:   4016.23
Transfer/sec:      1.99MB
"""

WRK2_OUTPUT = """\
  Latency Distribution (HdrHistogram - Recorded Latency)
 50.000%    1.02ms
 75.000%    1.50ms
 90.000%    2.00ms
 99.000%    4.10ms
 99.900%    9.00ms
  Detailed Percentile spectrum:
       Value   Percentile   TotalCount 1/(1-Percentile)
       0.500     0.000000            1         1.00
  60000 requests in 10.00s, 40.00MB read
Requests/sec:   5999.50
"""


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("1.23ms", 1.23),
        ("850.00us", 0.85),
        ("1.2s", 1200.0),
        ("2.00m", 120_000.0),
        ("1.00h", 3_600_000.0),
        ("  42us ", 0.042),
    ],
)
def test_parse_time_units(text: str, expected_ms: float) -> None:
    assert bench_http.parse_time_ms(text) == pytest.approx(expected_ms)


@pytest.mark.parametrize("text", ["", "1.2", "ms", "1.2 parsecs", "-1ms"])
def test_parse_time_rejects_non_durations(text: str) -> None:
    with pytest.raises(ValueError):
        bench_http.parse_time_ms(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("10.01k", 10_010.0), ("500.00", 500.0), ("1.5M", 1_500_000.0), ("2G", 2e9)]
)
def test_parse_metric(text: str, expected: float) -> None:
    assert bench_http.parse_metric(text) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10.0), ("2m", 120.0), ("500ms", 0.5), ("7", 7.0)])
def test_parse_duration_arg(text: str, seconds: float) -> None:
    assert bench_http.parse_duration_arg(text) == pytest.approx(seconds)


def test_parse_wrk_output() -> None:
    result = bench_http.parse_wrk_output(WRK_OUTPUT)
    assert result.requests_per_sec == pytest.approx(10012.34)
    assert result.total_requests == 100123
    assert result.duration_s == pytest.approx(10.0)
    assert result.latency_ms == pytest.approx({50: 1.23, 75: 0.85, 90: 1200.0, 99: 120_000.0})
    assert result.latency_avg_ms == pytest.approx(3.21)
    assert result.latency_stdev_ms == pytest.approx(0.85)
    assert result.latency_max_ms == pytest.approx(1200.0)
    assert result.lua["responses"] == 100123
    assert result.non_2xx == 0
    assert result.errors == 0
    assert result.valid


def test_parse_wrk_output_errors_make_the_run_invalid() -> None:
    result = bench_http.parse_wrk_output(WRK_OUTPUT_WITH_ERRORS)
    assert result.requests_per_sec == pytest.approx(4016.23)
    assert result.duration_s == pytest.approx(2.1)
    assert result.non_2xx_3xx == 4217
    assert result.non_2xx == 4217  # no Lua line: wrk's own count
    assert result.socket_errors == {"connect": 1, "read": 2, "write": 3, "timeout": 4}
    assert result.errors == 4217 + 10
    assert not result.valid


def test_lua_count_takes_precedence_over_wrk_count() -> None:
    # wrk counts only status > 399; the script counts every non-2xx (a 302 included).
    text = WRK_OUTPUT.replace("non2xx=0", "non2xx=3")
    result = bench_http.parse_wrk_output(text)
    assert result.non_2xx_3xx == 0
    assert result.non_2xx == 3
    assert not result.valid


def test_parse_wrk2_percentiles_ignores_the_spectrum() -> None:
    result = bench_http.parse_wrk_output(WRK2_OUTPUT)
    assert result.latency_ms == pytest.approx({50: 1.02, 75: 1.5, 90: 2.0, 99: 4.1})
    assert result.requests_per_sec == pytest.approx(5999.5)


def test_parse_wrk_output_without_a_rate_is_an_error() -> None:
    with pytest.raises(ValueError, match="Requests/sec"):
        bench_http.parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_zero_requests_is_not_valid() -> None:
    text = WRK_OUTPUT.replace("100123 requests", "0 requests")
    assert not bench_http.parse_wrk_output(text).valid


def test_ratio() -> None:
    assert bench_http.ratio(30.0, 10.0) == pytest.approx(3.0)
    assert bench_http.ratio(1.0, 4.0) == pytest.approx(0.25)
    assert bench_http.ratio(None, 4.0) is None
    assert bench_http.ratio(4.0, None) is None
    assert bench_http.ratio(4.0, 0.0) is None


def test_median_or_none() -> None:
    assert bench_http.median_or_none([3.0, 1.0, 2.0]) == 2.0
    assert bench_http.median_or_none([1.0, None, 3.0]) == 2.0
    assert bench_http.median_or_none([None]) is None
    assert bench_http.median_or_none([]) is None


def test_cpu_percent() -> None:
    assert bench_http.cpu_percent(5.0, 10.0) == pytest.approx(50.0)
    assert bench_http.cpu_percent(1.0, 0.0) is None


def test_parse_proc_stat_cpu_handles_spaces_in_the_command() -> None:
    fields = ["S", *["0"] * 10, "250", "50", *["0"] * 20]
    stat = "1234 (python -m pricer) " + " ".join(fields)
    assert bench_http.parse_proc_stat_cpu(stat, 100) == pytest.approx(3.0)


def _run(rps: float, p50: float, p99: float, *, wrk_cpu: float = 20.0, errors: int = 0) -> dict[str, object]:
    return {
        "requests_per_sec": rps,
        "latency_ms": {"p50": p50, "p75": p50, "p90": p99, "p99": p99},
        "server_cpu_percent": 99.0,
        "wrk_cpu_percent": wrk_cpu,
        "errors": errors,
    }


def test_summarize_runs_takes_medians() -> None:
    summary = bench_http.summarize_runs(
        [_run(100.0, 1.0, 5.0, wrk_cpu=10.0), _run(300.0, 3.0, 7.0, wrk_cpu=30.0), _run(200.0, 2.0, 9.0)]
    )
    assert summary["rounds"] == 3
    assert summary["requests_per_sec"] == 200.0
    assert summary["latency_ms"]["p50"] == 2.0
    assert summary["latency_ms"]["p99"] == 7.0
    assert summary["wrk_cpu_percent"] == 20.0
    assert summary["max_wrk_cpu_percent"] == 30.0
    assert summary["errors"] == 0


def test_compare_and_per_round_ratios() -> None:
    engine_runs = [_run(400.0, 1.0, 4.0), _run(600.0, 1.0, 4.0)]
    baseline_runs = [_run(100.0, 2.0, 8.0), _run(300.0, 2.0, 8.0)]
    comparison = bench_http.compare(
        bench_http.summarize_runs(engine_runs), bench_http.summarize_runs(baseline_runs)
    )
    assert comparison["throughput_ratio"] == pytest.approx(2.5)  # medians 500 / 200
    assert comparison["latency_ratio"]["p50"] == pytest.approx(0.5)
    assert comparison["latency_ratio"]["p99"] == pytest.approx(0.5)
    assert bench_http.per_round_ratios(engine_runs, baseline_runs) == pytest.approx([4.0, 2.0])


def test_figures_mismatch() -> None:
    quote = {
        "status": "success",
        "ticker": "AAPL",
        "client_id": "demo_client",
        "position_value": 100000.0,
        "loan_days": 30,
        "fee_schedule": {"markup_percentage": 5.0},
        "total_fee": 456.51,
        "breakdown": {"borrow_cost": 410.96, "markup": 20.55, "transaction_fees": 25.0},
        "borrow_rate_used": 0.05,
        "quote_id": "a",
        "rate": {"base_rate": 0.05, "borrow_status": "EASY", "as_of": "x"},
    }
    other = {**quote, "quote_id": "b", "rate": {**quote["rate"], "as_of": "y"}}  # type: ignore[dict-item]
    assert bench_http.figures_mismatch(quote, other) == []
    wrong = {**other, "total_fee": 456.52, "rate": {**other["rate"], "borrow_status": "HARD"}}
    problems = bench_http.figures_mismatch(quote, wrong)
    assert len(problems) == 2
    assert problems[0].startswith("total_fee")
    assert problems[1].startswith("rate.borrow_status")


def test_format_helpers() -> None:
    assert bench_http.format_ratio(1.234) == "1.23x"
    assert bench_http.format_ratio(None) == "n/a"
    assert bench_http.format_number(None) == "n/a"
    assert bench_http.format_number(1234.56) == "1235"


def test_report_ratio_rows_from_pricing_results() -> None:
    rows = run.flatten_numbers({"a": {"speedup": 12.5, "n": 3, "label": "x"}, "b": [1.5, {"ratio": 2.0}]})
    assert ("a.speedup", 12.5) in rows
    assert ("a.n", 3) in rows
    assert ("b[0]", 1.5) in rows
    assert ("b[1].ratio", 2.0) in rows
    assert all(name != "a.label" for name, _ in rows)


def test_parse_cpu_list() -> None:
    assert bench_http.parse_cpu_list("0") == [0]
    assert bench_http.parse_cpu_list("0,2") == [0, 2]
    assert bench_http.parse_cpu_list("1-3,5") == [1, 2, 3, 5]
    assert bench_http.parse_cpu_list("") == []


def test_busy_percent_from_proc_stat() -> None:
    before = bench_http.parse_proc_stat_cpus(
        "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 5 0 5 40 0 0 0 0 0 0\nintr 1 2\n"
    )
    after = bench_http.parse_proc_stat_cpus(
        "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 95 0 5 50 0 0 0 0 0 0\ncpu1 10 0 5 125 10 0 0 0 0 0\n"
    )
    assert before == {0: (10, 50), 1: (10, 50)}
    assert bench_http.busy_percent(before, after, [0]) == pytest.approx(90.0)  # 90 of 100 jiffies
    assert bench_http.busy_percent(before, after, [1]) == pytest.approx(5.0)  # iowait is not busy
    assert bench_http.busy_percent(before, after, [0, 1]) == pytest.approx(47.5)
    assert bench_http.busy_percent(before, after, [7]) is None


def test_display_command_hides_paths_and_ports() -> None:
    command = [
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        "-s",
        str(bench_http.LUA_SCRIPT),
        "http://127.0.0.1:40123/api/v1/calculate-locate",
    ]
    assert bench_http.display_command(command) == (
        "taskset -c 1 wrk -t1 -s benchmarks/wrk_quote.lua http://127.0.0.1:<port>/api/v1/calculate-locate"
    )


def test_markdown_table_skips_nested_values() -> None:
    lines = run.markdown_table([{"size": 1000, "ms": 0.5, "by": {"x": 1}}, {"size": 2000, "ms": 12.25}])
    assert lines[0] == "| size | ms |"
    assert lines[2] == "| 1,000 | 0.5 |"
    assert lines[3] == "| 2,000 | 12.2 |"


def test_http_section_renders_ratios() -> None:
    engine = bench_http.summarize_runs([_run(500.0, 1.0, 4.0)])
    baseline = bench_http.summarize_runs([_run(250.0, 2.0, 8.0)])
    document = {
        "valid": True,
        "settings": {
            "request_bodies": [{}],
            "server_cpu": "0",
            "wrk_cpu": "1",
            "duration": "10s",
            "warmup": "3s",
            "rounds": 1,
        },
        "summary": {
            "loads": {
                "throughput": {
                    "label": "throughput (c=32)",
                    "engine": engine,
                    "baseline": baseline,
                    "engine_vs_baseline": bench_http.compare(engine, baseline),
                    "per_round_ratio": [2.0],
                }
            }
        },
        "runs": [{"load": "throughput", "command": "taskset -c 1 wrk -c32"}],
        "notes": ["a note"],
    }
    text = "\n".join(run.http_section(document, [], None))
    assert "throughput engine/baseline **2.00×**" in text
    assert "p50 0.50×" in text
    assert "- a note" in text
    assert "taskset -c 1 wrk -c32" in text
    assert "INVALID" not in text
