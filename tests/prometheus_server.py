"""A private Prometheus (`/usr/bin/prometheus`) on a free loopback port, scraping one engine.

The scrape job reuses the relabelling of ops/prometheus/prometheus.yml: the target is given with the
`__meta_kubernetes_*` labels Kubernetes pod discovery would attach (namespace, `app` label, pod name,
the prometheus.io annotations), so the `namespace`/`app` labels the runbook's queries filter on come
from the example config's own rules, as they would in the cluster. Each instance is its own process in
its own directory, stopped by its own process id.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import free_port

OPS_PROMETHEUS_CONFIG = Path(__file__).resolve().parent.parent / "ops" / "prometheus" / "prometheus.yml"
NAMESPACE = "borrow-rate-engine"
APP = "api-gateway"
POD = "api-gateway-7d9c6b5f4-test0"


def example_relabel_configs() -> list[dict[str, Any]]:
    """The relabel rules of the example config's gateway job."""
    config = yaml.safe_load(OPS_PROMETHEUS_CONFIG.read_text())
    jobs = [job for job in config["scrape_configs"] if job.get("relabel_configs")]
    assert jobs, f"no scrape job with relabel_configs in {OPS_PROMETHEUS_CONFIG}"
    rules: list[dict[str, Any]] = jobs[0]["relabel_configs"]
    return rules


def scrape_config(target_host: str, target_port: int, metrics_path: str = "/metrics") -> dict[str, Any]:
    discovered = {
        # What kubernetes_sd_configs (role: pod) would attach to the gateway pod's target.
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": POD,
        "__meta_kubernetes_pod_label_app": APP,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(target_port),
        "__meta_kubernetes_pod_annotation_prometheus_io_path": metrics_path,
    }
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "borrow-rate-engine/api-gateway",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                # The pod IP with a container port, as discovery gives it; the annotation picks the port.
                "static_configs": [{"targets": [f"{target_host}:9999"], "labels": discovered}],
                "relabel_configs": example_relabel_configs(),
            }
        ],
    }


class PrivatePrometheus:
    def __init__(self, directory: Path, target_host: str, target_port: int) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus is not on PATH (Debian: apt-get install -y prometheus)")
        self._exe = exe
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = directory / "prom.yml"
        self.config_path.write_text(yaml.safe_dump(scrape_config(target_host, target_port), sort_keys=False))
        self.log_path = directory / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 20.0) -> PrivatePrometheus:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self._exe,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus on port {self.port} did not become ready:\n{self.log()}")

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.process = None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of `promql` at now, through the HTTP API (raises on an API error)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        body = response.json()
        assert response.status_code == 200, (promql, body)
        assert body["status"] == "success", (promql, body)
        assert body["data"]["resultType"] == "vector", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, promql: str) -> list[float]:
        return [float(sample["value"][1]) for sample in self.query(promql)]

    def wait_for(self, promql: str, timeout: float = 10.0) -> list[float]:
        """Values of `promql` once it returns at least one finite value."""
        deadline = time.monotonic() + timeout
        values: list[float] = []
        while time.monotonic() < deadline:
            values = self.values(promql)
            if values and all(math.isfinite(value) for value in values):
                return values
            time.sleep(0.2)
        raise AssertionError(f"{promql!r} gave no finite value within {timeout} s: {values}\n{self.log()}")

    def targets(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()
        active: list[dict[str, Any]] = body["data"]["activeTargets"]
        return active
