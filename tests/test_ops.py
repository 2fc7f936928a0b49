"""The ops/ artefacts (DESIGN §4 "ops/"), each checked by a real validator and against the runbook's facts.

- Prometheus rules: `promtool check rules` and `promtool test rules` (every alert fires just past its
  threshold and not just below it). promtool must be on PATH: these tests fail, not skip, without it.
- Kubernetes manifests: the `kubernetes-validate` schemas of fixed Kubernetes versions, strict (unknown fields
  are errors), then the runbook's facts (names, replicas, resources, probes, strategy, Service, HPA...).
- Grafana dashboards: JSON, schema version, unique panel ids, the runbook's uids and URL variables; every
  PromQL query parsed by promtool; every metric name one the engine exports or an allowed cluster metric.
- Dockerfile: the official Dockerfile parser (the `dockerfile` package wraps BuildKit's), then static checks.
"""

from __future__ import annotations

import copy
import pathlib
import re
import urllib.parse
from typing import Any

import dockerfile
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from pricer.settings import Environment, load_settings
from tests import ops_checks as ops

# ----------------------------------------------------------------------------------------------------------
# Prometheus rules
# ----------------------------------------------------------------------------------------------------------
ALERTS = ops.PROMETHEUS / "alerts.yml"
ALERTS_TEST = ops.PROMETHEUS / "alerts_test.yml"
SEVERITIES = {"warning", "critical"}


def alert_rules() -> list[dict[str, Any]]:
    doc = ops.load_yaml(ALERTS)
    assert list(doc) == ["groups"], "the rules file's top level is `groups:` (promtool format)"
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = ops.promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_every_alert() -> None:
    result = ops.promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = ops.load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for group in tests["tests"]:
        for check in group.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
        for series in group["input_series"]:
            names = ops.promql_metric_names(series["series"])
            if any(ops.is_engine_metric(name) for name in names):
                assert f'namespace="{ops.NAMESPACE}"' in series["series"], series["series"]
                assert ops.app_matcher_is_engine(series["series"]), series["series"]
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent (just below the threshold)"
    assert fired | silent <= names, "tests of alerts that do not exist"


def test_alerts_carry_severity_and_annotations() -> None:
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules), "alert names are unique"
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
        assert rule["annotations"]["runbook_url"].startswith("https://"), rule["alert"]


# The runbook's thresholds (RUNBOOK "Key Metrics"): metric the alert is about -> {severity: threshold text}.
RUNBOOK_THRESHOLDS = {
    "ApiGatewayRequestRate": ("http_requests_total", {"warning": "> 800", "critical": "> 1000"}),
    "ApiGatewayLatencyP95": (
        "http_request_duration_seconds_bucket",
        {"warning": "> 0.1", "critical": "> 0.25"},
    ),
    "ApiGatewayErrorRate": ("http_requests_total", {"warning": "> 0.01", "critical": "> 0.05"}),
    "ApiGatewayAuthSuccessRate": (
        "authentication_attempts_total",
        {"warning": "< 0.99", "critical": "< 0.95"},
    ),
    "ApiGatewayInvalidApiKeyRate": (
        "authentication_attempts_total",
        {"warning": "> 0.01", "critical": "> 0.05"},
    ),
    "ApiGatewayRateLimitExceeded": ("rate_limit_exceeded_total", {"warning": "> 0.01", "critical": "> 0.05"}),
    "ApiGatewayBackendLatencyP95": (
        "backend_request_duration_seconds_bucket",
        {"warning": "> 0.2", "critical": "> 0.5"},
    ),
    "ApiGatewayBackendErrorRate": ("backend_requests_total", {"warning": "> 0.01", "critical": "> 0.05"}),
    "ApiGatewayCpuUsage": ("container_cpu_usage_seconds_total", {"warning": "> 0.7", "critical": "> 0.85"}),
    "ApiGatewayMemoryUsage": (
        "container_memory_working_set_bytes",
        {"warning": "> 0.7", "critical": "> 0.85"},
    ),
    "ApiGatewayPodRestarts": (
        "kube_pod_container_status_restarts_total",
        {"warning": "> 0", "critical": "> 2"},
    ),
    "ApiGatewayJwtIssuanceSpike": ("jwt_tokens_issued_total", {"warning": "> 1.5 *"}),
}


@pytest.mark.parametrize("family", sorted(RUNBOOK_THRESHOLDS))
def test_alert_family_has_the_runbook_thresholds(family: str) -> None:
    metric, thresholds = RUNBOOK_THRESHOLDS[family]
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for severity, threshold in thresholds.items():
        rule = rules[f"{family}{severity.capitalize()}"]
        assert rule["labels"]["severity"] == severity
        expr = " ".join(rule["expr"].split())
        assert metric in ops.promql_metric_names(expr)
        assert re.search(re.escape(threshold) + r"(?![\d.])", expr), f"{rule['alert']}: {threshold} in {expr}"


# Issue 20's reference thresholds: alert -> (severity, metric, threshold text, `for`, rate window).
ISSUE_20_ALERTS = {
    "ExternalApiErrorRateWarning": ("warning", "external_api_requests_total", "> 0.01", "15m", "[5m]"),
    "ExternalApiErrorRateCritical": ("critical", "external_api_requests_total", "> 0.05", "5m", "[5m]"),
    "ExternalApiErrorRateSpikeCritical": ("critical", "external_api_requests_total", "> 0.1", "2m", "[2m]"),
    "MarketDataFallbackUsageWarning": ("warning", "fallback_usage_total", "> 0.05", "5m", "[5m]"),
    "MarketDataFallbackUsageCritical": ("critical", "fallback_usage_total", "> 0.1", "5m", "[5m]"),
    # "Open > 5 min": not closed in the last 5 minutes and open within them, then `for: 1m` (alerts.yml).
    "CircuitBreakerOpenWarning": ("warning", "circuit_breaker_state", "== 2", "1m", "[5m]"),
    "CircuitBreakerOpenCritical": ("critical", "circuit_breaker_state", "== 2", "1m", "[5m]"),
}


