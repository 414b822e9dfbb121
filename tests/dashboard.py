"""The provisioned Grafana dashboards as data: their panels, their PromQL, and what each query selects.

Shared by the live test (every query has data), the promtool test of the GPU queries and the
required-panels test, so that all three read the dashboards the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import REPO

DASHBOARD_DIR = REPO / "config" / "grafana" / "dashboards"

# Triton's GPU metrics, as its metrics documentation names them (docs/user_guide/metrics.md,
# "GPU Metrics"): exported per GPU (label gpu_uuid) only where Triton sees a GPU.
TRITON_GPU_METRICS = frozenset({
    "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption",
})

# Grafana's own variables, replaced as Grafana would for a short range of 1 s scrapes.
GRAFANA_VARIABLES: Mapping[str, str] = {"$__rate_interval": "30s", "$__interval": "1s", "$__range": "5m"}

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "inf", "nan"})
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w.\"])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Query:
    """One panel target: where it is, its raw expression and its legend."""

    dashboard: str
    panel: str
    expr: str
    legend: str

    def with_variables(self, values: Mapping[str, str] = GRAFANA_VARIABLES) -> str:
        """The expression Prometheus receives once Grafana has filled in its variables."""
        expr = self.expr
        for var, value in values.items():
            expr = expr.replace(var, value)
        return expr

    def legend_labels(self) -> set[str]:
        """The labels the legend shows (`{{label}}`): the query's result must carry them."""
        return set(_LEGEND_LABEL.findall(self.legend))


@dataclass(frozen=True)
class Panel:
    """One panel: its title, the unit its values are drawn in, and its queries."""

    dashboard: str
    title: str
    unit: str
    queries: tuple[Query, ...]


def dashboard_files() -> list[Path]:
    files = sorted(DASHBOARD_DIR.glob("*.json"))
    assert files, f"no dashboard in {DASHBOARD_DIR}"
    return files


def _panel_json(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too (Grafana nests them under the row)."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_panels() -> list[Panel]:
    """Every panel with at least one query, of every provisioned dashboard."""
    out = []
    for path in dashboard_files():
        for panel in _panel_json(json.loads(path.read_text())):
            queries = tuple(Query(path.name, panel["title"], t["expr"], t.get("legendFormat", ""))
                            for t in panel.get("targets", []))
            if queries:
                unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
                out.append(Panel(path.name, panel["title"], unit, queries))
    return out


def dashboard_queries() -> list[Query]:
    """Every target of every panel of every provisioned dashboard."""
    return [q for panel in dashboard_panels() for q in panel.queries]


def selectors(expr: str) -> list[str]:
    """The vector selectors of a PromQL expression (`name{matchers}`), functions and keywords left out."""
    rest = re.sub(r"\[[^\]]*\]", "", _GROUPING.sub("", expr))
    found = []
    for m in _SELECTOR.finditer(rest):
        name, matchers = m.group(1), m.group(2) or ""
        if name.lower() in _KEYWORDS or (not matchers and rest[m.end():].lstrip().startswith("(")):
            continue
        found.append(name + matchers)
    return found


def grouping_labels(expr: str) -> set[str]:
    return {lbl.strip() for m in _GROUPING.finditer(expr) for lbl in m.group(2).split(",") if lbl.strip()}


def metric_name(selector: str) -> str:
    return selector.split("{", 1)[0]


def metric_names(expr: str) -> set[str]:
    return {metric_name(s) for s in selectors(expr)}


def uses_gpu_metrics(expr: str) -> bool:
    return any(name.startswith("nv_gpu_") or name == "nv_energy_consumption" for name in metric_names(expr))


_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_QUANTILE = re.compile(r"\bhistogram_quantile\(\s*([0-9.]+)\s*,")


def equality_matchers(selector: str) -> dict[str, str]:
    """The `label="value"` matchers of one selector (regex and negative matchers left out)."""
    _, _, body = selector.partition("{")
    return {label: value for label, op, value in _MATCHER.findall(body) if op == "="}


def quantiles(expr: str) -> set[float]:
    """The φ of every histogram_quantile() in the expression."""
    return {float(q) for q in _QUANTILE.findall(expr)}


def division_operands(expr: str) -> list[str]:
    """The operands of the expression's top-level `/` chain: `a / b / c` -> [a, b, c]; no `/` -> [expr]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "/" and depth == 0:
            parts.append(expr[start:i].strip())
            start = i + 1
    parts.append(expr[start:].strip())
    return parts


def rated(expr: str, metric: str) -> bool:
    """The counter `metric` is read through rate() or increase(), never as a raw total."""
    return re.search(rf"\b(?:rate|irate|increase)\(\s*{re.escape(metric)}\b", expr) is not None
