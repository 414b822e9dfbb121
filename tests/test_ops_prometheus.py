"""promtool over config/prometheus: the scrape config, the alert rules and their unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO
from tests.dashboard import Query, dashboard_queries, metric_names, uses_gpu_metrics

PROMETHEUS_DIR = REPO / "config" / "prometheus"
ALERTS = ("GpuUtilizationHigh", "ApiErrorRateHigh", "ApiKeyExpiringSoon", "TritonDown", "AuditWriteErrors")
GPU_QUERY_TESTS = "dashboard_gpu_test.yml"
# The labels a scraped Triton GPU series has: gpu_uuid from Triton, job and instance from the scrape.
TRITON_GPU_LABELS = frozenset({"job", "instance", "gpu_uuid"})
# promtool's samples are a minute apart: Grafana's windows, widened to hold several of them.
PROMTOOL_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "10m"}
_SERIES = re.compile(r"^([A-Za-z_:][\w:]*)\{(.*)\}$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: scripts/system-packages installs Debian's prometheus package"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout + out.stderr   # it follows rule_files too


def test_check_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout + out.stderr


def test_alert_unit_tests_pass() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_has_severity_summary_runbook_and_unit_tests() -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert [r["alert"] for r in rules] == list(ALERTS)
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["runbook"].strip(), rule["alert"]
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for name in ALERTS:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays silent"


def test_design_thresholds() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert rules["GpuUtilizationHigh"]["expr"].rstrip().endswith("> 0.9")
    assert rules["GpuUtilizationHigh"]["for"] == "5m"
    assert rules["ApiErrorRateHigh"]["expr"].rstrip().endswith("> 0.05")
    assert "seekgate_keys_expiring" in rules["ApiKeyExpiringSoon"]["expr"]   # the 72 h window is the gauge's


def test_a_broken_unit_test_is_caught(tmp_path: Path) -> None:
    # The unit tests can fail: a case expecting the wrong severity makes promtool exit non-zero.
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    doc["tests"][0]["alert_rule_test"][1]["exp_alerts"][0]["exp_labels"]["severity"] = "critical"
    (tmp_path / "broken_test.yml").write_text(yaml.safe_dump(doc))
    out = promtool("test", "rules", "broken_test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr


def test_prometheus_adapter_query_is_valid_promql(tmp_path: Path) -> None:
    # The adapter fills in its template; promtool then parses the query as a recording rule would.
    config = yaml.safe_load(next(d for d in yaml.safe_load_all((REPO / "deploy/k8s/prometheus-adapter.yaml")
                                                                .read_text()))["data"]["config.yaml"])
    rule = config["rules"][0]
    query = (rule["metricsQuery"].replace("<<.GroupBy>>", "pod")
             .replace("<<.Series>>", "nv_inference_queue_duration_us")
             .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"seekgate-a|seekgate-b"'))
    (tmp_path / "adapter.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "adapter", "rules": [{"record": "pod:triton_queue_time_us", "expr": query}]}]}))
    out = promtool("check", "rules", "adapter.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert rule["name"]["as"] == "triton_queue_time_us"


# ------------------------------------------------------------------ the dashboard's GPU queries

def parse_series(text: str) -> tuple[str, dict[str, str]]:
    """`name{a="b", ...}` as promtool's input_series and exp_samples write it."""
    m = _SERIES.match(text.strip())
    assert m, text
    return m.group(1), dict(_LABEL.findall(m.group(2)))


def gpu_dashboard_queries() -> list[Query]:
    return [q for q in dashboard_queries() if uses_gpu_metrics(q.expr)]


