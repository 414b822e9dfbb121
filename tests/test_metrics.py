"""Tests for proxy.metrics: series and counts as scraped, and bounded label values."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proxy.context import Principal, RequestContext, Resource
from proxy.metrics import Metrics


def _ctx(model: str | None = "deepseek", **kw: Any) -> RequestContext:
    ctx = RequestContext(request_id="r", client_ip="10.0.0.1")
    ctx.principal = Principal(key_id="k1", tier="app", owner="team-a")
    ctx.resource = Resource(resource=f"model:{model}", action="infer", model=model)
    ctx.http_status = 200
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def _scrape(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
         **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
            name: str) -> list[dict[str, str]]:
    return [dict(lbl) for (n, lbl) in samples if n == name]


def test_known_sequence_is_counted() -> None:
    m = Metrics(["deepseek"])
    m.observe_request(_ctx(upstream_ms=40.0, input_tokens=12, output_tokens=30), duration_s=0.05)
    m.observe_request(_ctx(upstream_ms=90.0, input_tokens=3, output_tokens=5, protocol="grpc"),
                      duration_s=0.1)
    m.observe_request(_ctx(principal=None, resource=None, status="denied", http_status=401,
                           reason="revoked: parent k0"), duration_s=0.001)
    m.observe_request(_ctx(status="denied", http_status=403, rule="deny-admin"), duration_s=0.002)
    m.observe_request(_ctx(status="denied", http_status=403, rule="deny-admin"), duration_s=0.002)
    s = _scrape(m)

    ok = dict(model="deepseek", action="infer", tier="app", status="allowed", code="200")
    assert _get(s, "seekgate_requests_total", **ok, protocol="http") == 1
    assert _get(s, "seekgate_requests_total", **ok, protocol="grpc") == 1
    assert _get(s, "seekgate_requests_total", model="none", action="none", tier="none",
                status="denied", code="401", protocol="http") == 1
    assert _get(s, "seekgate_requests_total", **{**ok, "status": "denied", "code": "403"},
                protocol="http") == 2

    hist = dict(model="deepseek", action="infer", protocol="http")
    assert _get(s, "seekgate_request_duration_seconds_count", **hist) == 3
    assert _get(s, "seekgate_request_duration_seconds_sum", **hist) == pytest.approx(0.054)
    assert _get(s, "seekgate_request_duration_seconds_bucket", **hist, le="0.0025") == 2
    assert _get(s, "seekgate_upstream_duration_seconds_count", **hist) == 1
    assert _get(s, "seekgate_upstream_duration_seconds_sum", **hist) == 0.04
    # Overhead only for forwarded requests: 50-40 ms over http, 100-90 ms over grpc.
    assert _get(s, "seekgate_overhead_seconds_count", protocol="http") == 1
    assert abs(_get(s, "seekgate_overhead_seconds_sum", protocol="grpc") - 0.01) < 1e-9

    assert _get(s, "seekgate_tokens_total", model="deepseek", direction="input", tier="app") == 15
    assert _get(s, "seekgate_tokens_total", model="deepseek", direction="output", tier="app") == 35
    assert _get(s, "seekgate_auth_failures_total", reason="revoked", protocol="http") == 1
    assert _get(s, "seekgate_policy_denials_total", rule="deny-admin") == 2
    assert _series(s, "seekgate_auth_failures_total") == [{"reason": "revoked",
                                                           "protocol": "http"}]


def test_other_events() -> None:
    m = Metrics()
    depth = {"n": 0}
    m.set_audit_depth_fn(lambda: depth["n"])
    m.policy_reloaded(3)
    m.policy_reloaded("7")
    m.policy_reloaded("not-a-number")  # counted, gauge keeps 7
    m.policy_reload_failed()
    m.audit_write_failed()
    m.audit_write_failed()
    m.set_upstream_up(False)
    depth["n"] = 42  # read at scrape time, not when set
    s = _scrape(m)
    assert _get(s, "seekgate_policy_reloads_total") == 3
    assert _get(s, "seekgate_policy_reload_errors_total") == 1
    assert _get(s, "seekgate_policy_version") == 7
    assert _get(s, "seekgate_audit_write_errors_total") == 2
    assert _get(s, "seekgate_audit_queue_depth") == 42
    assert _get(s, "seekgate_upstream_up") == 0
    m.set_upstream_up(True)
    assert _get(_scrape(m), "seekgate_upstream_up") == 1


def test_random_model_names_do_not_create_series() -> None:
    m = Metrics(["deepseek"])
    for i in range(10_000):
        m.observe_request(_ctx(model=f"attacker-{i}", input_tokens=1), duration_s=0.001)
    m.observe_request(_ctx(model=None), duration_s=0.001)
    s = _scrape(m)
    models = {lbl["model"] for lbl in _series(s, "seekgate_requests_total")}
    assert models == {"other", "none"}
    assert _get(s, "seekgate_tokens_total", model="other", direction="input", tier="app") == 10_000
    assert len(_series(s, "seekgate_request_duration_seconds_count")) == 2

    m.set_known_models(["deepseek", "deepseek-r1"])
    m.observe_request(_ctx(model="deepseek-r1"), duration_s=0.001)
    models = {lbl["model"] for lbl in _series(_scrape(m), "seekgate_requests_total")}
    assert models == {"other", "none", "deepseek-r1"}


def test_other_labels_are_bounded() -> None:
    m = Metrics(["deepseek"], spare_rules=2)
    for i in range(500):
        m.observe_request(_ctx(status=f"s{i}", protocol=f"p{i}", http_status=600 + i,
                               principal=Principal(key_id="k", tier=f"t{i}", owner="o"),
                               resource=Resource(resource="x", action=f"a{i}",
                                                 model="deepseek")), duration_s=0.001)
        m.observe_request(_ctx(http_status=401, reason=f"weird-{i}"), duration_s=0.001)
        m.observe_request(_ctx(http_status=403, rule=f"rule-{i}"), duration_s=0.001)
    m.observe_request(_ctx(http_status=403, rule=""), duration_s=0.001)
    m.observe_request(_ctx(http_status=418), duration_s=0.001)
    s = _scrape(m)
    assert _get(s, "seekgate_requests_total", model="deepseek", action="infer", tier="app",
                status="allowed", code="4xx", protocol="http") == 1
    weird = [lbl for lbl in _series(s, "seekgate_requests_total") if lbl["tier"] != "app"]
    assert weird == [dict(model="deepseek", action="other", tier="other", status="other",
                          code="other", protocol="other")]
    assert {lbl["reason"] for lbl in _series(s, "seekgate_auth_failures_total")} == {"other"}
    rules = {lbl["rule"] for lbl in _series(s, "seekgate_policy_denials_total")}
    assert rules == {"rule-0", "rule-1", "other", "none"}
    assert len(s) < 400  # fixed-size exposition however many odd values arrived


def test_own_registry_not_global() -> None:
    a, b = Metrics(), Metrics()  # two instances must not collide on names
    a.audit_write_failed()
    assert _get(_scrape(a), "seekgate_audit_write_errors_total") == 1
    assert _get(_scrape(b), "seekgate_audit_write_errors_total") == 0
    assert REGISTRY.get_sample_value("seekgate_audit_write_errors_total") is None


def test_batched_updates_scrape_exactly_as_prometheus_clients_own() -> None:
    """The batch (_Pending) counts what prometheus_client's observe/inc would, bucket for bucket."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from proxy.metrics import DURATION_BUCKETS, _Pending

    def families(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples
                if not s.name.endswith("_created")}

    # Bounds exactly, between, below the first and above the last (+Inf), and a negative value.
    values = [0.0005, 0.0007, 1.0, 59.9, 60.0, 61.0, 1e9, 0.0, -1.0] + [i / 997 for i in range(300)]
    scraped = []
    for batched in (False, True):
        registry = CollectorRegistry()
        hist = Histogram("h_seconds", "h", ("x",), buckets=DURATION_BUCKETS, registry=registry)
        count = Counter("c", "c", ("x",), registry=registry)
        h, c = hist.labels("a"), count.labels("a")
        pending_h, pending_c = _Pending(h, tuple(h._upper_bounds)), _Pending(c)
        for i, v in enumerate(values):
            if batched:
                pending_h.observe(v)
                pending_c.inc(v if v > 0 else 1)
                if i == 5:
                    pending_h.flush()   # several flushes add up
                    pending_c.flush()
            else:
                h.observe(v)
                c.inc(v if v > 0 else 1)
        pending_h.flush()
        pending_c.flush()
        pending_h.flush()   # nothing new: no change
        scraped.append(families(registry))
    assert scraped[0] == pytest.approx(scraped[1])   # sums added in another order: the last bits may differ
    assert scraped[1][("h_seconds_count", frozenset({("x", "a")}))] == len(values)


