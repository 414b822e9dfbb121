"""Tests for proxy.limits (pure logic, fake clock) and the limit step in proxy.pipeline."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.quotas import LIMIT_FIELDS, Limits, parse_limits, parse_role_caps
from proxy.settings import LimitsSettings
from proxy.state.limits import LocalLimiter, OverLimit, Scope, max_tokens_cap
from proxy.steps.pipeline import tier_limits


class Clock:
    """Wall time under the test's control."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=timezone.utc).timestamp()


T0 = at("2026-11-29T12:00:00")


def scope(key_id: str = "k", inherited: bool = False, **limits: int) -> Scope:
    return Scope(key_id, Limits(**limits), inherited)


def refused(limiter: LocalLimiter, scopes: list[Scope], tokens: int = 0) -> OverLimit:
    with pytest.raises(OverLimit) as info:
        limiter.acquire_now(scopes, tokens)
    return info.value


# ------------------------------------------------------------------ rpm


def test_rpm_sliding_window_refuses_with_headers_and_frees_after_60s() -> None:
    clock = Clock(T0)
    lim = LocalLimiter(clock)
    s = [scope(rpm=3)]
    for dt in (0, 10, 20):
        clock.t = T0 + dt
        lim.settle(lim.acquire_now(s, 0), 0)
    clock.t = T0 + 30
    assert lim.acquire_now([scope("other", rpm=5)], 0).headers() == {
        "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "60"}
    err = refused(lim, s)
    assert err.reason == "rate_limited:rpm" and err.http_status == 429
    # The oldest request (t=0) leaves the window at t=60: 30 s from now.
    assert err.headers() == {"Retry-After": "30", "X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0",
                             "X-RateLimit-Reset": "30"}
    clock.t = T0 + 59.9
    refused(lim, s)
    clock.t = T0 + 60
    lim.acquire_now(s, 0)
    refused(lim, s)   # t=10 and t=20 are still in the window


@settings(max_examples=50, deadline=None)
@given(rpm=st.integers(1, 5), gaps=st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=60))
def test_no_60s_span_ever_admits_more_than_rpm(rpm: int, gaps: list[float]) -> None:
    clock = Clock(T0)
    lim = LocalLimiter(clock)
    admitted: list[float] = []
    for gap in gaps:
        clock.t += gap
        try:
            lim.settle(lim.acquire_now([scope(rpm=rpm)], 0), 0)
            admitted.append(clock.t)
        except OverLimit:
            pass
    for t in admitted:
        assert sum(1 for u in admitted if t <= u < t + 60) <= rpm


# ------------------------------------------------------------------ tpm


def test_tpm_charges_the_estimate_then_the_real_count() -> None:
    clock = Clock(T0)
    lim = LocalLimiter(clock)
    s = [scope(tpm=100)]
    first = lim.acquire_now(s, 60)            # estimated from max_tokens
    clock.t = T0 + 5
    err = refused(lim, s, 50)                 # 60 + 50 > 100
    assert err.reason == "rate_limited:tpm" and err.remaining == 40 and err.retry_after == 55
    lim.settle(first, 30)                     # the response said 30 tokens in all
    second = lim.acquire_now(s, 50)           # 30 + 50 <= 100
    lim.settle(second, 70)                    # more than estimated: 100 used
    assert refused(lim, s, 1).remaining == 0
    clock.t = T0 + 60                         # the first charge leaves the window
    lim.acquire_now(s, 30)


def test_tpm_estimate_over_the_limit_can_never_fit() -> None:
    err = refused(LocalLimiter(Clock(T0)), [scope(tpm=10)], 11)
    assert err.reason == "rate_limited:tpm" and err.retry_after == 60


def test_correction_after_the_charge_left_the_window_does_not_count() -> None:
    clock = Clock(T0)
    lim = LocalLimiter(clock)
    s = [scope(tpm=100)]
    long_stream = lim.acquire_now(s, 10)
    clock.t = T0 + 90
    lim.settle(long_stream, 500)             # the stream ran 90 s; its charge is gone from the window
    lim.acquire_now(s, 100)


