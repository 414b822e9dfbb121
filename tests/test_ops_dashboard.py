"""The dashboards show every panel issue 8 asks for, recognised by what its queries compute.

A title proves nothing: each requirement below looks for the metric, the grouping, the
quantiles or the ratio that make a panel that panel. Whether the queries have data is
test_ops_live's job (and test_ops_prometheus' for the GPU ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.dashboard import (
    Panel,
    dashboard_panels,
    dashboard_queries,
    division_operands,
    equality_matchers,
    grouping_labels,
    metric_name,
    quantiles,
    rated,
    selectors,
)

PERCENTILES = {0.5, 0.95, 0.99}


def selects(expr: str, metric: str, **matchers: str) -> bool:
    """Some selector of the expression reads `metric` with (at least) these label="value" matchers."""
    return any(metric_name(s) == metric and matchers.items() <= equality_matchers(s).items()
               for s in selectors(expr))


def counter_rate_by(metric: str, *labels: str) -> Callable[[Panel], bool]:
    """A rate of the counter `metric` broken down by `labels`."""
    return lambda panel: any(rated(q.expr, metric) and set(labels) <= grouping_labels(q.expr)
                             for q in panel.queries)


def percentiles_of(histogram: str) -> Callable[[Panel], bool]:
    """p50, p95 and p99 of `histogram`, each a histogram_quantile over its buckets by `le`, in seconds."""
    def check(panel: Panel) -> bool:
        found = set()
        for q in panel.queries:
            if rated(q.expr, histogram + "_bucket") and "le" in grouping_labels(q.expr):
                found |= quantiles(q.expr)
        return PERCENTILES <= found and panel.unit == "s"
    return check


def ratio(numerator: Callable[[str], bool], denominator: Callable[[str], bool],
          *rest: str) -> Callable[[Panel], bool]:
    """Some query is `numerator / denominator` (then `/ rest...`, a unit conversion)."""
    def check(panel: Panel) -> bool:
        for q in panel.queries:
            ops = division_operands(q.expr)
            if len(ops) == 2 + len(rest) and numerator(ops[0]) and denominator(ops[1]) \
                    and tuple(ops[2:]) == rest:
                return True
        return False
    return check


def error_rate(panel: Panel) -> bool:
    # Failures over served requests, as the ApiErrorRateHigh alert: refusals (status="denied") are in
    # neither part, so the denominator counts the requests served (status="allowed") and no refusal.
    # What it computes, value for value, is test_error_rate_panel_computes_the_alerts_ratio's.
    return ratio(lambda num: rated(num, "seekgate_requests_total")
                 and selects(num, "seekgate_requests_total", status="error")
                 and not selects(num, "seekgate_requests_total", status="allowed"),
                 lambda den: rated(den, "seekgate_requests_total")
                 and selects(den, "seekgate_requests_total", status="allowed")
                 and not selects(den, "seekgate_requests_total", status="denied"))(panel) \
        and panel.unit == "percentunit"


def gauge(metric: str, **matchers: str) -> Callable[[Panel], bool]:
    return lambda panel: any(selects(q.expr, metric, **matchers) for q in panel.queries)


def gpu_memory(panel: Panel) -> bool:
    return (gauge("nv_gpu_memory_used_bytes", job="triton")(panel)
            and gauge("nv_gpu_memory_total_bytes", job="triton")(panel) and panel.unit == "bytes")


REQUIRED: dict[str, Callable[[Panel], bool]] = {
    "request rate by model and status": counter_rate_by("seekgate_requests_total", "model", "status"),
    "error rate": error_rate,
    "p50/p95/p99 latency": percentiles_of("seekgate_request_duration_seconds"),
    "p50/p95/p99 upstream latency": percentiles_of("seekgate_upstream_duration_seconds"),
    "seekgate overhead": percentiles_of("seekgate_overhead_seconds"),
    "auth failures by reason": counter_rate_by("seekgate_auth_failures_total", "reason"),
    "denials by rule": counter_rate_by("seekgate_policy_denials_total", "rule"),
    "tokens in/out by model": counter_rate_by("seekgate_tokens_total", "model", "direction"),
    "tokens in/out by key tier": counter_rate_by("seekgate_tokens_total", "tier", "direction"),
    # The 72 h window is the gauge's own (http_server.watch_expiring).
    "keys expiring within 72 h": gauge("seekgate_keys_expiring"),
    "audit queue depth": gauge("seekgate_audit_queue_depth"),
    "Triton up": gauge("up", job="triton"),
    # Triton reports utilisation as 0.0-1.0.
    "GPU utilisation": lambda p: gauge("nv_gpu_utilization", job="triton")(p) and p.unit == "percentunit",
    "GPU memory": gpu_memory,
    # Triton's queue time is a cumulative microsecond counter: per request, in seconds.
    "queue time": ratio(lambda n: rated(n, "nv_inference_queue_duration_us"),
                        lambda d: rated(d, "nv_inference_request_success"), "1e6"),
    "batch efficiency (inferences per execution)": ratio(lambda n: rated(n, "nv_inference_count"),
                                                         lambda d: rated(d, "nv_inference_exec_count")),
    # The model's own metrics (pb_utils.MetricFamily in triton_models/deepseek/1/model.py).
    "running sequences": gauge("deepseek_running_sequences", job="triton"),
    "waiting requests": gauge("deepseek_waiting_requests", job="triton"),
    "time to first token": percentiles_of("deepseek_time_to_first_token_seconds"),
    "tokens generated by model": counter_rate_by("deepseek_generated_tokens_total", "model"),
    "tokens per decode step": ratio(lambda n: rated(n, "deepseek_generated_tokens_total"),
                                    lambda d: rated(d, "deepseek_decode_steps_total")),
    "KV cache use": lambda p: gauge("deepseek_kv_cache_usage_ratio", job="triton")(p) and p.unit == "percentunit",
    # The shared limiter (redis_limiter.py): whether Redis counts, and the corrections it left out.
    "shared limiter backend": lambda p: gauge("seekgate_limits_backend_up")(p) and gauge("seekgate_limits_local")(p),
    "settlements dropped by reason": counter_rate_by("seekgate_limits_settlements_dropped_total", "reason"),
}


def unmet(panels: list[Panel]) -> list[str]:
    return [name for name, check in REQUIRED.items() if not any(check(p) for p in panels)]


def with_queries_replaced(panels: list[Panel], old: str, new: str) -> list[Panel]:
    """The dashboards with `old` replaced by `new` in every query; the replacement must change one."""
    out = [dataclasses.replace(p, queries=tuple(dataclasses.replace(q, expr=q.expr.replace(old, new))
                                                for q in p.queries)) for p in panels]
    assert out != panels, f"{old!r} is in no query"
    return out


def test_every_required_panel_is_on_a_dashboard() -> None:
    assert unmet(dashboard_panels()) == []


def test_titles_do_not_matter() -> None:
    panels = [dataclasses.replace(p, title=f"panel {i}") for i, p in enumerate(dashboard_panels())]
    assert unmet(panels) == []


@pytest.mark.parametrize(("requirement", "old", "new"), [
    ("request rate by model and status", "by (model, status, code)", "by (model, code)"),
    ("error rate", 'status="error"', 'status="denied"'),
    ("p50/p95/p99 latency", "histogram_quantile(0.99, sum by (le) (rate(seekgate_request_duration",
     "histogram_quantile(0.9, sum by (le) (rate(seekgate_request_duration"),
    ("p50/p95/p99 upstream latency", "seekgate_upstream_duration_seconds_bucket", "seekgate_upstream_duration_seconds_count"),
    ("seekgate overhead", "seekgate_overhead_seconds_bucket", "seekgate_request_duration_seconds_bucket"),
    ("auth failures by reason", "by (reason) (rate(seekgate_auth_failures_total", "(rate(seekgate_auth_failures_total"),
    ("denials by rule", "seekgate_policy_denials_total", "seekgate_auth_failures_total"),
    ("tokens in/out by model", "by (model, direction)", "by (model)"),
    ("tokens in/out by key tier", "by (tier, direction)", "by (tier)"),
    ("keys expiring within 72 h", "seekgate_keys_expiring", "seekgate_keys_active"),
    ("audit queue depth", "seekgate_audit_queue_depth", "seekgate_audit_write_errors_total"),
    ("Triton up", 'up{job="triton"}', 'up{job="seekgate"}'),
    ("GPU utilisation", "nv_gpu_utilization", "nv_gpu_power_usage"),
    ("GPU memory", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes"),
    ("queue time", "nv_inference_request_success", "nv_inference_count"),
    ("queue time", " / 1e6", ""),
    ("batch efficiency (inferences per execution)", "nv_inference_exec_count", "nv_inference_request_success"),
    ("waiting requests", "deepseek_waiting_requests", "deepseek_running_requests"),
    ("time to first token", "deepseek_time_to_first_token_seconds_bucket", "deepseek_time_to_first_token_seconds_count"),
    ("tokens per decode step", "deepseek_decode_steps_total", "deepseek_generated_tokens_total"),
    ("KV cache use", "deepseek_kv_cache_usage_ratio", "deepseek_kv_cache_used"),
    # The old error rate: every request, refusals included, in the denominator.
    ("error rate", 'job="seekgate", status="allowed", code!~"5.."', 'job="seekgate"'),
    ("shared limiter backend", "seekgate_limits_local", "seekgate_limits_backend_up"),
    ("settlements dropped by reason", "sum by (reason) (increase(seekgate_limits_settlements_dropped_total",
     "sum(increase(seekgate_limits_settlements_dropped_total"),
])
def test_a_panel_that_computes_something_else_is_missed(requirement: str, old: str, new: str) -> None:
    # The checks look at what a query computes: change that and the requirement is unmet.
    assert requirement in REQUIRED
    assert unmet(with_queries_replaced(dashboard_panels(), old, new)) == [requirement]


def test_panel_units_count() -> None:
    # Units are part of some requirements (a 0-1 utilisation drawn as a raw number reads as 1%).
    panels = dashboard_panels()
    gpu = next(p for p in panels if REQUIRED["GPU utilisation"](p))
    assert not REQUIRED["GPU utilisation"](dataclasses.replace(gpu, unit="short"))


def test_selects_reads_matchers() -> None:
    expr = 'sum(rate(seekgate_requests_total{job="seekgate", status="error"}[5m])) / sum(rate(x[5m]))'
    assert selects(expr, "seekgate_requests_total", status="error")
    assert not selects(expr, "seekgate_requests_total", status="denied")
    assert division_operands(expr) == [expr.split(" / ")[0], "sum(rate(x[5m]))"]
    assert division_operands("a / (b / c) / 1e6") == ["a", "(b / c)", "1e6"]


# Mixes of seekgate_requests_total per minute, and the failure rate of served requests in each.
SERVED_MIXES = [
    # 100 served a minute, 10 failed (Triton's 503, seekgate's 504, a stream broken after its 200),
    # among 2000 refusals and clients that hung up (499) or never sent their request whole (408).
    ({("allowed", "200"): 90, ("error", "503"): 5, ("error", "504"): 3, ("error", "200"): 2,
      ("error", "499"): 30, ("error", "408"): 7, ("denied", "401"): 1500, ("denied", "429"): 500}, 0.1),
    # A replica whose Triton never came up: no status="allowed" series at all, everything it served failed.
    ({("error", "503"): 20, ("denied", "401"): 500}, 1.0),
]


def test_error_rate_panel_computes_the_alerts_ratio(tmp_path: Path) -> None:
    # The panel an operator looks at when ApiErrorRateHigh pages must draw the number the alert
    # judged: evaluated by promtool on the same series, the panel's query and the alert's ratio agree,
    # and both are the share of served requests that failed.
    from tests.test_ops_prometheus import PROMETHEUS_DIR, PROMTOOL_GRAFANA_VARIABLES, promtool

    # The dashboard's error ratio: the query whose numerator reads status="error".
    query = next(q for q in dashboard_queries()
                 if selects(division_operands(q.expr)[0], "seekgate_requests_total", status="error")
                 ).with_variables(PROMTOOL_GRAFANA_VARIABLES)
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alert = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "ApiErrorRateHigh")
    alert_ratio = alert["expr"].strip().removesuffix("> 0.05").strip()
    assert alert_ratio != alert["expr"].strip()

    tests = []
    for mix, served_failed in SERVED_MIXES:
        series = [{"series": f'seekgate_requests_total{{job="seekgate", instance="a:8002", model="deepseek", '
                             f'status="{status}", code="{code}"}}', "values": f"0+{per_minute}x15"}
                  for (status, code), per_minute in mix.items()]
        # `< bool`: 1 when the two agree (to rounding), 0 when not; promtool compares values exactly.
        cases = [{"expr": f"abs(({query}) - ({alert_ratio})) < bool 1e-9", "eval_time": "10m",
                  "exp_samples": [{"labels": "{}", "value": 1}]},
                 {"expr": f"abs(({query}) - {served_failed}) < bool 1e-9", "eval_time": "10m",
                  "exp_samples": [{"labels": "{}", "value": 1}]}]
        tests.append({"interval": "1m", "input_series": series, "promql_expr_test": cases})
    (tmp_path / "empty.yml").write_text("groups: []\n")
    (tmp_path / "panel_test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["empty.yml"], "evaluation_interval": "1m", "tests": tests}))
    out = promtool("test", "rules", "panel_test.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
