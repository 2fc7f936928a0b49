"""Helpers of tests/test_ops.py: where the ops/ artefacts are, what the contract allows, and small parsers.

The names here are the contract of DESIGN §4 and the runbook (shared/RUNBOOK.md): the metrics the engine
exports, the cluster metrics the alerts and dashboards may use besides, and the ConfigMap's variables.
"""

from __future__ import annotations

import copy
import functools
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
# The three deployments of DESIGN §1 Roles (the runbook's API Gateway, Calculation Service and Data Service):
# the `app` label of their pods, the name of their Deployment and Service, the `app` label Prometheus adds to
# their series.
BACKENDS = ("calculation-service", "data-service")
ENGINE_APPS = (APP, *BACKENDS)

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
        "external_api_requests_total",
    }
)
ENGINE_HISTOGRAMS = frozenset(
    {
        "http_request_duration_seconds",
        "backend_request_duration_seconds",
        "calculation_duration_seconds",
        "external_api_request_duration_seconds",
    }
)
ENGINE_GAUGES = frozenset({"circuit_breaker_state", "market_data_age_seconds"})
ENGINE_METRICS = ENGINE_COUNTERS | ENGINE_HISTOGRAMS | ENGINE_GAUGES
ENGINE_SERIES = (
    ENGINE_COUNTERS
    | ENGINE_GAUGES
    | {f"{name}{suffix}" for name in ENGINE_HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}
)

METRICS_MODULE = REPO / "src" / "pricer" / "observability" / "metrics.py"
_METRIC_LITERAL = re.compile(r"""["']([a-z][a-z0-9_]*)["']""")


def declared_engine_metrics() -> set[str]:
    """The contract's metric names the engine's metrics module declares (each a string literal there)."""
    literals = set(_METRIC_LITERAL.findall(METRICS_MODULE.read_text(encoding="utf-8")))
    return ENGINE_METRICS & literals


def counters_declared_in_code() -> set[str]:
    """Every `*_total` name the metrics module declares: each must be in ENGINE_COUNTERS."""
    literals = set(_METRIC_LITERAL.findall(METRICS_MODULE.read_text(encoding="utf-8")))
    return {name for name in literals if name.endswith("_total")}


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