@pytest.mark.parametrize("real", [500, 0])   # more than the estimate, and less (a negative correction)
def test_settling_a_charge_another_request_already_expired_leaves_the_window_alone(real: int) -> None:
    clock = Clock(T0)
    lim = LocalLimiter(clock)
    s = [scope(tpm=100)]
    long_stream = lim.acquire_now(s, 10)
    clock.t = T0 + 61
    lim.acquire_now(s, 5)                    # this admission expires the stream's charge from the window
    lim.settle(long_stream, real)            # the stream's real count arrives after its charge left
    # Only the 5 charged at T0 + 61 are in the window: 95 more fit, 96 do not.
    err = refused(lim, s, 96)
    assert err.remaining == 95 and err.retry_after == 60
    lim.acquire_now(s, 95)
    assert refused(lim, s, 1).remaining == 0


# ------------------------------------------------------------------ concurrency


def test_concurrency_slots_are_released_by_settle_once() -> None:
    lim = LocalLimiter(Clock(T0))
    s = [scope(concurrency=2)]
    a, b = lim.acquire_now(s, 0), lim.acquire_now(s, 0)
    err = refused(lim, s)
    assert err.reason == "rate_limited:concurrency" and err.headers()["X-RateLimit-Limit"] == "2"
    lim.settle(a, 0)
    lim.settle(a, 0)                         # idempotent: a second settle frees nothing more
    c = lim.acquire_now(s, 0)
    assert lim.in_flight("k") == 2
    refused(lim, s)
    lim.settle(b, 0)
    lim.settle(c, 0)
    assert lim.in_flight("k") == 0


# ------------------------------------------------------------------ budgets


def test_daily_budget_resets_at_utc_midnight() -> None:
    clock = Clock(at("2026-11-29T23:59:00"))
    lim = LocalLimiter(clock)
    s = [scope(daily_tokens=100)]
    lim.settle(lim.acquire_now(s, 20), 90)
    err = refused(lim, s, 20)
    assert err.reason == "rate_limited:daily_tokens"
    assert (err.remaining, err.retry_after, err.reset_s) == (10, 60, 60)
    lim.acquire_now(s, 10)                   # exactly the rest of the budget
    clock.t = at("2026-11-30T00:00:00")
    lim.acquire_now(s, 100)


def test_monthly_budget_resets_on_the_first_including_new_year() -> None:
    clock = Clock(at("2026-12-31T23:00:00"))
    lim = LocalLimiter(clock)
    s = [scope(monthly_tokens=50, daily_tokens=0)]
    lim.settle(lim.acquire_now(s, 50), 50)
    err = refused(lim, s, 1)
    assert err.reason == "rate_limited:monthly_tokens" and err.retry_after == 3600
    clock.t = at("2027-01-01T00:00:01")
    lim.acquire_now(s, 50)


def test_day_rollover_keeps_a_late_correction_out_of_the_new_day() -> None:
    clock = Clock(at("2026-11-29T23:59:50"))
    lim = LocalLimiter(clock)
    s = [scope(daily_tokens=100)]
    g = lim.acquire_now(s, 10)
    clock.t = at("2026-11-30T00:00:10")
    lim.acquire_now(s, 95)                    # the new day starts empty
    lim.settle(g, 80)                         # charged to yesterday, which is gone
    lim.acquire_now(s, 5)


# ------------------------------------------------------------------ inheritance


def test_device_keys_share_their_app_keys_limits_and_a_refusal_charges_nothing() -> None:
    lim = LocalLimiter(Clock(T0))
    app = scope("app1", inherited=True, rpm=2, concurrency=5)
    dev_a, dev_b = [scope("devA"), app], [scope("devB", concurrency=1), app]
    lim.acquire_now(dev_a, 0)
    held = lim.acquire_now(dev_b, 0)
    err = refused(lim, dev_a)                 # devA itself is unlimited; its app key is not
    assert err.reason == "rate_limited:rpm@app1"
    assert lim.in_flight("app1") == 2 and lim.in_flight("devA") == 0   # unlimited scopes keep no state
    assert refused(lim, dev_b).reason == "rate_limited:concurrency"   # devB's own limit, checked first
    lim.settle(held, 0)
    assert lim.in_flight("devB") == 0 and lim.in_flight("app1") == 1