def test_a_scrape_sees_every_request_observed_before_it() -> None:
    m = Metrics(known_models=("deepseek",))
    for n, new in ((1, 1), (3, 2), (3, 0)):
        for _ in range(new):
            m.observe_request(_ctx(upstream_ms=1.0), duration_s=0.01)
        s = _scrape(m)
        assert _get(s, "seekgate_request_duration_seconds_count", model="deepseek", action="infer",
                    protocol="http") == n


def test_every_401_reason_raised_has_its_own_label() -> None:
    # A reason outside AUTH_REASONS is scraped as reason="other": session-token refusals
    # (expired, bad signature, revoked) all merged there, and the 401 panel could not tell them apart.
    import re
    from pathlib import Path

    from proxy.metrics import AUTH_REASONS

    source = Path(__file__).resolve().parent.parent / "proxy"
    raised = {m.group(1) for f in source.rglob("*.py")
              for m in re.finditer(r'Unauthenticated\(f?"([a-z_]+)', f.read_text())}
    assert {"missing_credentials", "session_expired", "key_in_query_string"} <= raised
    assert raised - AUTH_REASONS == set()

    m = Metrics()
    for reason in ("session_expired", "session_bad_signature: kid k1", "key_in_query_string"):
        m.observe_request(_ctx(http_status=401, reason=reason, status="denied"), duration_s=0.001)
    reasons = {lbl["reason"] for lbl in _series(_scrape(m), "seekgate_auth_failures_total")}
    assert reasons == {"session_expired", "session_bad_signature", "key_in_query_string"}


