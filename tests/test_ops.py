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
                assert f'app="{ops.APP}"' in series["series"], series["series"]
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
            assert f'app="{ops.APP}"' in matchers, f"{where}: {name} not scoped to app={ops.APP}"


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
    assert data["CALCULATION_SERVICE_URL"] == data["DATA_SERVICE_URL"] == ""


def test_secret_template_has_placeholders_only() -> None:
    secret = ops.k8s_object("Secret", "api-gateway-secrets")
    assert "data" not in secret
    assert set(secret["stringData"]) == ops.SECRET_ENV_VARS
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}


def test_configmap_starts_the_engine_settings() -> None:
    """The ConfigMap's values, with the Secret's keys, are accepted by the engine's own settings parser."""
    env = {
        **configmap(),
        "DATABASE_URL": "postgresql://pricer:pw@postgres.borrow-rate-engine.svc:5432/pricer",
        "REDIS_URL": "redis://redis-master.borrow-rate-engine.svc:6379/0",
        "JWT_SECRET_KEY": "k" * 48,
        "API_KEY_PEPPER": "p" * 48,
    }
    settings = load_settings(env)
    _, _, container = deployment_container()
    assert settings.environment is Environment.PROD
    assert settings.host == "0.0.0.0"
    assert settings.port == container["ports"][0]["containerPort"]
    assert settings.shutdown_drain_seconds == 5
    assert settings.expected_replicas == 3
    assert settings.enable_authentication
    assert settings.enable_rate_limiting
    assert settings.calculation_service_url is None
    assert settings.data_service_url is None
    assert settings.audit_spool_dir == env["AUDIT_SPOOL_DIR"]
    assert settings.seed_demo_data is False
    assert settings.demo_keys_file is None


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
    missing = (ops.ENGINE_COUNTERS | histograms | {"process_resident_memory_bytes"}) - engine
    assert missing == set(), "engine metrics shown on no dashboard"
    assert "kube_horizontalpodautoscaler_status_current_replicas" in used


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
