"""Helpers of tests/test_ops.py: where the ops/ artefacts are, what the contract allows, and small parsers.

The names here are the contract of DESIGN §4 and the runbook (shared/RUNBOOK.md): the metrics the engine
exports, the cluster metrics the alerts and dashboards may use besides, and the ConfigMap's variables.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
OPS = REPO / "ops"
K8S = OPS / "k8s"
PROMETHEUS = OPS / "prometheus"
GRAFANA = OPS / "grafana"
SHARED = REPO.parent / "shared"
DESIGN = SHARED / "DESIGN.md"
RUNBOOK = SHARED / "RUNBOOK.md"

NAMESPACE = "borrow-rate-engine"
APP = "api-gateway"

# --- metrics ------------------------------------------------------------------------------------------------
ENGINE_COUNTERS = frozenset(
    {
        "http_requests_total",
        "authentication_attempts_total",
        "rate_limit_exceeded_total",
        "backend_requests_total",
        "calculations_total",
        "fallback_usage_total",
        "cache_hits_total",
        "cache_misses_total",
        "jwt_tokens_issued_total",
    }
)
ENGINE_HISTOGRAMS = frozenset(
    {
        "http_request_duration_seconds",
        "backend_request_duration_seconds",
        "calculation_duration_seconds",
    }
)
ENGINE_SERIES = ENGINE_COUNTERS | {
    f"{name}{suffix}" for name in ENGINE_HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")
}
PROCESS_METRIC = re.compile(r"process_[a-z0-9_]+")
# cAdvisor (through the kubelet) and kube-state-metrics v2.
CLUSTER_METRICS = frozenset(
    {
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "kube_pod_container_resource_limits",
        "kube_pod_container_resource_requests",
        "kube_pod_container_status_restarts_total",
        "kube_pod_status_phase",
        "kube_deployment_status_replicas_available",
        "kube_horizontalpodautoscaler_status_current_replicas",
        "kube_horizontalpodautoscaler_status_desired_replicas",
        "kube_horizontalpodautoscaler_spec_min_replicas",
        "kube_horizontalpodautoscaler_spec_max_replicas",
    }
)


def is_engine_metric(name: str) -> bool:
    return name in ENGINE_SERIES or PROCESS_METRIC.fullmatch(name) is not None


def is_allowed_metric(name: str) -> bool:
    return is_engine_metric(name) or name in CLUSTER_METRICS


# --- environment --------------------------------------------------------------------------------------------
# DESIGN §4 "Environment", in its order (the standard OTEL_* variables are checked apart).
DESIGN_ENV_VARS = (
    "ENVIRONMENT",
    "LOG_LEVEL",
    "DATABASE_URL",
    "REDIS_URL",
    "JWT_SECRET_KEY",
    "RATE_LIMIT_PER_MINUTE",
    "CALCULATION_SERVICE_URL",
    "DATA_SERVICE_URL",
    "ENABLE_AUTHENTICATION",
    "ENABLE_RATE_LIMITING",
    "CORS_ORIGINS",
    "HOST",
    "PORT",
    "WORKERS",
    "API_KEY_PEPPER",
    "RATE_LIMIT_BURST",
    "POSITIONS_LIMIT_PER_MINUTE",
    "EXPECTED_REPLICAS",
    "MAX_BODY_BYTES",
    "MAX_BATCH_BODY_BYTES",
    "MAX_BATCH_SIZE",
    "SLOW_REQUEST_MS",
    "VOLATILITY_FACTOR",
    "VOLATILITY_THRESHOLD",
    "DEFAULT_VOLATILITY_INDEX",
    "EVENT_RISK_FACTOR",
    "EVENT_WINDOW_DAYS",
    "MIN_BORROW_RATE",
    "MAX_BORROW_RATE",
    "RATE_CACHE_TTL_SECONDS",
    "JWT_TTL_SECONDS",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "AUDIT_SPOOL_DIR",
    "SHUTDOWN_DRAIN_SECONDS",
    "MARKET_DATA_STALE_AFTER_HOURS",
    "BOOTSTRAP_ADMIN_KEY",
    "ROLE",
    "INTERNAL_SERVICE_SECRET",
    "BACKEND_TIMEOUT_SECONDS",
    "BACKEND_BATCH_TIMEOUT_SECONDS",
    "SOURCE_TIMEOUT_SECONDS",
    "SOURCE_MAX_AGE_SECONDS",
    "SOURCE_COLD_FETCH_MS",
    "SOURCE_MAX_CONCURRENCY",
)
# These live in the Secret api-gateway-secrets, never in the ConfigMap.
SECRET_ENV_VARS = frozenset(
    {
        "DATABASE_URL",
        "REDIS_URL",
        "JWT_SECRET_KEY",
        "API_KEY_PEPPER",
        "BOOTSTRAP_ADMIN_KEY",
        "INTERNAL_SERVICE_SECRET",
    }
)
# Engine variables beyond DESIGN's list that the ConfigMap sets for a cluster.
EXTRA_ENV_VARS = frozenset(
    {"SEED_DEMO_DATA", "DEMO_KEYS_FILE", "AUDIT_DURABILITY", "BATCH_WORKERS", "BATCH_INLINE_MAX_BYTES"}
)


def design_env_vars() -> list[str]:
    """The backticked variable names of DESIGN §4's "Environment" bullet."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## 4. Operations contract", 1)[1]
    bullet = section.split("- Environment:", 1)[1].split("\n- ", 1)[0]
    return re.findall(r"`([A-Z][A-Z0-9_]+)`", bullet)