def test_latency_buckets_resolve_up_to_the_request_timeout() -> None:
    # A 200 s generation (within upstream.request_timeout_s, 300 s by default) fell only in +Inf:
    # histogram_quantile then answers the last finite bound (60 s), and the latency panels
    # flattened at 60 s however slow generations became.
    from proxy.settings import UpstreamSettings

    m = Metrics(["deepseek"])
    m.observe_request(_ctx(upstream_ms=200_000.0), duration_s=200.0)
    s = _scrape(m)
    timeout = UpstreamSettings().request_timeout_s
    for name in ("seekgate_request_duration_seconds_bucket", "seekgate_upstream_duration_seconds_bucket"):
        finite = {float(lbl["le"]): _get(s, name, **lbl) for lbl in _series(s, name) if lbl["le"] != "+Inf"}
        assert max(finite) >= timeout, name
        assert finite[min(le for le in finite if le >= 200.0)] == 1, name


def test_every_settlement_the_shared_limiter_drops_is_counted_by_its_reason() -> None:
    # A token settlement left unapplied (Redis away past the retry horizon, too many kept, Redis failing
    # it, shutdown with Redis down) must show in the metrics, not only in a log line.
    import re
    from pathlib import Path

    from proxy.metrics import SETTLEMENT_DROP_REASONS

    source = (Path(__file__).resolve().parent.parent / "proxy" / "state" / "redis_limiter.py").read_text()
    given = set(re.findall(r'_drop\(\S+, "([a-z_]+)"', source)) | set(re.findall(r'_on_dropped\("([a-z_]+)"', source))
    assert {"retry_horizon", "overflow", "redis_error", "shutdown"} <= given
    assert given - SETTLEMENT_DROP_REASONS == set()

    m = Metrics()
    m.limits_settlement_dropped("retry_horizon")
    m.limits_settlement_dropped("retry_horizon")
    m.limits_settlement_dropped("surprise")
    s = _scrape(m)
    assert _get(s, "seekgate_limits_settlements_dropped_total", reason="retry_horizon") == 2
    assert _get(s, "seekgate_limits_settlements_dropped_total", reason="other") == 1


def test_the_dropped_settlements_counter_starts_at_zero_for_every_reason() -> None:
    # A series that first appears at 1 has no earlier sample: increase() and rate() miss that first drop,
    # and the dashboard's panel reads "no data" on every replica that never dropped one.
    from proxy.metrics import SETTLEMENT_DROP_REASONS

    s = _scrape(Metrics())
    for reason in SETTLEMENT_DROP_REASONS:
        assert _get(s, "seekgate_limits_settlements_dropped_total", reason=reason) == 0, reason