def gpu_query_cases() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(test group, promql_expr_test case) for every case in the GPU query tests."""
    doc = yaml.safe_load((PROMETHEUS_DIR / GPU_QUERY_TESTS).read_text())
    return [(group, case) for group in doc["tests"] for case in group.get("promql_expr_test", [])]


def test_dashboard_gpu_queries_pass_promtool() -> None:
    out = promtool("test", "rules", GPU_QUERY_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_dashboard_gpu_query_has_a_promtool_case() -> None:
    queries = gpu_dashboard_queries()
    read = set().union(*(metric_names(q.expr) for q in queries))
    assert {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"} <= read
    cases = {case["expr"].strip(): (group, case) for group, case in gpu_query_cases()}
    wanted = {q.with_variables(PROMTOOL_GRAFANA_VARIABLES): q for q in queries}
    assert set(wanted) - set(cases) == set(), "dashboard GPU queries without a promtool case"
    assert set(cases) - set(wanted) == set(), "promtool cases for queries no dashboard has"
    for expr, query in wanted.items():
        group, case = cases[expr]
        where = f"{query.dashboard} panel {query.panel!r}: {expr}"
        assert case["exp_samples"], f"{where}: a case expecting no data proves nothing"
        # Fed what a real scrape of Triton gives, and nothing more.
        gpu_inputs = [parse_series(s["series"]) for s in group["input_series"]
                      if uses_gpu_metrics(s["series"])]
        assert gpu_inputs, where
        for name, labels in gpu_inputs:
            assert set(labels) == TRITON_GPU_LABELS, f"{where}: input {name}{labels} lacks Triton's label set"
        # What the legend shows is in every result series.
        for sample in case["exp_samples"]:
            _, labels = parse_series(sample["labels"])
            assert query.legend_labels() <= set(labels), f"{where}: legend {query.legend!r} vs {labels}"


def test_a_wrong_gpu_query_expectation_is_caught(tmp_path: Path) -> None:
    doc = yaml.safe_load((PROMETHEUS_DIR / GPU_QUERY_TESTS).read_text())
    sample = doc["tests"][0]["promql_expr_test"][0]["exp_samples"][0]
    sample["value"] = float(sample["value"]) + 0.01
    (tmp_path / "broken_test.yml").write_text(yaml.safe_dump(doc))
    out = promtool("test", "rules", "broken_test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr


# ------------------------------------------------------------------ alerts_ops.yml (the deployment's own alerts)

OPS_ALERTS = ("SeekgateDown", "SeekgateTargetMissing", "PolicyReloadFailing", "AuditQueueBacklog",
              "ContainerRestarting", "HpaAtMaxReplicas", "FluentBitDown", "AuditShippingFailing")


def test_ops_alert_unit_tests_pass() -> None:
    out = promtool("test", "rules", "alerts_ops_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_ops_alert_has_a_firing_case_and_a_rule() -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS_DIR / "alerts_ops.yml").read_text())["groups"] for r in g["rules"]]
    assert [r["alert"] for r in rules] == list(OPS_ALERTS)
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["runbook"].strip(), rule["alert"]
    cases = [c for t in yaml.safe_load((PROMETHEUS_DIR / "alerts_ops_test.yml").read_text())["tests"]
             for c in t["alert_rule_test"]]
    for name in OPS_ALERTS:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays silent"


def test_a_broken_ops_unit_test_is_caught(tmp_path: Path) -> None:
    # The target-vanished case can fail: expecting SeekgateTargetMissing while the target is present.
    shutil.copy(PROMETHEUS_DIR / "alerts_ops.yml", tmp_path / "alerts_ops.yml")
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts_ops_test.yml").read_text())
    case = next(t for t in doc["tests"] if any(c["alertname"] == "SeekgateTargetMissing" for c in t["alert_rule_test"]))
    firing = next(c for c in case["alert_rule_test"] if c["exp_alerts"])
    case["alert_rule_test"][0]["exp_alerts"] = firing["exp_alerts"]   # at 3m the target is still there
    (tmp_path / "broken_test.yml").write_text(yaml.safe_dump(doc))
    out = promtool("test", "rules", "broken_test.yml", cwd=tmp_path)
    assert out.returncode != 0 and "SeekgateTargetMissing" in out.stdout + out.stderr