# --- YAML and Kubernetes ------------------------------------------------------------------------------------
def load_yaml(path: pathlib.Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_yaml_documents(path: pathlib.Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def k8s_files() -> list[pathlib.Path]:
    return sorted(K8S.glob("*.yaml"))


def k8s_objects() -> Iterator[tuple[pathlib.Path, dict[str, Any]]]:
    for path in k8s_files():
        for doc in load_yaml_documents(path):
            if doc.get("kind") != "Kustomization":
                yield path, doc


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_objects() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in ops/k8s, found {len(found)}"
    return found[0]


def quantity_cpu_millis(value: str | int | float) -> int:
    text = str(value)
    return int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)


_BINARY_SUFFIXES = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def quantity_bytes(value: str | int) -> int:
    text = str(value)
    for suffix, factor in _BINARY_SUFFIXES.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


# --- PromQL -------------------------------------------------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "inf",
        "nan",
        "Inf",
        "NaN",
    }
)
# A label matcher block whose strings may hold braces (Grafana's "${var}").
_SELECTOR = re.compile(r'(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})?')


def promql_metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are neither functions, keywords, label names
    (in matchers and grouping clauses) nor parts of strings, durations or numbers."""
    text = _STRING.sub('""', expr)
    text = _RANGE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _GROUPING.sub("", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS}


def promql_selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matcher text) of each vector selector naming a metric; matcher text may be ''."""
    names = promql_metric_names(expr)
    return [(m.group(1), m.group(2) or "") for m in _SELECTOR.finditer(expr) if m.group(1) in names]


def grafana_to_promql(expr: str, variables: dict[str, str]) -> str:
    """A Grafana query with its variables replaced (each by its All value), so promtool can parse it."""
    builtins = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
    values = {**builtins, **variables}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values[name.split(":", 1)[0]]

    return re.sub(r"\$\{([\w:]+)\}|\$(\w+)", sub, expr)


# --- Grafana ------------------------------------------------------------------------------------------------
DASHBOARD_UIDS = ("api-gateway-overview", "api-gateway-detailed", "api-gateway-resources", "api-gateway-logs")


def dashboards() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(GRAFANA.glob("*.json")):
        board = json.loads(path.read_text(encoding="utf-8"))
        out[board["uid"]] = board
    return out


def all_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def datasource_type(board: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """prometheus or loki: a panel's or target's data source, resolved through the datasource variables."""
    assert ref is not None, "every panel and target names its data source"
    uid = ref.get("uid", "")
    match = re.fullmatch(r"\$\{?(\w+)\}?", uid)
    if match:
        var = next(v for v in board["templating"]["list"] if v["name"] == match.group(1))
        assert var["type"] == "datasource", f"{uid} is not a datasource variable"
        return str(var["query"])
    return str(ref["type"])


def prometheus_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every Prometheus panel target and query variable of a dashboard."""
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            ref = target.get("datasource") or panel.get("datasource")
            if datasource_type(board, ref) == "prometheus":
                yield f"{board['uid']} panel {panel['id']} {target['refId']}", target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query" and datasource_type(board, var.get("datasource")) == "prometheus":
            definition = var["definition"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
            assert match, f"{board['uid']} variable {var['name']}: expected label_values(selector, label)"
            yield f"{board['uid']} variable {var['name']}", match.group(1)


def loki_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            ref = target.get("datasource") or panel.get("datasource")
            if datasource_type(board, ref) == "loki":
                yield f"{board['uid']} panel {panel['id']} {target['refId']}", target["expr"]


# --- promtool -----------------------------------------------------------------------------------------------
PROMTOOL_MISSING = (
    "promtool is not on PATH: install it (Debian: apt-get install -y prometheus); "
    ".ci/run installs it when missing"
)


def promtool(*args: str | pathlib.Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe is not None, PROMTOOL_MISSING
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


# --- Dockerfile ---------------------------------------------------------------------------------------------
def env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    """ENV/ARG/LABEL values as the official parser returns them: key, value, key, value..."""
    return dict(zip(values[0::2], values[1::2], strict=True))
