"""promtool over config/prometheus: the scrape config, the alert rules and their unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import REPO

PROMETHEUS_DIR = REPO / "config" / "prometheus"
ALERTS = ("GpuUtilizationHigh", "ApiErrorRateHigh", "ApiKeyExpiringSoon", "TritonDown", "AuditWriteErrors")


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
             .replace("<<.Series>>", "nv_gpu_utilization")
             .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"seekgate-a|seekgate-b"'))
    (tmp_path / "adapter.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "adapter", "rules": [{"record": "pod:triton_gpu_utilization", "expr": query}]}]}))
    out = promtool("check", "rules", "adapter.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert rule["name"]["as"] == "triton_gpu_utilization"
