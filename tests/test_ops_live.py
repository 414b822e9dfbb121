"""Live check of config/: a real Prometheus scrapes a real seekgate and Triton; every dashboard and alert query has data."""

from __future__ import annotations

import json
import math
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.audit import jsonl as audit_file
from proxy.cli.devcert import make_dev_certs
from proxy.keys.format import generate_key
from proxy.local.triton import TritonProcess, free_ports
from tests.conftest import REPO
from tests.dashboard import (
    TRITON_GPU_METRICS,
    dashboard_queries,
    grouping_labels,
    metric_name,
    selectors,
    uses_gpu_metrics,
)
from tests.gateway import Gateway, metric, wait_for
from tests.relay import TcpRelay

PROMETHEUS_DIR = REPO / "config" / "prometheus"
GENERATE = "/v2/models/deepseek/generate"


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


# ------------------------------------------------------------------ a real Prometheus

class Prometheus:
    """The Debian `prometheus` binary on a free loopback port, its own storage, 1 s scrapes."""

    def __init__(self, root: Path, targets: dict[str, str], tls_ca: Path | None = None) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        # No Alertmanager here: alerts are read from Prometheus's API. (Left in, its address would be
        # looked up in DNS, off this machine.)
        config.pop("alerting", None)
        jobs = {j["job_name"]: j for j in config["scrape_configs"]}
        assert set(targets) <= set(jobs), "the shipped config must scrape every job the test fills in"
        for job in jobs.values():
            if job["job_name"] not in targets:   # a job this test runs nothing for scrapes Prometheus itself
                job.pop("metrics_path", None)
            job["static_configs"] = [{"targets": [targets.get(job["job_name"], f"127.0.0.1:{self.port}")]}]
            if "tls_config" in job and job["job_name"] in targets:
                # The shipped scheme and verification, against this test's CA and certificate name.
                assert tls_ca is not None, f"job {job['job_name']} scrapes over TLS: give the CA"
                job["tls_config"].update(ca_file=str(tls_ca), server_name="localhost")
        self.config_path = root / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = open(self.root / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.config_path}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        # Ready is not enough: target discovery hands the scrapers their targets a few seconds later.
        if not wait_for(lambda: self._ready() and self._all_scraped(), 60):
            self.stop()
            raise RuntimeError("prometheus not scraping: " + (self.root / "prometheus.log").read_text()[-2000:])
        return self

    def _all_scraped(self) -> bool:
        targets = self.api("targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    def scraped_after(self, job: str, t: float) -> float | None:
        """The start of `job`'s last scrape (Unix time) if it began after `t` and succeeded, else None."""
        for target in self.api("targets")["activeTargets"]:
            if target["labels"]["job"] == job and target["health"] == "up":
                at = datetime.fromisoformat(target["lastScrape"]).timestamp()
                return at if at > t else None
        return None

    def evaluated_after(self, t: float) -> bool:
        """Every rule group has been evaluated since `t` (Unix time)."""
        groups = self.api("rules")["groups"]
        return bool(groups) and all(datetime.fromisoformat(g["lastEvaluation"]).timestamp() > t for g in groups)

    def settled(self, since: float) -> None:
        """Waits for a scrape of seekgate begun after `since`, then a rule evaluation after that."""
        holder: list[float] = []

        def scraped() -> bool:
            at = self.scraped_after("seekgate", since)
            if at is not None:
                holder.append(at)
            return at is not None
        assert wait_for(scraped, 60), "prometheus did not scrape seekgate"
        assert wait_for(lambda: self.evaluated_after(holder[0]), 60), "prometheus did not evaluate the rules"

    def has(self, expr: str) -> bool:
        """The instant query has a result now (as of the last scrape)."""
        return bool(self.api("query", query=expr)["result"])

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def range_query(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step="1s")
        assert data["resultType"] == "matrix"
        return data["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------ traffic

def call(gw: Gateway, path: str, token: str | None, body: dict[str, Any] | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(gw.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120, context=gw.client_tls) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def _disk_full(fd: int, data: bytes) -> None:
    raise OSError(28, "No space left on device")


@pytest.fixture
def stack(triton: TritonProcess, tmp_path: Path) -> Iterator[tuple[Gateway, TcpRelay, Prometheus, dict[str, str]]]:
    relay = TcpRelay("127.0.0.1", triton.launch.http_port).start()
    # TLS on, as the shipped deployments serve it: Prometheus scrapes with the shipped tls_config.
    certs = make_dev_certs(tmp_path / "certs")
    gw = Gateway(tmp_path / "gw", f"http://127.0.0.1:{relay.port}", free_ports(3),
                 **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}",
                    "server.tls_cert_file": str(certs["server_cert"]), "server.tls_key_file": str(certs["server_key"])})
    gw.url, gw.metrics_url = (u.replace("http://", "https://") for u in (gw.url, gw.metrics_url))
    gw.client_tls = ssl.create_default_context(cafile=str(certs["ca"]))
    # Issued before the start, so the first expiring-keys pass counts them (both expire in 1 h).
    keys = {"user": gw.key("user", "alice", ("user",))[1],
            "limited": gw.key("app", "batch-job", (), limits={"rpm": 1})[1]}
    prom: Prometheus | None = None
    try:
        gw.start()
        (tmp_path / "prom").mkdir()
        metrics_port = gw.metrics_url.split(":")[2].split("/")[0]
        prom = Prometheus(tmp_path / "prom", {"seekgate": f"127.0.0.1:{metrics_port}",
                                              "triton": f"127.0.0.1:{triton.launch.metrics_port}"},
                          tls_ca=certs["ca"]).start()
        yield gw, relay, prom, keys
    finally:
        if prom is not None:
            prom.stop()
        gw.stop()
        relay.stop()


def settled(gw: Gateway, prom: Prometheus, sent: int) -> None:
    """Waits for the events the queries rely on, however slow the machine: seekgate counting all
    `sent` requests (it counts each just after answering it), then Prometheus scraping that and
    evaluating its rules over the scrape. Events, not sleeps of a few scrape intervals."""
    assert wait_for(lambda: metric(gw, "seekgate_requests_total") >= sent, 60)
    prom.settled(since=time.time())


def send_mix(gw: Gateway, relay: TcpRelay, prom: Prometheus, keys: dict[str, str],
             monkeypatch: pytest.MonkeyPatch, rounds: int = 3) -> list[int]:
    """Rounds of allowed, 401, 403, 429 and 503 requests, a scrape apart so that rates see increases.

    Triton is cut off, and the audit disk fails, each until Prometheus has seen it.
    """
    _, unknown = generate_key()
    statuses = []
    for i in range(rounds):
        statuses += [call(gw, GENERATE, keys["user"], {"text_input": f"hello {i}", "max_tokens": 4})
                     for _ in range(2)]
        statuses.append(call(gw, GENERATE, None, {"text_input": "x"}))                # missing_credentials
        statuses.append(call(gw, GENERATE, "not-a-key", {"text_input": "x"}))         # malformed
        statuses.append(call(gw, GENERATE, unknown, {"text_input": "x"}))             # unknown_key
        statuses.append(call(gw, "/v2/repository/models/deepseek/load", keys["user"]))  # deny-triton-admin
        statuses += [call(gw, GENERATE, keys["limited"], {"text_input": "y", "max_tokens": 2}) for _ in range(2)]
        relay.block()   # a 503 in every round, so the error series itself increases
        statuses.append(call(gw, GENERATE, keys["user"], {"text_input": "down", "max_tokens": 2}))
        if i == 1:
            # Long enough for seekgate's 2 s health check to notice, and Prometheus to scrape it.
            assert wait_for(lambda: prom.has("seekgate_upstream_up == 0"), 20)
            assert wait_for(lambda: prom.has('ALERTS{alertname="TritonDown"}'), 20)   # evaluated while down
            # The audit disk fails for a moment: records are held and retried, the failures counted.
            monkeypatch.setattr(audit_file, "_write_all", _disk_full)
            statuses.append(call(gw, GENERATE, keys["user"], {"text_input": "disk", "max_tokens": 2}))
            assert wait_for(lambda: prom.has("seekgate_audit_write_errors_total > 0"), 20)
            monkeypatch.undo()
        relay.block(False)
        # Every round's increments in samples of their own, so that rates see each round's rise:
        # a scrape after the round's last metric update, rather than a sleep of two intervals.
        settled(gw, prom, len(statuses))
    return statuses


# ------------------------------------------------------------------ the test

def test_every_dashboard_and_alert_query_has_data(
        stack: tuple[Gateway, TcpRelay, Prometheus, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    gw, relay, prom, keys = stack
    start = time.time() - 5
    statuses = send_mix(gw, relay, prom, keys, monkeypatch)
    assert {200, 401, 403, 429, 503} == set(statuses), statuses
    settled(gw, prom, len(statuses))   # the last round scraped and the rules evaluated over it
    end = time.time()

    # Both targets scraped for real.
    targets = {t["labels"]["job"]: t["health"] for t in prom.api("targets")["activeTargets"]}
    assert targets["seekgate"] == "up" and targets["triton"] == "up", targets

    problems: list[str] = []

    def check_selectors(where: str, expr: str) -> None:
        labels_seen: set[str] = set()
        for sel in selectors(expr):
            if metric_name(sel) in TRITON_GPU_METRICS:
                continue
            series = prom.api("series", **{"match[]": sel}, start=start, end=end)
            if not series:
                problems.append(f"{where}: selector {sel} matches no series")
            labels_seen |= {k for s in series for k in s}
        for label in grouping_labels(expr):
            if label not in labels_seen:
                problems.append(f"{where}: groups by label {label!r} that none of its series carries")

    gpu_names: set[str] = set()
    queries = dashboard_queries()
    assert len(queries) >= 20
    for query in queries:
        expr = query.with_variables()
        where = f"panel {query.panel!r}: {expr}"
        assert selectors(expr), where
        if uses_gpu_metrics(expr):
            # Triton exports these only where it sees a GPU, and this machine has none: here
            # the names are checked against Triton's documented ones; test_ops_prometheus
            # evaluates each such query with promtool on synthetic series.
            gpu_names |= {metric_name(s) for s in selectors(expr)}
            continue
        check_selectors(where, expr)
        values = [float(v) for series in prom.range_query(expr, start, end) for _, v in series["values"]]
        if not any(math.isfinite(v) for v in values):
            problems.append(f"{where}: no finite value over the test ({len(values)} points)")

    # Rules loaded and evaluated without error; each alert was active (pending or firing) at
    # some point of the test, since the traffic above meets every condition but the GPU one.
    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    for rule in alert_rules():
        name, expr = rule["alert"], rule["expr"]
        where = f"alert {name}: {expr.strip()}"
        if rules.get(name, {}).get("health") != "ok":
            problems.append(f"{where}: rule not loaded or failing: {rules.get(name)}")
        if uses_gpu_metrics(expr):
            gpu_names |= {metric_name(s) for s in selectors(expr)}
            continue
        check_selectors(where, expr)
        if not prom.range_query(f'ALERTS{{alertname="{name}"}}', start, end):
            problems.append(f"{where}: never pending or firing during the test")

    assert not problems, "\n".join(problems)
    assert gpu_names == {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
    assert gpu_names <= TRITON_GPU_METRICS


def test_selector_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, protocol) (rate(seekgate_overhead_seconds_bucket'
            '{job="seekgate"}[30s]))) / 1e6 > 0.05 or up{job="triton"} == 0 or seekgate_upstream_up == 0')
    assert selectors(expr) == ['seekgate_overhead_seconds_bucket{job="seekgate"}', 'up{job="triton"}',
                               "seekgate_upstream_up"]
    assert grouping_labels(expr) == {"le", "protocol"}
    assert selectors('sum(rate(x_total{a="b(c)"}[5m])) / sum(y)') == ['x_total{a="b(c)"}', "y"]