@pytest.mark.parametrize("name", sorted(ISSUE_20_ALERTS))
def test_provider_fallback_and_breaker_alerts_have_the_reference_thresholds(name: str) -> None:
    severity, metric, threshold, duration, window = ISSUE_20_ALERTS[name]
    rule = {rule["alert"]: rule for rule in alert_rules()}[name]
    expr = " ".join(rule["expr"].split())
    assert rule["labels"]["severity"] == severity
    assert rule["for"] == duration
    assert metric in ops.promql_metric_names(expr)
    assert re.search(re.escape(threshold) + r"(?![\d.])", expr), f"{name}: {threshold} in {expr}"
    assert set(re.findall(r"\[\w+\]", expr)) == {window}, expr
    everywhere = 'app=~"' + "|".join(ops.ENGINE_APPS) + '"'
    for _, matchers in ops.promql_selectors(expr):
        assert everywhere in matchers, f"{name}: series of every deployment (ROLE=all or split)"
    if metric == "external_api_requests_total":
        numerator, denominator = expr.split(" / ", 1)
        # Failed attempts (error, timeout, invalid) over attempts made (not refused by an open breaker).
        assert 'status!~"success|not_found|circuit_open"' in numerator
        assert 'status!="circuit_open"' in denominator
        assert "by (provider)" in numerator
        assert "by (provider)" in denominator
    if metric == "fallback_usage_total":
        numerator, denominator = expr.split(" / ", 1)
        assert ops.promql_metric_names(numerator) == {"fallback_usage_total"}
        assert ops.promql_metric_names(denominator) == {"calculations_total"}, "positions priced"
    if metric == "circuit_breaker_state":
        assert "min_over_time" in expr
        assert ">= 1" in expr
        backends = '"' + "|".join(ops.BACKENDS) + '"'
        assert (f"name=~{backends}" in expr) == (severity == "critical"), "backends' breakers page"
        assert (f"name!~{backends}" in expr) == (severity == "warning")


def test_alert_metrics_are_exported_or_allowed_and_scoped() -> None:
    for rule in alert_rules():
        check_promql_metrics(rule["alert"], rule["expr"])


def test_runbook_invalid_key_and_rate_limit_alerts_divide_by_all_requests() -> None:
    rules = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    for name in ("ApiGatewayInvalidApiKeyRateWarning", "ApiGatewayRateLimitExceededWarning"):
        numerator, denominator = rules[name].split(" / ", 1)
        assert "http_requests_total" in denominator, name
        assert "http_requests_total" not in numerator, name
    assert 'status="invalid_key"' in rules["ApiGatewayInvalidApiKeyRateWarning"]
    assert 'status="success"' in rules["ApiGatewayAuthSuccessRateWarning"]
    assert 'status="error"' in rules["ApiGatewayBackendErrorRateWarning"]
    assert 'status_code=~"[45].*"' in rules["ApiGatewayErrorRateWarning"]
    assert "offset 1h" in rules["ApiGatewayJwtIssuanceSpikeWarning"]
    assert 'resource="cpu"' in rules["ApiGatewayCpuUsageWarning"]
    assert 'resource="memory"' in rules["ApiGatewayMemoryUsageWarning"]
    assert "[15m]" in rules["ApiGatewayPodRestartsWarning"]


def test_prometheus_scrape_config_example(tmp_path: pathlib.Path) -> None:
    """promtool check config, with the Kubernetes discovery swapped for a static target: Debian's promtool is
    built without Kubernetes service discovery. The relabelling must add the namespace, app and pod labels."""
    config = ops.load_yaml(ops.PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == [ALERTS.name]
    (job,) = config["scrape_configs"]
    (discovery,) = job.pop("kubernetes_sd_configs")
    assert discovery["role"] == "pod"
    assert discovery["namespaces"]["names"] == [ops.NAMESPACE]
    keep_apps = [
        r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep" and r["source_labels"] == ["__meta_kubernetes_pod_label_app"]
    ]
    assert keep_apps == ["|".join(ops.ENGINE_APPS)], "the three deployments' pods are scraped"
    targets = {r.get("target_label"): r.get("source_labels") for r in job["relabel_configs"]}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["app"] == ["__meta_kubernetes_pod_label_app"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / ALERTS.name).write_text(ALERTS.read_text(encoding="utf-8"), encoding="utf-8")
    result = ops.promtool("check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_adapter_rule_publishes_the_hpa_metric() -> None:
    (rule,) = ops.load_yaml(ops.PROMETHEUS / "prometheus-adapter-rules.yaml")["rules"]
    hpa = ops.k8s_object("HorizontalPodAutoscaler", "api-gateway-hpa")
    (pods_metric,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert rule["name"]["as"] == pods_metric["metric"]["name"]
    assert ops.promql_metric_names(rule["seriesQuery"]) == {"http_requests_total"}


# ----------------------------------------------------------------------------------------------------------
# PromQL helpers
# ----------------------------------------------------------------------------------------------------------
def check_promql_metrics(where: str, expr: str) -> None:
    names = ops.promql_metric_names(expr)
    assert names, f"{where}: no metric in {expr}"
    unknown = {name for name in names if not ops.is_allowed_metric(name)}
    assert not unknown, (
        f"{where}: metrics neither exported by the engine nor allowed cluster metrics: {unknown}"
    )
    for name, matchers in ops.promql_selectors(expr):
        assert f'namespace="{ops.NAMESPACE}"' in matchers, f"{where}: {name} not scoped to the namespace"
        if ops.is_engine_metric(name):
            assert ops.app_matcher_is_engine(matchers), f"{where}: {name} not scoped to the engine's apps"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum(rate(http_requests_total{namespace="x", status_code=~"[45].*"}[5m])) > 800',
            {"http_requests_total"},
        ),
        (
            'histogram_quantile(0.95, sum by (le, service) (rate(a_bucket{x="y"}[$__rate_interval]))) > 0.2',
            {"a_bucket"},
        ),
        ("sum(rate(a[15m])) > 1.5 * sum(rate(a[15m] offset 1h)) and sum(rate(a[15m])) > 1 / 60", {"a"}),
        ('sum by (pod) (max_over_time(b{p=~"api-.*"}[15m]) - min_over_time(b[15m])) > 2e0', {"b"}),
        ("x / on (pod) group_left (node) y unless z", {"x", "y", "z"}),
    ],
)
def test_promql_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert ops.promql_metric_names(expr) == names


