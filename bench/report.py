"""The benchmark matrix as one table and one JSON document: rows, ratios against (b) and (a), targets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PATHS = {
    "a": "triton direct",
    "b": "passthrough",
    "c": "seekgate",
    "d": "seekgate x2",
}
Row = dict[str, Any]


def cell(model: str, concurrency: int, path: str, measured: dict[str, Any] | None = None,
         unavailable: str | None = None, **extra: Any) -> Row:
    """One row of the matrix; `unavailable` says why a path has no figures."""
    row: Row = {"model": model, "concurrency": concurrency, "path": path, "label": PATHS[path],
                "requests_per_s": None, "p50_ms": None, "p99_ms": None, "requests": 0, "errors": 0,
                "unavailable": unavailable}
    if measured is not None:
        row.update({k: measured[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "requests", "errors",
                                             "seconds", "tool", "first_error") if k in measured})
    row.update(extra)
    return row


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 4) if num is not None and den else None


def add_ratios(rows: list[Row]) -> list[Row]:
    """On the proxy rows (b, c, d): req/s over (a)'s and p50 minus (a)'s p50; on the seekgate rows (c, d)
    also req/s over (b)'s. The passthrough's own b/a shows what any Python hop costs in that cell."""
    by_key = {(r["model"], r["concurrency"], r["path"]): r for r in rows}
    for r in rows:
        if r["path"] not in ("b", "c", "d"):
            continue
        a = by_key.get((r["model"], r["concurrency"], "a"), {})
        b = by_key.get((r["model"], r["concurrency"], "b"), {})
        if r["path"] != "b":
            r["ratio_vs_b"] = _ratio(r["requests_per_s"], b.get("requests_per_s"))
        r["ratio_vs_a"] = _ratio(r["requests_per_s"], a.get("requests_per_s"))
        pa, pr = a.get("p50_ms"), r["p50_ms"]
        r["added_p50_ms_vs_a"] = round(pr - pa, 3) if pa is not None and pr is not None else None
    return rows


def _find(rows: Iterable[Row], model: str, concurrency: int, path: str) -> Row | None:
    return next((r for r in rows if (r["model"], r["concurrency"], r["path"]) == (model, concurrency, path)), None)


def targets(rows: list[Row], high: int = 32) -> list[dict[str, Any]]:
    """Issue 7's throughput and latency targets, each with its value and MET / NOT MET / n/a. Reported only."""
    out: list[dict[str, Any]] = []

    def check(name: str, row: Row | None, key: str, ok: Any) -> None:
        value = None if row is None else row.get(key)
        out.append({"target": name, "value": value,
                    "verdict": "n/a" if value is None else ("MET" if ok(value) else "NOT MET")})

    for conc in (1, high):
        check(f"trivial c{conc}: seekgate >= 0.90 x passthrough (c/b)", _find(rows, "trivial", conc, "c"),
              "ratio_vs_b", lambda v: v >= 0.90)
    check("trivial c1: p50(c) - p50(a) <= 0.5 ms", _find(rows, "trivial", 1, "c"),
          "added_p50_ms_vs_a", lambda v: v <= 0.5)
    check(f"deepseek generate c{high}: seekgate >= 0.97 x Triton direct (c/a)", _find(rows, "deepseek", high, "c"),
          "ratio_vs_a", lambda v: v >= 0.97)
    passthrough = _find(rows, "deepseek", high, "b")
    if out[-1]["value"] is not None and passthrough is not None and passthrough.get("ratio_vs_a") is not None:
        out[-1]["passthrough_vs_a"] = passthrough["ratio_vs_a"]   # the same hop with no checks at all
    return out


def _num(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def format_table(rows: list[Row]) -> str:
    """One line per cell; `/b` and `/a` are the row's req/s over (b)'s and (a)'s, `+p50/a` its p50 minus (a)'s,
    `cpu/req` the CPU ms the proxy process (and its workers) spent per successful request."""
    header = (f"{'model':<9} {'conc':>4} {'path':<16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'/b':>6} {'/a':>6} {'+p50/a':>7} {'cpu/req':>7} {'reqs':>7} {'err':>4}")
    lines = [header, "-" * len(header)]
    for r in rows:
        name = f"{r['path']} {r['label']}"
        if r.get("unavailable"):
            lines.append(f"{r['model']:<9} {r['concurrency']:>4} {name:<16} unavailable: {r['unavailable']}")
            continue
        lines.append(
            f"{r['model']:<9} {r['concurrency']:>4} {name:<16} {_num(r['requests_per_s'], '.1f'):>9} "
            f"{_num(r['p50_ms'], '.2f'):>8} {_num(r['p99_ms'], '.2f'):>8} "
            f"{_num(r.get('ratio_vs_b'), '.2f'):>6} {_num(r.get('ratio_vs_a'), '.2f'):>6} "
            f"{_num(r.get('added_p50_ms_vs_a'), '+.2f'):>7} {_num(r.get('proxy_cpu_ms_per_request'), '.3f'):>7} "
            f"{r['requests']:>7} {r['errors']:>4}")
    return "\n".join(lines)


def noisy(rows: list[Row], spread: float = 0.5) -> list[str]:
    """Cells whose slowest round ran at under `spread` x their fastest: the machine was not steady."""
    out = []
    for r in rows:
        rounds = r.get("rounds_requests_per_s") or []
        if len(rounds) > 1 and max(rounds) > 0 and min(rounds) < spread * max(rounds):
            out.append(f"{r['model']} c{r['concurrency']} {r['path']}: rounds {', '.join(f'{v:g}' for v in rounds)} req/s")
    return out


def format_targets(results: list[dict[str, Any]]) -> str:
    return "\n".join(f"  {t['verdict']:<8} {t['target']}"
                     + ("" if t["value"] is None else f"  (measured {t['value']:g}"
                        + (f"; the bare passthrough: b/a {t['passthrough_vs_a']:g}" if "passthrough_vs_a" in t else "")
                        + ")") for t in results)


def document(rows: list[Row], settings: dict[str, Any], machine: dict[str, Any], date: str,
             high: int = 32) -> dict[str, Any]:
    """The JSON the matrix writes: the same rows as the table, plus the settings and the targets."""
    return {"date": date, "machine": machine, "settings": settings, "paths": PATHS,
            "columns": {"ratio_vs_b": "req/s over (b) passthrough's (c/b on the c rows)",
                        "ratio_vs_a": "req/s over (a) Triton direct's (b/a, c/a, d/a on those rows)",
                        "added_p50_ms_vs_a": "p50 minus (a)'s p50, ms"},
            "results": rows, "targets": targets(rows, high), "noisy_cells": noisy(rows)}
