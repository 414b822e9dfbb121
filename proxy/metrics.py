"""Prometheus metrics on a private registry, with every label bounded to a known set."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .context import RequestContext

log = logging.getLogger(__name__)

OTHER = "other"
NONE = "none"

# 0.5 ms (a refused request) .. 300 s (a long generation: upstream.request_timeout_s's default).
# Above the last bound histogram_quantile can only answer that bound, so it must reach the timeout.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# What the proxy itself adds should sit well under 10 ms; resolve that range finely.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 1.0)

ACTIONS = frozenset({"infer", "read", "admin", "health"})
TIERS = frozenset({"root", "app", "device", "user", "session"})
STATUSES = frozenset({"allowed", "denied", "error"})
PROTOCOLS = frozenset({"http", "grpc", "openai"})
AUTH_REASONS = frozenset({
    # Every reason proxy raises Unauthenticated with (tests/test_metrics.py checks the source):
    # API keys (proxy.steps.authn, proxy.keys.format), the front ends, session tokens, the console.
    "missing_credentials", "malformed", "bad_checksum", "unknown_key", "hash_mismatch",
    "revoked", "expired", "ip_not_allowed", "models_outside_parent",
    "key_in_query_string", "connection_not_from_tls_listener",
    "session_bad_alg", "session_bad_signature", "session_expired", "session_from_wrong_tier",
    "session_header_refused", "session_lifetime_too_long", "session_missing_claim",
    "session_not_yet_valid", "session_revoked", "session_token_too_large", "session_unknown_kid",
    "session_wrong_audience_or_issuer", "sessions_unavailable",
    "console_key_tier", "console_no_session", "console_session_malformed",
})
SETTLEMENT_DROP_REASONS = frozenset({"retry_horizon", "overflow", "redis_error", "shutdown"})
HTTP_CODES = frozenset({200, 201, 204, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429,
                        499, 500, 501, 502, 503, 504})


class _Bounded:
    """Maps a raw value onto a bounded label set: known values pass, others become `other`.

    `spare` admits that many not-yet-known values first come, first served, for label
    sets ops control but we cannot enumerate up front (policy rule ids).
    """

    def __init__(self, known: Iterable[str] = (), spare: int = 0) -> None:
        self.known = frozenset(known)
        self._spare = spare
        self._admitted: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return NONE
        if value in self.known or value in self._admitted:
            return value
        if len(self._admitted) < self._spare:
            self._admitted.add(value)
            return value
        return OTHER


def _reason_key(reason: str) -> str:
    # Reasons may carry detail ("revoked: parent k_123"); only the kind is a label.
    return reason.split(":", 1)[0].strip().lower()


def _code(status: int) -> str:
    if not status:
        return NONE
    if status in HTTP_CODES:
        return str(status)
    return f"{status // 100}xx" if 100 <= status < 600 else OTHER


class _Pending:
    """One labelled counter or histogram child's observations since the last flush, in plain Python.

    prometheus_client takes a lock per value it touches and scans a histogram's buckets one by
    one: five such updates per request were the metrics step's cost. Here an update is a bisect
    and two additions; `flush` hands the totals over in one update per bucket. The event loop is
    the only writer, so nothing needs a lock until then.
    """

    __slots__ = ("child", "bounds", "counts", "total", "dirty")

    def __init__(self, child: Any, bounds: tuple[float, ...] = ()) -> None:
        self.child, self.bounds = child, bounds
        self.counts = [0] * len(bounds)   # per bucket (the last bound is +Inf); empty for a counter
        self.total = 0.0
        self.dirty = False

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1   # the first bound >= value, as prometheus_client
        self.total += value
        self.dirty = True

    def inc(self, amount: float = 1.0) -> None:
        self.total += amount
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        if self.bounds:
            # prometheus_client's own per-child values (the same objects its observe() updates).
            for i, n in enumerate(self.counts):
                if n:
                    self.child._buckets[i].inc(n)
                    self.counts[i] = 0
            self.child._sum.inc(self.total)
        else:
            self.child.inc(self.total)
        self.total, self.dirty = 0.0, False


class Metrics:
    """Everything an operator watches, on its own `CollectorRegistry`.

    Per-request updates are batched (`_Pending`) and flushed into the registry when it is read:
    by `render()`, and by `refresh()` about once a second under `serve --workers N`.
    """

    def __init__(self, known_models: Iterable[str] = (), *,
                 auth_reasons: Iterable[str] = AUTH_REASONS,
                 known_rules: Iterable[str] = (), spare_rules: int = 64) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._model = _Bounded(known_models)
        self._action = _Bounded(ACTIONS)
        self._tier = _Bounded(TIERS)
        self._status = _Bounded(STATUSES)
        self._protocol = _Bounded(PROTOCOLS)
        self._reason = _Bounded(auth_reasons)
        self._rule = _Bounded(known_rules, spare=spare_rules)
        self._drop_reason = _Bounded(SETTLEMENT_DROP_REASONS)

        self.requests = Counter("seekgate_requests", "Requests handled, by outcome.",
                                ("model", "action", "tier", "status", "code", "protocol"),
                                registry=r)
        self.request_duration = Histogram(
            "seekgate_request_duration_seconds", "Time from request arrival to response end.",
            ("model", "action", "protocol"), buckets=DURATION_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "seekgate_upstream_duration_seconds", "Time spent waiting on Triton.",
            ("model", "action", "protocol"), buckets=DURATION_BUCKETS, registry=r)
        self.overhead = Histogram(
            "seekgate_overhead_seconds",
            "Request time minus upstream time, for requests forwarded to Triton.",
            ("protocol",), buckets=OVERHEAD_BUCKETS, registry=r)
        self.auth_failures = Counter("seekgate_auth_failures", "Requests refused with 401.",
                                     ("reason", "protocol"), registry=r)
        self.policy_denials = Counter("seekgate_policy_denials", "Requests refused with 403.",
                                      ("rule",), registry=r)
        self.tokens = Counter("seekgate_tokens", "Tokens processed.",
                              ("model", "direction", "tier"), registry=r)
        self.policy_reloads = Counter("seekgate_policy_reloads",
                                      "Successful policy reloads.", registry=r)
        self.policy_reload_errors = Counter(
            "seekgate_policy_reload_errors",
            "Policy reloads rejected; the last good policy stays in force.", registry=r)
        self.tls_reloads = Counter("seekgate_tls_reloads",
                                   "TLS certificates reloaded from renewed files.", registry=r)
        self.tls_reload_errors = Counter(
            "seekgate_tls_reload_errors",
            "TLS certificate reloads rejected (a broken file); the certificate in force stays.", registry=r)
        self.tls_refusals = Counter(
            "seekgate_tls_handshake_refusals",
            "TLS handshakes refused, by the fatal alert sent (protocol_version, certificate_required, ...).",
            ("reason",), registry=r)
        # multiprocess_mode: how `serve --workers N` folds the workers' values into one series.
        self.policy_version = Gauge("seekgate_policy_version",
                                    "Version of the policy in force.", registry=r, multiprocess_mode="livemax")
        self.audit_queue_depth = Gauge("seekgate_audit_queue_depth",
                                       "Audit records waiting to be written.", registry=r,
                                       multiprocess_mode="livesum")
        self.audit_write_errors = Counter("seekgate_audit_write_errors",
                                          "Failed audit write attempts (records are retried).",
                                          registry=r)
        self.upstream_up = Gauge("seekgate_upstream_up",
                                 "1 if Triton answered its last health check, else 0.",
                                 registry=r, multiprocess_mode="livemin")
        self.limits_backend_up = Gauge("seekgate_limits_backend_up",
                                       "1 if the shared limiter's Redis answered last, else 0 (1 without Redis).",
                                       registry=r, multiprocess_mode="livemin")
        self.limits_local = Gauge("seekgate_limits_local",
                                  "1 while Redis is down and this replica enforces its own limits "
                                  "(limits.on_backend_down=local).", registry=r, multiprocess_mode="livemax")
        self.limits_backend_up.set(1.0)   # no shared limiter, or one not yet found down
        self.limits_settlements_dropped = Counter(
            "seekgate_limits_settlements_dropped",
            "Token settlements the shared limiter left unapplied (each also logged with its key, day and "
            "tokens): retry_horizon = Redis away past the retry horizon after the answer was lost, so "
            "applying it might apply it twice; overflow, redis_error, shutdown (Redis down when the limiter "
            "closed; also tokens admitted under on_backend_down=local and owed to the shared budgets).",
            ("reason",), registry=r)
        for reason in SETTLEMENT_DROP_REASONS:   # a series at 0 from the start: increase() sees the first drop
            self.limits_settlements_dropped.labels(reason)
        self.keys_expiring = Gauge("seekgate_keys_expiring",
                                   "Active keys expiring within the warning window (72 h), by tier.",
                                   ("tier",), registry=r, multiprocess_mode="livemax")
        self._audit_depth_fn: Callable[[], float] = lambda: 0.0
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._pending: dict[tuple[int, tuple[str, ...]], _Pending] = {}
        self.audit_queue_depth.set_function(lambda: 0.0)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: labels() validates and locks on every call, and
        the label sets are bounded, so the per-request cost becomes one dict lookup."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def _batched(self, metric: Counter | Histogram, *labels: str) -> _Pending:
        """The batch of `metric.labels(*labels)`'s updates, made on first use (label sets are bounded)."""
        key = (id(metric), labels)
        found = self._pending.get(key)
        if found is None:
            child = self._child(metric, *labels)
            bounds = tuple(child._upper_bounds) if isinstance(metric, Histogram) else ()
            found = self._pending[key] = _Pending(child, bounds)
        return found

    def flush(self) -> None:
        """Hand every batched update over to the registry."""
        for pending in self._pending.values():
            pending.flush()

    # -- label bounds ------------------------------------------------------------

    def set_known_models(self, models: Iterable[str]) -> None:
        """Replace the model names that get their own label value (others are `other`)."""
        self._model = _Bounded(models)

    def set_known_rules(self, rules: Iterable[str]) -> None:
        """Policy rule ids after a reload; unknown ids still get the spare allowance."""
        self._rule = _Bounded(rules, spare=self._rule._spare)

    # -- events ------------------------------------------------------------------

    def observe_request(self, ctx: RequestContext, duration_s: float | None = None) -> None:
        """Record one finished request. `duration_s` defaults to time since ctx.started."""
        duration = ctx.elapsed_ms() / 1000.0 if duration_s is None else duration_s
        res, who = ctx.resource, ctx.principal
        model = self._model(res.model if res else None)
        action = self._action(res.action if res else None)
        tier = self._tier(who.tier if who else None)
        protocol = self._protocol(ctx.protocol)

        batched = self._batched
        batched(self.requests, model, action, tier, self._status(ctx.status), _code(ctx.http_status),
                protocol).inc()
        batched(self.request_duration, model, action, protocol).observe(duration)
        if ctx.upstream_ms is not None:
            upstream = ctx.upstream_ms / 1000.0
            batched(self.upstream_duration, model, action, protocol).observe(upstream)
            batched(self.overhead, protocol).observe(max(0.0, duration - upstream))
        if ctx.input_tokens:
            batched(self.tokens, model, "input", tier).inc(ctx.input_tokens)
        if ctx.output_tokens:
            batched(self.tokens, model, "output", tier).inc(ctx.output_tokens)
        if ctx.http_status == 401:
            self.auth_failures.labels(self._reason(_reason_key(ctx.reason)), protocol).inc()
        elif ctx.http_status == 403:
            self.policy_denials.labels(self._rule(ctx.rule)).inc()

    def policy_reloaded(self, version: float | int | str) -> None:
        """A reload succeeded; `version` should be numeric (a counter or an mtime)."""
        self.policy_reloads.inc()
        try:
            self.policy_version.set(float(version))
        except (TypeError, ValueError):
            log.warning("policy version %r is not numeric; gauge left unchanged", version)

    def policy_reload_failed(self) -> None:
        self.policy_reload_errors.inc()

    def tls_reloaded(self) -> None:
        self.tls_reloads.inc()

    def tls_reload_failed(self, _message: str = "") -> None:
        self.tls_reload_errors.inc()

    def tls_refused(self, reason: str) -> None:
        self.tls_refusals.labels(reason).inc()

    def audit_write_failed(self) -> None:
        self.audit_write_errors.inc()

    def set_keys_expiring(self, counts: dict[str, int]) -> None:
        """Per-tier counts from the store (store.count_expiring); tiers bounded."""
        for tier, n in counts.items():
            self.keys_expiring.labels(self._tier(tier)).set(float(n))

    def set_limits_backend(self, up: bool, local: bool) -> None:
        """The shared limiter's Redis went up or down; `local`: this replica now counts alone."""
        self.limits_backend_up.set(1.0 if up else 0.0)
        self.limits_local.set(1.0 if local else 0.0)

    def limits_settlement_dropped(self, reason: str) -> None:
        """The shared limiter dropped a settlement (one of SETTLEMENT_DROP_REASONS)."""
        self.limits_settlements_dropped.labels(self._drop_reason(reason)).inc()

    def set_upstream_up(self, up: bool) -> None:
        self.upstream_up.set(1.0 if up else 0.0)
        self.upstream_seen_up: bool | None = up   # read back by the console's overview; None: not probed yet

    def set_audit_depth_fn(self, fn: Callable[[], float]) -> None:
        """Read at scrape time, e.g. `metrics.set_audit_depth_fn(writer.queue_depth)`.

        Under `serve --workers N` the supervisor scrapes the workers' files, not this registry,
        so a worker copies the value into its file instead (`refresh`, about once a second).
        """
        self._audit_depth_fn = fn
        self.audit_queue_depth.set_function(fn)

    def refresh(self) -> None:
        """Multi-process mode: batched updates and scrape-time values into the shared metric files."""
        self.flush()
        self.audit_queue_depth.set(float(self._audit_depth_fn()))

    def render(self) -> tuple[bytes, str]:
        """Exposition body and its content type, for the /metrics handler."""
        self.flush()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
