"""k8s/monitoring: the monitors match the Prometheus Operator's CRDs, the dashboard asks only for real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from aigc_dist.metrics import SPECS

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"
CRDS = Path(__file__).resolve().parent / "schemas" / "prometheus-operator"
CRD_FILES = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
             "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml"}
# PromQL words that look like names but are not metrics.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                "bool", "inf", "nan"}
# Grafana's variables, as Prometheus needs them to run a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$run": ".*"}


def known_metric_names() -> set[str]:
    """Every series name aigc-dist exports, as Prometheus stores it, plus Prometheus's own `up`."""
    names = {"up"}
    for spec in SPECS.values():
        suffixes = ("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",)
        names |= {spec.prometheus_name + suffix for suffix in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (selectors and `__name__` matchers)."""
    names = {name for match in re.finditer(r'__name__\s*=~?\s*"([^"]*)"', expr) for name in match[1].split("|")}
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)  # label matchers, ranges
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)  # label lists
    words = re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", bare)
    return names | {w for w in words if w.lower() not in PROMQL_WORDS}


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_queries() -> list[str]:
    queries = [t["expr"] for panel in dashboard()["panels"] for t in panel.get("targets", [])]
    # A variable's label_values(selector, label) is Grafana's; the selector inside it is PromQL.
    variables = [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return queries + [re.fullmatch(r"label_values\((.*), *\w+\)", v)[1] for v in variables]


def docs_queries() -> list[str]:
    """Every line of the ```promql blocks in docs/metrics.md (one expression per line)."""
    text = (REPO / "docs" / "metrics.md").read_text()
    blocks = re.findall(r"```promql\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_metric_name_extraction_finds_selectors_and_ignores_functions_and_labels():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(ray_aigc_request_latency_seconds_bucket'
            '{run=~"$run"}[5m]))) / ignoring (status) group_left sum(up) + on() vector(1) * foo_total')
    assert metric_names(expr) == {"ray_aigc_request_latency_seconds_bucket", "up", "foo_total"}
    assert metric_names('{__name__=~"a_total|b_ratio"}') == {"a_total", "b_ratio"}


def test_dashboard_parses_and_every_query_names_only_metrics_that_exist():
    board = dashboard()
    assert board["uid"] == "aigc-dist"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    known = known_metric_names()
    used: set[str] = set()
    for query in dashboard_queries():
        names = metric_names(query)
        assert names and names <= known, f"{query} names unknown metrics {sorted(names - known)}"
        used |= names
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("rows", "tokens", "latency", "error", "progress", "eta", "loss", "step time"):
        assert topic in titles, topic
    unused = {s.prometheus_name for s in SPECS.values()} - {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert not unused, f"metrics on no panel: {sorted(unused)}"


def test_docs_queries_name_only_metrics_that_exist():
    queries = docs_queries()
    assert len(queries) >= 6  # rows/s, tokens/s, p50/p99 latency, error ratio, ETA at least
    known = known_metric_names()
    for query in queries:
        names = metric_names(query)
        assert names and names <= known, f"docs/metrics.md: {query} names unknown metrics {sorted(names - known)}"


@pytest.mark.slow
def test_every_dashboard_and_docs_query_is_valid_promql(prometheus):
    """The real Prometheus parses and runs each query (with Grafana's variables filled in)."""
    import urllib.error

    for query in dashboard_queries() + docs_queries():
        runnable = query
        for variable, value in GRAFANA_VARIABLES.items():
            runnable = runnable.replace(variable, value)
        try:
            prometheus.query(runnable)
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Prometheus rejects {runnable}: {exc.read().decode()}")


def _built() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomization (installed by .ci/run and make test)"
    out = subprocess.run([kubectl, "kustomize", str(MONITORING)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_kustomization_builds_the_monitors_and_a_dashboard_configmap_grafana_loads():
    docs = _built()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "PodMonitor", "PodMonitor"]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["aigc-dist.json"]) == dashboard()
    monitors = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodMonitor"}
    ray_nodes = monitors["aigc-ray-nodes"]
    assert ray_nodes["selector"]["matchExpressions"][0]["values"] == ["head", "worker"]
    assert [e["port"] for e in ray_nodes["podMetricsEndpoints"]] == ["metrics"]  # KubeRay's name for it
    assert [e["port"] for e in monitors["aigc-job-drivers"]["podMetricsEndpoints"]] == ["driver-metrics"]


def test_monitors_match_the_prometheus_operator_crd_schemas():
    for doc in _built():
        if doc["kind"] not in CRD_FILES:
            continue
        crd = yaml.safe_load((CRDS / CRD_FILES[doc["kind"]]).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1])
        jsonschema.validate(doc, version["schema"]["openAPIV3Schema"])