def app_matcher_is_engine(matchers: str) -> bool:
    """The label matchers select the `app` label of one or several of the engine's deployments, nothing else:
    app="api-gateway", or app=~"api-gateway|calculation-service" (each alternative one of ENGINE_APPS)."""
    match = re.search(r'\bapp\s*(=~|=)\s*"([^"]*)"', matchers)
    if match is None:
        return False
    alternatives = match.group(2).split("|") if match.group(1) == "=~" else [match.group(2)]
    return all(value in ENGINE_APPS for value in alternatives)


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
# DESIGN §3.1's source variables (DESIGN §4 names them as `*_API_URL`, `*_API_KEY`, `*_REFRESH_SECONDS`) with
# the defaults of issue 20; the keys are secrets.
SOURCE_URL_VARS = ("LENDER_API_URL", "VOLATILITY_API_URL", "EVENT_API_URL")
SOURCE_KEY_VARS = ("LENDER_API_KEY", "VOLATILITY_API_KEY", "EVENT_API_KEY")
SOURCE_REFRESH_DEFAULTS = {
    "LENDER_REFRESH_SECONDS": "60",
    "VOLATILITY_REFRESH_SECONDS": "300",
    "EVENT_REFRESH_SECONDS": "3600",
}
# These live in the Secret api-gateway-secrets, never in the ConfigMap.
SECRET_ENV_VARS = frozenset(
    {
        "DATABASE_URL",
        "REDIS_URL",
        "JWT_SECRET_KEY",
        "API_KEY_PEPPER",
        "BOOTSTRAP_ADMIN_KEY",
        "INTERNAL_SERVICE_SECRET",
        *SOURCE_KEY_VARS,
    }
)
# Engine variables beyond DESIGN's list that the ConfigMap sets for a cluster.
EXTRA_ENV_VARS = frozenset(
    {
        "SEED_DEMO_DATA",
        "DEMO_KEYS_FILE",
        "AUDIT_DURABILITY",
        "BATCH_WORKERS",
        "BATCH_INLINE_MAX_BYTES",
        *SOURCE_URL_VARS,
        *SOURCE_REFRESH_DEFAULTS,
    }
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


@functools.cache
def _k8s_documents(path: pathlib.Path, mtime_ns: int) -> tuple[dict[str, Any], ...]:
    """Parsed once per file version (pure-Python YAML parsing is what the checks would spend time on)."""
    return tuple(load_yaml_documents(path))


def k8s_objects() -> Iterator[tuple[pathlib.Path, dict[str, Any]]]:
    """Every object of ops/k8s, each a fresh copy (tests may change what they get)."""
    for path in k8s_files():
        for doc in _k8s_documents(path, path.stat().st_mtime_ns):
            if doc.get("kind") != "Kustomization":
                yield path, copy.deepcopy(doc)


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_objects() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in ops/k8s, found {len(found)}"
    return found[0]


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions; {} selects everything) against labels."""
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def pod_labels(deployment_name: str) -> dict[str, str]:
    labels = k8s_object("Deployment", deployment_name)["spec"]["template"]["metadata"]["labels"]
    return dict(labels)


def deployments_selected(selector: dict[str, Any]) -> set[str]:
    """Names of the Deployments of ops/k8s whose pods the selector matches."""
    return {
        doc["metadata"]["name"]
        for _, doc in k8s_objects()
        if doc["kind"] == "Deployment"
        and selector_matches(selector, doc["spec"]["template"]["metadata"]["labels"])
    }


def _namespace_labels(namespace: str) -> dict[str, str]:
    # The label every namespace carries (Kubernetes >= 1.22), what the policies' namespaceSelectors use.
    return {"kubernetes.io/metadata.name": namespace}


def _peer_matches(
    peer: dict[str, Any], policy_namespace: str, namespace: str, labels: dict[str, str]
) -> bool:
    """NetworkPolicy peer semantics: podSelector alone selects pods of the policy's namespace,
    namespaceSelector alone every pod of the selected namespaces, both together the selected pods of the
    selected namespaces."""
    if "ipBlock" in peer:
        return False  # in-cluster pods are not addressed by ipBlock rules here
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], _namespace_labels(namespace)):
            return False
    elif namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], labels)


def _port_allowed(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and p.get("port") == port for p in ports)


def ingress_allowed(
    target: dict[str, str], source_namespace: str, source: dict[str, str], port: int, protocol: str = "TCP"
) -> bool:
    """Whether the policies of ops/k8s let a pod (source labels, in source_namespace) reach a pod of the
    engine's namespace (target labels) on a port: isolated pods accept only what some rule of some policy
    allows."""
    policies = [
        doc
        for _, doc in k8s_objects()
        if doc["kind"] == "NetworkPolicy"
        and "Ingress" in doc["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(doc["spec"]["podSelector"], target)
    ]
    if not policies:
        return True
    for policy in policies:
        namespace = policy["metadata"]["namespace"]
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if not _port_allowed(rule, port, protocol):
                continue
            if not peers or any(_peer_matches(peer, namespace, source_namespace, source) for peer in peers):
                return True
    return False


def egress_allowed(
    source: dict[str, str], target_namespace: str, target: dict[str, str], port: int, protocol: str = "TCP"
) -> bool:
    """Whether the policies of ops/k8s let a pod of the engine's namespace (source labels) send to a pod."""
    policies = [
        doc
        for _, doc in k8s_objects()
        if doc["kind"] == "NetworkPolicy"
        and "Egress" in doc["spec"].get("policyTypes", [])
        and selector_matches(doc["spec"]["podSelector"], source)
    ]
    if not policies:
        return True
    for policy in policies:
        namespace = policy["metadata"]["namespace"]
        for rule in policy["spec"].get("egress", []):
            peers = rule.get("to")
            if not _port_allowed(rule, port, protocol):
                continue
            if not peers or any(_peer_matches(peer, namespace, target_namespace, target) for peer in peers):
                return True
    return False


def effective_env(deployment_name: str, secrets: dict[str, str]) -> dict[str, str]:
    """The environment a Deployment's container gets from its envFrom sources, in order (a key in several
    takes the last value; explicit env entries win), the Secret's values given by the caller."""
    (container,) = k8s_object("Deployment", deployment_name)["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s_object("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = k8s_object("Secret", source["secretRef"]["name"])
            env.update({key: secrets[key] for key in secret["stringData"]})
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


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