def test_unlimited_scopes_are_free() -> None:
    lim = LocalLimiter(Clock(T0))
    for _ in range(1000):
        lim.acquire_now([scope(), scope("p", inherited=True)], 10_000)
    assert lim.in_flight("k") == 0


# ------------------------------------------------------------------ parsing and defaults


def test_parse_limits() -> None:
    assert parse_limits({"rpm": 60, "daily_tokens": 0}) == {"rpm": 60, "daily_tokens": 0}
    assert parse_limits(None) == {}
    assert parse_limits({"monthly_tokens": 2**53 - 1}) == {"monthly_tokens": 2**53 - 1}
    for bad in ({"rps": 1}, {"rpm": -1}, {"rpm": "60"}, {"rpm": True}, {"tpm": 1.5}, {"rpm": 2**53}, {"rpm": 10**30}):
        with pytest.raises(ValueError):
            parse_limits(bad)


def test_role_caps() -> None:
    caps = parse_role_caps(" user=512, guest=64 ,admin=0")
    assert caps == {"user": 512, "guest": 64, "admin": 0}
    assert max_tokens_cap(("guest",), caps) == 64
    assert max_tokens_cap(("guest", "user", "reader"), caps) == 512   # the most generous capped role
    assert max_tokens_cap(("user", "admin"), caps) is None            # admin=0: uncapped
    assert max_tokens_cap(("reader",), caps) is None
    assert parse_role_caps("") == {}
    for bad in ("user", "user=x", "=5", "user=-1"):
        with pytest.raises(ValueError):
            parse_role_caps(bad)


def test_tier_defaults_and_key_overrides() -> None:
    cfg = LimitsSettings(user_rpm=60, user_tpm=1000, app_concurrency=4)
    assert tier_limits(cfg, "user") == Limits(rpm=60, tpm=1000)
    assert tier_limits(cfg, "app") == Limits(concurrency=4)
    assert tier_limits(cfg, "session").unlimited()
    # A key's own 0 means unlimited, overriding the tier's default; unset fields keep it.
    assert tier_limits(cfg, "user").with_overrides({"rpm": 0, "daily_tokens": 5}) == \
        Limits(rpm=0, tpm=1000, daily_tokens=5)



def test_any_one_limit_set_is_not_unlimited() -> None:
    # unlimited() names the fields one by one for speed: a new field must be added there too.
    assert Limits().unlimited()
    for field in LIMIT_FIELDS:
        assert not Limits(**{field: 1}).unlimited(), field


@given(st.lists(st.tuples(st.floats(0, 5), st.booleans()), max_size=300))
def test_time_log_matches_a_plain_list(steps: list[tuple[float, bool]]) -> None:
    from proxy.state.limits import _TimeLog
    log, model, now = _TimeLog(), [], 0.0
    for gap, expire in steps:
        now += gap
        if expire:
            log.expire(now - 60.0)
            model = [t for t in model if t > now - 60.0]
        else:
            log.append(now)
            model.append(now)
        assert len(log) == len(model) and bool(log) == bool(model)
        if model:
            assert log.oldest() == model[0]


def test_only_scopes_with_a_tpm_limit_keep_charges() -> None:
    limiter = LocalLimiter(clock=lambda: 1000.0)
    rpm_only, both = scope("a", rpm=100), scope("b", rpm=100, tpm=1000)
    for _ in range(5):
        limiter.settle(limiter.acquire_now([rpm_only, both], 10), 12)
    a, b = limiter._keys["a"], limiter._keys["b"]
    assert len(a.requests) == 5 and not a.charges and a.tpm_used == 0
    assert len(b.requests) == 5 and len(b.charges) == 5 and b.tpm_used == 60