# ----------------------------------------------------------------------------------------------------------
# Kubernetes manifests
# ----------------------------------------------------------------------------------------------------------
K8S_VERSIONS = ("1.29.0", "1.33.0")
CRD_KINDS = {"ServiceMonitor"}  # no schema in kubernetes-validate; checked by hand below


def k8s_ids() -> list[str]:
    return [f"{path.name}:{doc['kind']}/{doc['metadata']['name']}" for path, doc in ops.k8s_objects()]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("index", range(len(k8s_ids())), ids=k8s_ids())
def test_manifest_validates_strictly(index: int, version: str) -> None:
    _, doc = list(ops.k8s_objects())[index]
    if doc["kind"] in CRD_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, version, strict=True)
        return
    assert kubernetes_validate.validate(doc, version, strict=True) == version.rsplit(".", 1)[0]
    assert doc["metadata"]["namespace" if doc["kind"] != "Namespace" else "name"] == ops.NAMESPACE


def test_strict_validation_rejects_unknown_fields_and_bad_types() -> None:
    deployment = ops.k8s_object("Deployment", "api-gateway")
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, K8S_VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "3"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_the_manifests() -> None:
    kustomization = ops.load_yaml(ops.K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == ops.NAMESPACE
    listed = kustomization["resources"]
    assert len(set(listed)) == len(listed)
    for name in listed:
        assert (ops.K8S / name).is_file(), name
    # Everything but the Secret template (never applied over the real Secret) and the CRD-dependent
    # ServiceMonitor is applied by `kubectl apply -k ops/k8s`.
    files = {path.name for path in ops.k8s_files()} - {"kustomization.yaml"}
    assert files - set(listed) == {"secret.template.yaml", "servicemonitor.yaml"}
    kinds = {doc["kind"] for path, doc in ops.k8s_objects() if path.name in listed}
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }


def deployment_container() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    deployment = ops.k8s_object("Deployment", "api-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return deployment, pod, container


def configmap() -> dict[str, str]:
    data = ops.k8s_object("ConfigMap", "api-gateway-config")["data"]
    assert all(isinstance(value, str) for value in data.values()), "ConfigMap values are strings"
    return dict(data)


def test_deployment_matches_the_runbook() -> None:
    deployment, pod, container = deployment_container()
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"] == {"app": "api-gateway"}
    assert deployment["metadata"]["labels"]["app"] == "api-gateway"
    assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == "api-gateway"
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert container["name"] == "api-gateway"
    assert container["image"] == "${ECR_REPO}/borrow-rate-engine-api:${VERSION}"
    resources = container["resources"]
    assert ops.quantity_cpu_millis(resources["requests"]["cpu"]) == 500
    assert ops.quantity_cpu_millis(resources["limits"]["cpu"]) == 2000
    assert ops.quantity_bytes(resources["requests"]["memory"]) == 1 << 30
    assert ops.quantity_bytes(resources["limits"]["memory"]) == 4 << 30
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8000}, probe
    assert container["envFrom"] == [
        {"configMapRef": {"name": "api-gateway-config"}},
        {"secretRef": {"name": "api-gateway-secrets"}},
    ]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    zones = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert zones
    assert zones[0]["labelSelector"] == {"matchLabels": {"app": "api-gateway"}}


def test_probes_and_grace_period_fit_the_shutdown_drain() -> None:
    """DESIGN §4 Shutdown: /health answers 503 for SHUTDOWN_DRAIN_SECONDS while requests are still served, so
    the readiness probe must take the pod out within the drain, and liveness must outlast it."""
    _, pod, container = deployment_container()
    drain = float(configmap()["SHUTDOWN_DRAIN_SECONDS"])
    assert drain == 5

    def failure_window(probe: dict[str, Any]) -> float:
        return float(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))

    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert failure_window(readiness) + readiness.get("timeoutSeconds", 1) <= drain - 2
    assert failure_window(liveness) > drain
    assert failure_window(liveness) >= 3 * drain
    # uvicorn's graceful shutdown waits up to drain + 25 s (pricer.cli) after the drain: the kubelet must not
    # SIGKILL before.
    assert pod["terminationGracePeriodSeconds"] > drain + (drain + 25)
    assert failure_window(container["startupProbe"]) >= 30


def test_pod_security() -> None:
    _, pod, container = deployment_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    spool = volumes[mounts[configmap()["AUDIT_SPOOL_DIR"]]]
    assert "emptyDir" in spool or "persistentVolumeClaim" in spool or "ephemeral" in spool


def test_service_hpa_pdb_and_network_policy() -> None:
    service = ops.k8s_object("Service", "api-gateway")["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == {"app": "api-gateway"}
    ports = {p["port"]: p for p in service["ports"]}
    assert ports[80]["targetPort"] == 8000
    assert ports[80]["name"] == "http"
    assert all(p["targetPort"] == 8000 for p in ports.values())

    hpa = ops.k8s_object("HorizontalPodAutoscaler", "api-gateway-hpa")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api-gateway"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 10)
    metrics = {m["type"]: m for m in spec["metrics"]}
    assert metrics["Resource"]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 70},
    }
    assert metrics["Pods"]["pods"] == {
        "metric": {"name": "http_requests_per_second"},
        "target": {"type": "AverageValue", "averageValue": "800"},
    }
    assert configmap()["EXPECTED_REPLICAS"] == str(spec["minReplicas"])

    pdb = ops.k8s_object("PodDisruptionBudget", "api-gateway")["spec"]
    assert pdb == {"minAvailable": 2, "selector": {"matchLabels": {"app": "api-gateway"}}}

    policy = ops.k8s_object("NetworkPolicy", "api-gateway")["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app": "api-gateway"}}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {(p["protocol"], p["port"]) for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {("TCP", 8000)}
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule.get("ports", [])}
    assert {("TCP", 5432), ("TCP", 6379), ("UDP", 53), ("TCP", 53)} <= egress_ports