async def test_the_limit_step_charges_what_the_body_asks_for_only_where_tokens_are_counted() -> None:
    """The estimate (the body view's max_tokens, else limits.default_estimate_tokens) is charged only
    where a scope counts tokens; a key without limits gets no grant at all."""
    from types import SimpleNamespace

    from proxy.context import Principal, RequestContext, Resource
    from proxy.settings import load_settings
    from proxy.steps.authz import Authorizer
    from proxy.steps.pipeline import limit

    state = SimpleNamespace(settings=load_settings(None, env={}, overrides={"limits.default_estimate_tokens": 7}),
                            authorizer=Authorizer(), limiter=LocalLimiter(clock=Clock(T0)))
    cases = [({}, 3, None),             # no limit at all: no grant
             ({"rpm": 10}, 3, 0),       # requests counted only: charged no tokens
             ({"tpm": 100}, 3, 3),      # a token limit: charged what the body asks for
             ({"tpm": 100}, None, 7)]   # names no max_tokens: charged the default estimate
    for i, (own, asked, charged) in enumerate(cases):
        ctx = RequestContext(request_id=f"r{i}", client_ip="127.0.0.1")
        ctx.principal = Principal(f"k{i}", "user", "u", limits=((f"k{i}", "user", own),))
        ctx.resource = Resource("model:deepseek", "infer", model="deepseek")
        await limit(state, ctx, asked)  # type: ignore[arg-type]
        if charged is None:
            assert ctx.limit_grant is None
        else:
            assert ctx.limit_grant is not None and ctx.limit_grant.tokens == charged, (own, asked)


async def test_a_default_is_fitted_to_every_budget_left_and_only_a_default() -> None:
    """limit(fit=True), the OpenAI door's default max_tokens: a device key's own daily budget and its app
    key's monthly one both have less left than asked; the grant is what the tighter leaves, charged to
    both. Without fit (a max_tokens the client named), the same ask is a 429 that charges nothing; with
    nothing left, fit or not, a 429 too; a refusal that is no token budget's (concurrency) is never fitted."""
    from types import SimpleNamespace

    from proxy.context import Principal, RequestContext, Resource
    from proxy.settings import load_settings
    from proxy.steps.authz import Authorizer
    from proxy.steps.pipeline import limit

    limiter = LocalLimiter(clock=Clock(T0))
    state = SimpleNamespace(settings=load_settings(None, env={}), authorizer=Authorizer(), limiter=limiter)
    chain = (("dev", "device", {"daily_tokens": 100}), ("app", "app", {"monthly_tokens": 60}))

    def ctx_for(chain: tuple[tuple[str, str, dict[str, int]], ...]) -> RequestContext:
        ctx = RequestContext(request_id="r", client_ip="127.0.0.1")
        ctx.principal = Principal(chain[0][0], chain[0][1], "o", limits=chain)
        ctx.resource = Resource("model:deepseek", "infer", model="deepseek")
        return ctx

    with pytest.raises(OverLimit):
        await limit(state, ctx_for(chain), 512)  # type: ignore[arg-type]
    ctx = ctx_for(chain)
    assert await limit(state, ctx, 512, fit=True) == 60  # type: ignore[arg-type]
    assert ctx.limit_grant.tokens == 60
    assert (limiter._keys["dev"].day.used, limiter._keys["app"].month.used) == (60, 60)
    with pytest.raises(OverLimit) as over:
        await limit(state, ctx_for(chain), 512, fit=True)  # type: ignore[arg-type]
    assert over.value.kind == "monthly_tokens"
    busy = (("busy", "user", {"concurrency": 1, "daily_tokens": 10}),)
    assert await limit(state, ctx_for(busy), 512, fit=True) == 10  # type: ignore[arg-type]
    with pytest.raises(OverLimit) as over:
        await limit(state, ctx_for(busy), 1, fit=True)  # type: ignore[arg-type]
    assert over.value.kind == "concurrency"