def test_service_monitor() -> None:
    monitor = ops.k8s_object("ServiceMonitor", "api-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["selector"] == {"matchLabels": {"app": "api-gateway"}}
    assert spec["namespaceSelector"] == {"matchNames": [ops.NAMESPACE]}
    service_ports = {p["name"] for p in ops.k8s_object("Service", "api-gateway")["spec"]["ports"]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in service_ports
    assert endpoint["path"] == "/metrics"
    assert {r["targetLabel"] for r in endpoint["relabelings"]} >= {"app", "pod"}


# --- the backends (issue 15: DESIGN §1 Roles, the runbook's Calculation Service and Data Service) ----------
@pytest.mark.parametrize("name", ops.BACKENDS)
def test_backend_deployment(name: str) -> None:
    """Same image, port, probes, drain, security and volumes as the gateway; its own labels, its ConfigMap
    after the shared one, the shared Secret; scraped by Prometheus."""
    deployment = ops.k8s_object("Deployment", name)
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    _, gateway_pod, gateway = deployment_container()
    assert deployment["metadata"]["labels"]["app"] == name
    assert spec["selector"] == {"matchLabels": {"app": name}}
    assert spec["template"]["metadata"]["labels"]["app"] == name
    assert ops.deployments_selected(spec["selector"]) == {name}, (
        "its selector takes no other deployment's pods"
    )
    assert spec["replicas"] >= 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert container["name"] == name
    assert container["image"] == gateway["image"], "one image, the role chosen by ROLE"
    assert container["ports"] == gateway["ports"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe] == gateway[probe], probe
    assert pod["terminationGracePeriodSeconds"] == gateway_pod["terminationGracePeriodSeconds"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": "api-gateway-config"}},
        {"configMapRef": {"name": f"{name}-config"}},
        {"secretRef": {"name": "api-gateway-secrets"}},
    ]
    assert "env" not in container
    assert spec["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    for field in ("securityContext", "automountServiceAccountToken"):
        assert pod[field] == gateway_pod[field], field
    assert container["securityContext"] == gateway["securityContext"]
    # The batch pool's scratch space goes where batches are priced: ROLE=all (the gateway's deployment, as
    # shipped for one pod shape) and the calculation service, not the data service.
    expected_mounts = [
        mount
        for mount in gateway["volumeMounts"]
        if name == "calculation-service" or mount["name"] != "batch-scratch"
    ]
    assert container["volumeMounts"] == expected_mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
    assert all("emptyDir" in v or "persistentVolumeClaim" in v for v in volumes.values())
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        parse = ops.quantity_cpu_millis if kind == "cpu" else ops.quantity_bytes
        assert 0 < parse(resources["requests"][kind]) <= parse(resources["limits"][kind]), kind
    spread = [c["labelSelector"] for c in pod["topologySpreadConstraints"]]
    assert spread
    assert all(selector == {"matchLabels": {"app": name}} for selector in spread)


@pytest.mark.parametrize("name", ops.BACKENDS)
def test_backend_service_hpa_and_pdb(name: str) -> None:
    deployment = ops.k8s_object("Deployment", name)
    replicas = deployment["spec"]["replicas"]
    service = ops.k8s_object("Service", name)["spec"]
    assert service["type"] == "ClusterIP"
    assert ops.deployments_selected({"matchLabels": service["selector"]}) == {name}
    assert [(p["name"], p["port"], p["targetPort"], p["protocol"]) for p in service["ports"]] == [
        ("http", 80, 8000, "TCP")
    ]

    hpa = ops.k8s_object("HorizontalPodAutoscaler", f"{name}-hpa")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 2 <= hpa["minReplicas"] == replicas < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}

    pdb = ops.k8s_object("PodDisruptionBudget", name)["spec"]
    assert ops.deployments_selected(pdb["selector"]) == {name}
    assert 1 <= pdb["minAvailable"] < replicas, "a drain can always evict one pod, never all"


def test_every_network_policy_selects_the_pods_it_is_named_for() -> None:
    """Each policy isolates exactly its deployment's pods, and every pod selector in its rules (within the
    namespace) selects the pods of a deployment that exists."""
    policies = [doc for _, doc in ops.k8s_objects() if doc["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in policies} == set(ops.ENGINE_APPS)
    for policy in policies:
        name = policy["metadata"]["name"]
        assert ops.deployments_selected(policy["spec"]["podSelector"]) == {name}
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", rule.get("to", [])):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert ops.deployments_selected(peer["podSelector"]), f"{name}: {peer} selects no pods"


PROMETHEUS_NAMESPACE = "monitoring"  # the policies' assumption (see networkpolicy.yaml)


@pytest.mark.parametrize("name", ops.BACKENDS)
def test_backends_are_reachable_only_from_the_gateway_and_prometheus(name: str) -> None:
    target = ops.pod_labels(name)
    gateway = ops.pod_labels(ops.APP)
    assert ops.ingress_allowed(target, ops.NAMESPACE, gateway, 8000)
    assert ops.ingress_allowed(target, PROMETHEUS_NAMESPACE, {"app.kubernetes.io/name": "prometheus"}, 8000)
    assert ops.egress_allowed(gateway, ops.NAMESPACE, target, 8000), "the gateway's own policy lets it call"
    # Anyone else: another pod of the namespace, the ingress controller, a pod of another namespace.
    assert not ops.ingress_allowed(target, ops.NAMESPACE, {"app": "debug-shell"}, 8000)
    assert not ops.ingress_allowed(target, ops.NAMESPACE, {}, 8000)
    assert not ops.ingress_allowed(target, "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, 8000)
    assert not ops.ingress_allowed(target, "default", gateway, 8000), (
        "an api-gateway label elsewhere is no pass"
    )
    # Nor the gateway on another port.
    assert not ops.ingress_allowed(target, ops.NAMESPACE, gateway, 5432)
    # Both backends reach PostgreSQL, Redis and DNS.
    database = {"app": "postgres"}
    assert ops.egress_allowed(target, "databases", database, 5432)
    assert ops.egress_allowed(target, "databases", database, 6379)
    assert ops.egress_allowed(target, "kube-system", {"k8s-app": "kube-dns"}, 53, "UDP")


def test_the_backends_do_not_call_each_other() -> None:
    """The calculation service reads market data from the stores the data service writes (no call between
    them), and only the data service calls the market-data providers."""
    calculation, data = ops.pod_labels("calculation-service"), ops.pod_labels("data-service")
    assert not ops.ingress_allowed(data, ops.NAMESPACE, calculation, 8000)
    assert not ops.egress_allowed(calculation, ops.NAMESPACE, data, 8000)
    assert not ops.ingress_allowed(calculation, ops.NAMESPACE, data, 8000)
    assert not ops.egress_allowed(data, ops.NAMESPACE, calculation, 8000)
    # The data service alone calls the market-data providers (HTTPS, outside the cluster).
    provider = {"app": "lender-api"}
    assert ops.egress_allowed(data, "internet", provider, 443)
    assert not ops.egress_allowed(calculation, "internet", provider, 443)


def runbook_command_lines() -> list[str]:
    """The runbook's kubectl lines and its in-cluster curl lines (http://<service>:<port>/...)."""
    text = ops.RUNBOOK.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    return [
        line
        for line in lines
        if line.startswith("kubectl ") or re.match(r"curl (-\w+ )*http://[\w-]+:\d+/", line)
    ]


# The runbook's Redis (`kubectl exec ... deploy/redis-master -- redis-cli ...`) is the cluster's (e.g. a Helm
# chart's), not one of the engine's manifests; its address is REDIS_URL in the Secret.
EXTERNAL_DEPLOYMENTS = {"redis-master"}


def test_runbook_kubectl_lines_name_real_objects() -> None:
    """Every deployment, label, Service (by URL or DNS name), ConfigMap and HPA a runbook kubectl line
    names is an object of ops/k8s, in the namespace the line gives."""
    lines = runbook_command_lines()
    assert len(lines) > 30
    named: dict[str, set[str]] = {"deployment": set(), "app": set(), "service": set()}
    for line in lines:
        if line == "kubectl apply -f updated-hpa.yaml":
            continue  # the operator's own edited copy of an HPA
        namespace = re.search(r"-n (\S+)", line)
        if line.startswith("kubectl "):
            assert namespace is not None, line
            assert namespace.group(1) == ops.NAMESPACE, line
        for name in re.findall(r"\b(?:deployment|deploy)/([\w-]+)", line):
            if name in EXTERNAL_DEPLOYMENTS:
                continue
            ops.k8s_object("Deployment", name)
            named["deployment"].add(name)
        for app in re.findall(r"-l app=([\w-]+)", line):
            assert ops.deployments_selected({"matchLabels": {"app": app}}), f"no pods with app={app}: {line}"
            named["app"].add(app)
        for host, port in re.findall(r"http://([\w-]+):(\d+)/", line):
            if host == "localhost":
                continue
            ports = [p["port"] for p in ops.k8s_object("Service", host)["spec"]["ports"]]
            assert int(port) in ports, f"Service {host} has no port {port}: {line}"
            named["service"].add(host)
        for host in re.findall(rf"\b([\w-]+)\.{ops.NAMESPACE}\.svc\.cluster\.local", line):
            ops.k8s_object("Service", host)
            named["service"].add(host)
        match = re.search(r"\bconfigmap -n \S+ ([\w-]+)", line)
        if match:
            ops.k8s_object("ConfigMap", match.group(1))
        match = re.search(r"\bhpa -n \S+ ([\w-]+)", line)
        if match:
            ops.k8s_object("HorizontalPodAutoscaler", match.group(1))
    # The backends' lines are among them (the test would pass vacuously if the runbook's wording changed).
    assert named["deployment"] >= {"api-gateway", "calculation-service"}
    assert named["app"] >= {"api-gateway", "calculation-service", "data-service"}
    assert named["service"] >= {"api-gateway", "calculation-service", "data-service"}


@pytest.mark.parametrize("name", ops.ENGINE_APPS)
def test_service_monitor_of_each_deployment(name: str) -> None:
    monitor = ops.k8s_object("ServiceMonitor", name)
    spec = monitor["spec"]
    assert spec["selector"] == {"matchLabels": {"app": name}}
    service = ops.k8s_object("Service", name)
    assert service["metadata"]["labels"]["app"] == name, "the ServiceMonitor selects Services by their labels"
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert {r["targetLabel"] for r in endpoint["relabelings"]} >= {"app", "pod"}


def test_configmap_holds_every_design_variable() -> None:
    data = configmap()
    assert set(ops.design_env_vars()) == set(ops.DESIGN_ENV_VARS), (
        "DESIGN §4's list changed: update ops_checks"
    )
    expected = set(ops.DESIGN_ENV_VARS) - ops.SECRET_ENV_VARS
    assert expected - set(data) == set(), "variables of DESIGN §4 missing from the ConfigMap"
    assert ops.SECRET_ENV_VARS & set(data) == set(), "secrets do not belong in the ConfigMap"
    unknown = {
        k for k in data if k not in expected and k not in ops.EXTRA_ENV_VARS and not k.startswith("OTEL_")
    }
    assert unknown == set(), "ConfigMap variables the engine does not read"
    assert data["OTEL_SERVICE_NAME"]
    assert data["OTEL_TRACES_EXPORTER"] == "none"
    assert data["HOST"] == "0.0.0.0"
    assert data["PORT"] == "8000"
    assert data["RATE_LIMIT_PER_MINUTE"] == "60"
    assert data["ENABLE_AUTHENTICATION"] == "true"
    assert data["ENABLE_RATE_LIMITING"] == "true"
    # The gateway's backends are the Services of the two backend deployments (checked in detail below).
    assert data["ROLE"] == "gateway"
    assert data["CALCULATION_SERVICE_URL"]
    assert data["DATA_SERVICE_URL"]


def test_configmap_carries_the_runbook_parameters_and_the_sources_settings() -> None:
    """Every variable of the runbook's "Key Configuration Parameters" is set in the ConfigMap or the Secret;
    the runbook's `... api-gateway-config -o yaml | grep TIMEOUT` finds the backend deadlines; the providers'
    URLs (empty: off) and refresh intervals (issue 20's defaults) are there, their keys in the Secret."""
    runbook = ops.RUNBOOK.read_text(encoding="utf-8")
    section = runbook.split("**Key Configuration Parameters:**", 1)[1].split("\n\n", 1)[0]
    parameters = re.findall(r"^- `([A-Z][A-Z0-9_]+)`", section, re.M)
    assert len(parameters) == 11, parameters
    data = configmap()
    secret = ops.k8s_object("Secret", "api-gateway-secrets")["stringData"]
    assert [p for p in parameters if p not in data and p not in secret] == []
    assert "grep TIMEOUT" in runbook
    assert {k for k in data if "TIMEOUT" in k} >= {"BACKEND_TIMEOUT_SECONDS", "BACKEND_BATCH_TIMEOUT_SECONDS"}
    assert float(data["BACKEND_TIMEOUT_SECONDS"]) == 2
    assert float(data["BACKEND_BATCH_TIMEOUT_SECONDS"]) == 30
    for url in ops.SOURCE_URL_VARS:
        assert data[url] == "", f"{url}: off until the operator sets it"
    for name, default in ops.SOURCE_REFRESH_DEFAULTS.items():
        assert data[name] == default, name
    assert (
        data["SOURCE_TIMEOUT_SECONDS"],
        data["SOURCE_MAX_AGE_SECONDS"],
        data["SOURCE_COLD_FETCH_MS"],
        data["SOURCE_MAX_CONCURRENCY"],
    ) == ("2", "900", "200", "8")
    assert set(ops.SOURCE_KEY_VARS) <= set(secret)


def test_secret_template_has_placeholders_only() -> None:
    secret = ops.k8s_object("Secret", "api-gateway-secrets")
    assert "data" not in secret
    assert set(secret["stringData"]) == ops.SECRET_ENV_VARS
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    # No other Secret anywhere in the manifests (and none applied by kustomize: see the kustomization test).
    assert [doc["metadata"]["name"] for _, doc in ops.k8s_objects() if doc["kind"] == "Secret"] == [
        "api-gateway-secrets"
    ]


# What an operator puts in the Secret (the template holds placeholders only).
SECRET_VALUES = {
    "DATABASE_URL": "postgresql://pricer:pw@postgres.borrow-rate-engine.svc:5432/pricer",
    "REDIS_URL": "redis://redis-master.borrow-rate-engine.svc:6379/0",
    "JWT_SECRET_KEY": "k" * 48,
    "API_KEY_PEPPER": "p" * 48,
    "BOOTSTRAP_ADMIN_KEY": "",
    "INTERNAL_SERVICE_SECRET": "i" * 48,
    "LENDER_API_KEY": "lender-key",
    "VOLATILITY_API_KEY": "volatility-key",
    "EVENT_API_KEY": "event-key",
}
ROLES = {"api-gateway": "gateway", "calculation-service": "calculation", "data-service": "data"}


def test_configmap_starts_the_engine_settings() -> None:
    """The gateway's environment (ConfigMap, Secret) is accepted by the engine's own settings parser."""
    env = ops.effective_env("api-gateway", SECRET_VALUES)
    settings = load_settings(env)
    _, _, container = deployment_container()
    assert settings.environment is Environment.PROD
    assert settings.host == "0.0.0.0"
    assert settings.port == container["ports"][0]["containerPort"]
    assert settings.shutdown_drain_seconds == 5
    assert settings.expected_replicas == 3
    assert settings.enable_authentication
    assert settings.enable_rate_limiting
    assert settings.role.value == "gateway"
    assert settings.calculation_service_url == env["CALCULATION_SERVICE_URL"]
    assert settings.data_service_url == env["DATA_SERVICE_URL"]
    assert settings.internal_service_secret == SECRET_VALUES["INTERNAL_SERVICE_SECRET"]
    assert settings.audit_spool_dir == env["AUDIT_SPOOL_DIR"]
    assert settings.seed_demo_data is False
    assert settings.demo_keys_file is None


@pytest.mark.parametrize("name", sorted(ROLES))
def test_each_deployment_gets_its_role_and_a_valid_environment(name: str) -> None:
    """ROLE per deployment (the shared ConfigMap, then the backend's own), the same shared settings everywhere
    (the pricing parameters cannot differ between the roles), and the engine's parser accepts each."""
    env = ops.effective_env(name, SECRET_VALUES)
    assert env["ROLE"] == ROLES[name]
    settings = load_settings(env)
    assert settings.role.value == ROLES[name]
    assert settings.internal_service_secret == SECRET_VALUES["INTERNAL_SERVICE_SECRET"]
    shared = configmap()
    overridden = {k for k in shared if env[k] != shared[k]}
    assert overridden <= {"ROLE", "OTEL_SERVICE_NAME"}, overridden
    if name != ops.APP:
        own = ops.k8s_object("ConfigMap", f"{name}-config")["data"]
        assert set(own) == {"ROLE", "OTEL_SERVICE_NAME"}
        assert own["OTEL_SERVICE_NAME"] != shared["OTEL_SERVICE_NAME"], "one service name per role in traces"


@pytest.mark.parametrize(
    ("variable", "service"),
    [("CALCULATION_SERVICE_URL", "calculation-service"), ("DATA_SERVICE_URL", "data-service")],
)
def test_gateway_backend_urls_reach_the_backend_pods(variable: str, service: str) -> None:
    """The gateway's URL names the backend's Service (short name or cluster DNS name) on one of its ports,
    whose target port is the backend container's port."""
    url = urllib.parse.urlsplit(configmap()[variable])
    assert url.scheme == "http"
    assert url.hostname in {
        service,
        f"{service}.{ops.NAMESPACE}.svc",
        f"{service}.{ops.NAMESPACE}.svc.cluster.local",
    }
    port = url.port or 80
    spec = ops.k8s_object("Service", service)["spec"]
    (service_port,) = [p for p in spec["ports"] if p["port"] == port]
    assert ops.deployments_selected({"matchLabels": spec["selector"]}) == {service}
    (container,) = ops.k8s_object("Deployment", service)["spec"]["template"]["spec"]["containers"]
    assert service_port["targetPort"] in [p["containerPort"] for p in container["ports"]]
    assert ops.egress_allowed(
        ops.pod_labels(ops.APP), ops.NAMESPACE, ops.pod_labels(service), service_port["targetPort"]
    )


# ----------------------------------------------------------------------------------------------------------
# Grafana dashboards
# ----------------------------------------------------------------------------------------------------------
def test_the_four_dashboards_of_the_runbook() -> None:
    boards = ops.dashboards()
    assert sorted(boards) == sorted(ops.DASHBOARD_UIDS)
    for uid, board in boards.items():
        assert (ops.GRAFANA / f"{uid}.json").is_file()
        assert 36 <= board["schemaVersion"] <= 41, uid
        assert board["title"], uid
        assert board["panels"], uid
        ids = [panel["id"] for panel in ops.all_panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        assert all(isinstance(i, int) for i in ids), uid
        for panel in ops.all_panels(board["panels"]):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{uid} panel {panel['id']}"
            assert grid["h"] > 0, f"{uid} panel {panel['id']}"
            ref_ids = [t["refId"] for t in panel.get("targets", [])]
            assert len(ref_ids) == len(set(ref_ids)), f"{uid} panel {panel['id']}"
        names = [v["name"] for v in board["templating"]["list"]]
        assert len(names) == len(set(names)), uid


def test_runbook_dashboard_urls_resolve() -> None:
    """Each dashboard URL of the runbook names an existing uid, each var-X parameter an existing variable."""
    text = ops.RUNBOOK.read_text(encoding="utf-8")
    boards = ops.dashboards()
    urls = re.findall(r"https://grafana\.example\.com/d/([\w-]+)(\?\S*)?", text)
    assert {uid for uid, _ in urls} == set(ops.DASHBOARD_UIDS)
    used = set()
    for uid, query in urls:
        for var in re.findall(r"var-(\w+)=", query):
            assert var in {v["name"] for v in boards[uid]["templating"]["list"]}, f"{uid}: var-{var}"
            used.add(var)
    assert used == {"endpoint", "pod", "level"}


def test_dashboard_datasources_are_variables() -> None:
    boards = ops.dashboards()
    for uid, board in boards.items():
        kinds = {v["query"] for v in board["templating"]["list"] if v["type"] == "datasource"}
        for panel in ops.all_panels(board["panels"]):
            if panel["type"] == "row":
                continue
            assert re.fullmatch(r"\$\{\w+\}", panel["datasource"]["uid"]), f"{uid} panel {panel['id']}"
            assert ops.datasource_type(board, panel["datasource"]) in kinds
    assert {
        v["query"] for v in boards["api-gateway-logs"]["templating"]["list"] if v["type"] == "datasource"
    } == {"loki"}


def test_dashboard_promql_parses(tmp_path: pathlib.Path) -> None:
    """Every Prometheus query of every dashboard, its variables replaced by their All values, is parsed by
    promtool (as a recording rule)."""
    rules = []
    for uid, board in ops.dashboards().items():
        variables = {v["name"]: v.get("allValue") or ".*" for v in board["templating"]["list"]}
        for where, expr in ops.prometheus_queries(board):
            record = "dashboard:" + re.sub(r"\W+", "_", where)
            rules.append({"record": record, "expr": ops.grafana_to_promql(expr, variables)})
        assert rules, uid
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    result = ops.promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_metrics_are_exported_or_allowed() -> None:
    used: set[str] = set()
    for board in ops.dashboards().values():
        for where, expr in ops.prometheus_queries(board):
            check_promql_metrics(where, expr)
            used |= ops.promql_metric_names(expr)
    engine = {name for name in used if ops.is_engine_metric(name)}
    histograms = {f"{name}_bucket" for name in ops.ENGINE_HISTOGRAMS}
    missing = (
        ops.ENGINE_COUNTERS | ops.ENGINE_GAUGES | histograms | {"process_resident_memory_bytes"}
    ) - engine
    assert missing == set(), "engine metrics shown on no dashboard"
    assert "kube_horizontalpodautoscaler_status_current_replicas" in used


def test_engine_metric_names_are_declared_by_the_code() -> None:
    """The names the alerts and dashboards may use as the engine's are the ones its metrics module declares;
    every counter the module declares is in the list, so a new one cannot be left off the dashboards."""
    declared = ops.declared_engine_metrics()
    assert ops.ENGINE_METRICS - declared == set(), "ops_checks lists metrics the engine does not declare"
    assert ops.counters_declared_in_code() - ops.ENGINE_COUNTERS == set(), "counters missing from ops_checks"


def test_provider_and_backend_rows_of_the_detailed_dashboard() -> None:
    """Issue 20's providers row (requests and errors by provider, p99, breakers, data age, fallback share) and
    issue 15's backends row (the backends' own request rate, errors and p99), over every engine deployment."""
    board = ops.dashboards()["api-gateway-detailed"]
    rows = {panel["title"]: panel for panel in board["panels"] if panel["type"] == "row"}
    providers = next(title for title in rows if title.startswith("Market data providers"))
    backends = next(title for title in rows if title.startswith("Calculation and data services"))
    by_row: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
        else:
            by_row.setdefault(current, []).append(panel)

    def exprs(row: str) -> list[str]:
        return [t["expr"] for panel in by_row[row] for t in panel["targets"]]

    provider_exprs = exprs(providers)
    used = set().union(*(ops.promql_metric_names(e) for e in provider_exprs))
    assert used >= {
        "external_api_requests_total",
        "external_api_request_duration_seconds_bucket",
        "circuit_breaker_state",
        "market_data_age_seconds",
        "fallback_usage_total",
        "calculations_total",
    }
    assert any("histogram_quantile(0.99" in e and "by (le, provider)" in e for e in provider_exprs)
    assert any(
        'status!~"success|not_found|circuit_open"' in e and "by (provider)" in e for e in provider_exprs
    )
    # Whichever deployment calls the providers or prices (ROLE=all: the gateway; split: the backends).
    for expr in provider_exprs:
        for _, matchers in ops.promql_selectors(expr):
            assert 'app=~"' + "|".join(ops.ENGINE_APPS) + '"' in matchers, expr
    backend_exprs = exprs(backends)
    assert any("histogram_quantile(0.99" in e and "by (le, app)" in e for e in backend_exprs)
    assert any('status_code=~"5.."' in e for e in backend_exprs)
    assert any(e.startswith("sum by (app") and "http_requests_total" in e for e in backend_exprs)
    for expr in backend_exprs:
        for name, matchers in ops.promql_selectors(expr):
            if name.startswith("http_request"):
                assert 'app=~"' + "|".join(ops.BACKENDS) + '"' in matchers, expr


@pytest.mark.parametrize(
    ("uid", "required"),
    [
        (
            "api-gateway-overview",
            {"http_requests_total", "http_request_duration_seconds_bucket", "authentication_attempts_total"},
        ),
        (
            "api-gateway-detailed",
            {
                "http_requests_total",
                "rate_limit_exceeded_total",
                "backend_requests_total",
                "backend_request_duration_seconds_bucket",
                "calculations_total",
                "cache_hits_total",
                "cache_misses_total",
                "fallback_usage_total",
            },
        ),
        (
            "api-gateway-resources",
            {
                "container_cpu_usage_seconds_total",
                "container_memory_working_set_bytes",
                "kube_pod_container_resource_limits",
                "kube_pod_container_status_restarts_total",
                "kube_pod_status_phase",
                "kube_horizontalpodautoscaler_status_current_replicas",
            },
        ),
    ],
)
def test_dashboard_key_panels(uid: str, required: set[str]) -> None:
    board = ops.dashboards()[uid]
    used = set().union(*(ops.promql_metric_names(expr) for _, expr in ops.prometheus_queries(board)))
    assert required <= used


def test_logs_dashboard_has_the_runbook_logql() -> None:
    """The runbook's LogQL queries (one filter each) are panels of the logs dashboard, verbatim."""
    text = ops.RUNBOOK.read_text(encoding="utf-8")
    runbook = re.findall(
        r'^(\{namespace="borrow-rate-engine", app="api-gateway"\} \|= "[^"\n]+")$', text, re.M
    )
    assert len(runbook) == 6
    board = ops.dashboards()["api-gateway-logs"]
    queries = {expr for _, expr in ops.loki_queries(board)}
    assert set(runbook) <= queries
    for message in (
        "Authentication error",
        "Rate limit exceeded",
        "Backend service error",
        "Validation error",
        "Slow request",
    ):
        assert f'|= "{message}"' in "\n".join(queries)
    level_queries = [q for q in queries if "${level" in q]
    assert level_queries, "a panel filtered by the level variable"
    for query in queries:
        assert query.count("{") >= query.count("${") + 1, query
        assert f'namespace="{ops.NAMESPACE}"' in query, query
        assert f'app="{ops.APP}"' in query, query


# ----------------------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------------------
DOCKERFILE = ops.OPS / "Dockerfile"
SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|PEPPER|API_KEY|DATABASE_URL|REDIS_URL|BOOTSTRAP|PRIVATE", re.IGNORECASE
)


def docker_stages() -> list[tuple[str, str, list[dockerfile.Command]]]:
    """(image, stage name, instructions) of each stage, global ARG defaults substituted in FROM."""
    args: dict[str, str] = {}
    stages: list[tuple[str, str, list[dockerfile.Command]]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            image, *rest = command.value
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
            name = rest[1] if len(rest) == 2 and rest[0].upper() == "AS" else ""
            stages.append((image, name, []))
        elif not stages and command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
        elif stages:
            stages[-1][2].append(command)
    return stages


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    stages = docker_stages()
    assert len(stages) >= 2
    builder_image, builder_name, builder = stages[0]
    runtime_image, _, runtime = stages[-1]
    assert builder_name == "builder"
    assert builder_image.startswith("python:3.11")
    assert runtime_image.startswith("python:3.11")
    assert "slim" in runtime_image
    runs = " ".join(" ".join(c.value) for c in builder if c.cmd == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the builder installs the project from pyproject.toml"
    copied = {src for c in builder if c.cmd == "COPY" for src in c.value[:-1]}
    assert {"pyproject.toml", "src"} <= copied
    assert any(c.cmd == "COPY" and "--from=builder" in c.flags for c in runtime)
    assert not any(c.cmd == "RUN" and "pip install" in " ".join(c.value) for c in runtime)


def test_dockerfile_runtime_contract() -> None:
    _, _, runtime = docker_stages()[-1]
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    _, pod, _ = deployment_container()
    assert user == str(pod["securityContext"]["runAsUser"]), "numeric USER = the pod's runAsUser"
    env: dict[str, str] = {}
    for command in runtime:
        if command.cmd == "ENV":
            env.update(ops.env_pairs(command.value))
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "8000"
    exposed = [port for c in runtime if c.cmd == "EXPOSE" for port in c.value]
    assert exposed == ["8000"]
    (cmd,) = [c for c in runtime if c.cmd == "CMD"]
    assert cmd.json
    assert list(cmd.value) == ["pricer", "serve"]
    assert not any(c.cmd == "ENTRYPOINT" for c in runtime)
    pyproject = (ops.REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^pricer = "pricer\.cli:main"$', pyproject, re.M), "CMD's console script exists"
    (health,) = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert health.json
    assert health.value[0] == "CMD"
    probe = " ".join(health.value[1:])
    assert health.value[1] == "python"
    assert "urllib.request" in probe
    assert "/health" in probe
    installs = " ".join(" ".join(c.value) for c in runtime if c.cmd == "RUN")
    assert re.search(r"apt-get install .*\bcurl\b", installs), "the runbook's kubectl exec ... curl checks"


def test_dockerfile_holds_no_secrets() -> None:
    for _, _, commands in docker_stages():
        for command in commands:
            if command.cmd in {"ENV", "ARG"}:
                names = (
                    ops.env_pairs(command.value)
                    if command.cmd == "ENV"
                    else {v.partition("=")[0]: v.partition("=")[2] for v in command.value}
                )
                assert not [n for n in names if SECRET_NAME.search(n)], command.original
            if command.cmd in {"COPY", "ADD"}:
                for source in command.value[:-1]:
                    assert not re.search(r"\.env$|\.pem$|\.key$|id_rsa|\.demo-keys", source), command.original
            assert not re.search(r"--mount=type=secret|REPLACE_ME", command.original)


def test_dockerignore_keeps_only_the_build_inputs() -> None:
    ignore = (ops.OPS / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    patterns = [line.strip() for line in ignore.splitlines() if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        src.rstrip("/")
        for _, _, commands in docker_stages()
        for c in commands
        if c.cmd == "COPY" and not c.flags
        for src in c.value[:-1]
    }
    assert copied <= kept, "every file the build copies passes the ignore file"
    assert {"**/.demo-keys.env", "**/__pycache__"} <= set(patterns)
