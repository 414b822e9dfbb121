"""Tests for proxy.authz: decisions under the default and custom policies, and hot reload."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from proxy.context import Principal, Resource
from proxy.steps.authz import Authorizer, Decision, Env, PolicyWatcher
from proxy.steps.policy import PolicyError, PolicySet, compile_rules

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "policies"
NOON = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
USER = Principal("k_user", "user", "bob", models=("deepseek",))
ADMIN = Principal("k_admin", "user", "ops", roles=("admin",))

ADMIN_ONLY = [("repository", "admin"), ("sharedmemory", "admin"), ("trace", "admin"),
              ("logging", "admin"), ("statistics", "admin"), ("admin:keys", "admin"),
              ("admin:crypto", "admin")]


def authz(*rules: dict[str, Any]) -> Authorizer:
    return Authorizer(compile_rules(list(rules)))


def rule(id: str, effect: str = "allow", resources: tuple[str, ...] = ("*",),
         actions: tuple[str, ...] = ("*",), **extra: Any) -> dict[str, Any]:
    return {"id": id, "effect": effect, "resources": list(resources), "actions": list(actions), **extra}


def decide(a: Authorizer, p: Principal, res: str, act: str, ip: str = "10.0.0.1",
           now: datetime = NOON) -> Decision:
    return a.authorize(p, Resource(res, act), ip, now)


# ---------------------------------------------------------------- the shipped default policy

@pytest.fixture(scope="module")
def default() -> Authorizer:
    return Authorizer.from_dir(DEFAULT_DIR)


@pytest.mark.parametrize("res, act, allowed, rule_id", [
    ("model:deepseek", "infer", True, "models-use"),
    ("model:deepseek", "read", True, "models-use"),
    ("model:other", "infer", False, "default_deny"),
    ("model:other", "read", False, "default_deny"),
    ("server", "read", True, "server-read"),
    ("server", "admin", False, "default_deny"),
    *[(r, a, False, "deny-triton-admin") for r, a in ADMIN_ONLY],
])
def test_default_policy_user_key(default: Authorizer, res: str, act: str, allowed: bool,
                                 rule_id: str) -> None:
    assert decide(default, USER, res, act) == Decision(allowed, rule_id)


@pytest.mark.parametrize("res, act", [("model:deepseek", "infer"), ("model:other", "read"),
                                      ("server", "read"), *ADMIN_ONLY])
def test_default_policy_admin_key(default: Authorizer, res: str, act: str) -> None:
    assert decide(default, ADMIN, res, act) == Decision(True, "admin-all")


def test_default_policy_key_without_model_list_may_use_any_model(default: Authorizer) -> None:
    anykey = Principal("k_any", "session", "eve")
    assert decide(default, anykey, "model:whatever", "infer") == Decision(True, "models-use")
    assert decide(default, anykey, "sharedmemory", "admin").allowed is False


# ---------------------------------------------------------------- conditions

def test_key_may_use_model_true_and_false() -> None:
    a = authz(rule("use", resources=("model:*",), subject={"key_may_use_model": True}),
              rule("not-mine", "deny", subject={"key_may_use_model": False}))
    restricted = Principal("k", "app", "o", models=("a", "b"))
    assert decide(a, restricted, "model:b", "infer") == Decision(True, "use")
    assert decide(a, restricted, "model:c", "infer") == Decision(False, "not-mine")
    # Neither value holds on a resource that names no model.
    b = authz(rule("all"), rule("not-mine", "deny", subject={"key_may_use_model": False}))
    assert decide(b, restricted, "server", "read") == Decision(True, "all")


def test_subject_conditions() -> None:
    a = authz(rule("r", subject={"roles": ["ml", "ops"], "not_roles": ["banned"], "tiers": ["user", "app"],
                                 "owners": ["bob"], "labels": {"team": "nlp", "env": "prod"}}))
    ok = Principal("k", "user", "bob", roles=("ml",), labels={"team": "nlp", "env": "prod", "x": "y"})
    assert decide(a, ok, "server", "read").allowed
    for bad in (Principal("k", "user", "bob", roles=("dev",), labels=ok.labels),
                Principal("k", "user", "bob", roles=("ml", "banned"), labels=ok.labels),
                Principal("k", "session", "bob", roles=("ml",), labels=ok.labels),
                Principal("k", "user", "eve", roles=("ml",), labels=ok.labels),
                Principal("k", "user", "bob", roles=("ml",), labels={"team": "nlp"})):
        assert decide(a, bad, "server", "read") == Decision(False, "default_deny"), bad


def test_client_ip_cidrs() -> None:
    a = authz(rule("vpn", environment={"client_ips": ["10.0.0.0/8", "2001:db8::/32"]}))
    assert decide(a, USER, "server", "read", ip="10.9.8.7").allowed
    assert decide(a, USER, "server", "read", ip="::ffff:10.9.8.7").allowed  # dual-stack socket
    assert decide(a, USER, "server", "read", ip="2001:db8::1").allowed
    for ip in ("192.168.1.1", "2001:db9::1", "", "unix:/run/x.sock"):
        assert decide(a, USER, "server", "read", ip=ip) == Decision(False, "default_deny"), ip


def test_apis_tell_the_openai_door_from_tritons_protocol() -> None:
    a = authz(rule("openai-only", resources=("model:*",), environment={"apis": ["openai"]}))
    openai_call, kserve_call = Resource("model:deepseek", "infer", api="openai"), Resource("model:deepseek", "infer")
    assert a.authorize(USER, openai_call, "10.0.0.1", NOON) == Decision(True, "openai-only")
    # The memo keys the API too: the decision for one API is never served for the other.
    assert a.authorize(USER, kserve_call, "10.0.0.1", NOON) == Decision(False, "default_deny")
    with pytest.raises(PolicyError, match="unknown api 'opneai'"):
        compile_rules([rule("typo", environment={"apis": ["opneai"]})])


def test_hours_in_utc_including_wrap_around_midnight() -> None:
    a = authz(rule("office", resources=("server",), environment={"hours": "08:00-18:00"}),
              rule("night", resources=("model:*",), environment={"hours": ["22:00-02:00"]}))
    at = lambda h, m=0: datetime(2024, 5, 1, h, m, tzinfo=timezone.utc)  # noqa: E731
    assert decide(a, USER, "server", "read", now=at(8)).allowed
    assert decide(a, USER, "server", "read", now=at(17, 59)).allowed
    assert not decide(a, USER, "server", "read", now=at(18)).allowed
    assert not decide(a, USER, "server", "read", now=at(7, 59)).allowed
    # 09:30 in UTC+2 is 07:30 UTC: outside office hours; naive datetimes are UTC.
    assert not decide(a, USER, "server", "read", now=at(9, 30).replace(tzinfo=timezone(timedelta(hours=2)))).allowed
    assert decide(a, USER, "server", "read", now=datetime(2024, 5, 1, 9, 30)).allowed
    for h, ok in ((22, True), (23, True), (1, True), (2, False), (12, False)):
        assert decide(a, USER, "model:x", "infer", now=at(h)).allowed is ok, h


def test_env_at() -> None:
    assert Env.at("::ffff:1.2.3.4", NOON) == Env.at("1.2.3.4", NOON)
    assert Env.at("bogus", NOON).ip is None and Env.at("1.2.3.4", NOON).minute == 720


# ---------------------------------------------------------------- combining rules

def test_deny_overrides_allow_and_names_the_deny_rule() -> None:
    a = authz(rule("allow-all"), rule("no-trace", "deny", resources=("trace",)),
              rule("allow-trace", resources=("trace",), actions=("admin",)))
    assert decide(a, USER, "trace", "admin") == Decision(False, "no-trace")
    assert decide(a, USER, "logging", "admin") == Decision(True, "allow-all")


def test_first_matching_allow_rule_in_load_order_is_reported() -> None:
    a = authz(rule("broad", resources=("model:*",)), rule("narrow", resources=("model:deepseek",)))
    assert decide(a, USER, "model:deepseek", "infer") == Decision(True, "broad")
    b = authz(rule("narrow", resources=("model:deepseek",)), rule("broad", resources=("model:*",)))
    assert decide(b, USER, "model:deepseek", "infer") == Decision(True, "narrow")


def test_globs_and_actions() -> None:
    a = authz(rule("r", resources=("model:deep*", "s?rver"), actions=("read",)))
    assert decide(a, USER, "model:deepseek", "read").allowed and decide(a, USER, "server", "read").allowed
    assert not decide(a, USER, "model:llama", "read").allowed
    assert not decide(a, USER, "model:deepseek", "infer").allowed


def test_empty_policy_denies_everything(tmp_path: Path) -> None:
    for a in (Authorizer(), Authorizer(PolicySet()), Authorizer.from_dir(tmp_path)):
        for p in (USER, ADMIN):
            assert decide(a, p, "model:deepseek", "infer") == Decision(False, "default_deny")
            assert decide(a, p, "server", "read") == Decision(False, "default_deny")


def test_install_bumps_version_and_drops_cached_decisions() -> None:
    a = authz(rule("all"))
    assert a.version == 1 and decide(a, USER, "server", "read").allowed
    a.install(compile_rules([rule("none", "deny")]))
    assert a.version == 2 and decide(a, USER, "server", "read") == Decision(False, "none")


def test_from_dir_refuses_a_broken_policy(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("rules: [{id: x, effect: alow}]\n")
    with pytest.raises(PolicyError, match="p.yaml:1"):
        Authorizer.from_dir(tmp_path)


# ---------------------------------------------------------------- hot reload

ALLOW_SERVER = "rules: [{id: open, effect: allow, resources: [server], actions: [read]}]\n"
DENY_SERVER = "rules: [{id: closed, effect: deny, resources: [server], actions: ['*']}]\n"


def edit(f: Path, text: str) -> None:
    f.write_text(text)
    st = f.stat()  # a coarse-mtime filesystem must still see the change
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def wait_for(cond: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_edit_on_disk_changes_decision_within_two_seconds(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(ALLOW_SERVER)
    a = Authorizer.from_dir(tmp_path)
    reloads: list[int] = []
    watcher = PolicyWatcher(a, tmp_path, on_reload=lambda: reloads.append(a.version))  # default 0.5 s
    await watcher.start()
    try:
        assert decide(a, USER, "server", "read") == Decision(True, "open")
        edit(f, DENY_SERVER)
        await wait_for(lambda: not decide(a, USER, "server", "read").allowed, timeout=2.0)
        assert decide(a, USER, "server", "read") == Decision(False, "closed") and reloads == [2]
    finally:
        await watcher.stop()


async def test_broken_edit_keeps_last_good_policy(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(ALLOW_SERVER)
    a = Authorizer.from_dir(tmp_path)
    errors: list[str] = []
    reloads: list[int] = []
    watcher = PolicyWatcher(a, tmp_path, interval=0.05, on_error=errors.append,
                            on_reload=lambda: reloads.append(a.version))
    await watcher.start()
    try:
        edit(f, "rules: [{id: open, effect: alow, resources: [server], actions: [read]}]\n")
        await wait_for(lambda: bool(errors), timeout=2.0)
        assert "p.yaml:1: rule 'open': unknown effect 'alow'" in errors[0]
        assert a.version == 1 and decide(a, USER, "server", "read") == Decision(True, "open")
        await asyncio.sleep(0.3)
        assert len(errors) == 1  # reported once per edit, not once per poll
        (tmp_path / "q.yml").write_text(DENY_SERVER)  # a new file fixes nothing: p.yaml is still broken
        await wait_for(lambda: len(errors) == 2, timeout=2.0)
        edit(f, ALLOW_SERVER)  # fixed: both files load, the deny in q.yml wins
        await wait_for(lambda: bool(reloads), timeout=2.0)
        assert a.version == 2 and decide(a, USER, "server", "read") == Decision(False, "closed")
        (tmp_path / "q.yml").unlink()
        await wait_for(lambda: a.version == 3, timeout=2.0)
        assert decide(a, USER, "server", "read") == Decision(True, "open")
    finally:
        await watcher.stop()


async def test_a_policy_file_whose_symlink_target_vanished_fails_the_reload_not_its_rules(
        tmp_path: Path) -> None:
    """A policy file that is a symlink (a mounted ConfigMap or secret, a shared volume) whose target
    is gone cannot be read: its deny rules must stay in force, not silently leave the policy."""
    d, shared = tmp_path / "pol", tmp_path / "shared"
    d.mkdir()
    shared.mkdir()
    (d / "p.yaml").write_text(ALLOW_SERVER)
    (shared / "deny.yaml").write_text(DENY_SERVER)
    (d / "q.yml").symlink_to(shared / "deny.yaml")
    a = Authorizer.from_dir(d)
    assert decide(a, USER, "server", "read") == Decision(False, "closed")
    errors: list[str] = []
    watcher = PolicyWatcher(a, d, on_error=errors.append)
    await watcher.start()
    (shared / "deny.yaml").unlink()
    for _ in range(3):   # a change is loaded once two polls agree on it
        await watcher.poll()
    assert errors and "q.yml" in errors[0]
    assert a.version == 1 and decide(a, USER, "server", "read") == Decision(False, "closed")
    with pytest.raises(PolicyError, match="q.yml"):   # and a start with it fails closed
        Authorizer.from_dir(d)


async def test_an_edit_made_while_the_server_starts_is_loaded(tmp_path: Path) -> None:
    """The policy is read first at start-up and the watcher starts seconds later (store, keyring and
    Triton in between): an edit made in that window must be loaded, not taken for the policy in force."""
    f = tmp_path / "p.yaml"
    f.write_text(ALLOW_SERVER)
    a = Authorizer.from_dir(tmp_path)
    edit(f, DENY_SERVER)   # while the rest of the server starts
    watcher = PolicyWatcher(a, tmp_path)
    await watcher.start()
    for _ in range(2):   # a change is loaded once two polls agree on it
        await watcher.poll()
    assert a.version == 2 and decide(a, USER, "server", "read") == Decision(False, "closed")


async def test_watcher_survives_a_failing_callback_and_a_vanished_dir(tmp_path: Path) -> None:
    d = tmp_path / "pol"
    d.mkdir()
    (d / "p.yaml").write_text(ALLOW_SERVER)
    a = Authorizer.from_dir(d)
    errors: list[str] = []

    def boom() -> None:
        raise RuntimeError("callback bug")

    watcher = PolicyWatcher(a, d, interval=0.05, on_reload=boom, on_error=errors.append)
    await watcher.start()
    try:
        edit(d / "p.yaml", DENY_SERVER)
        await wait_for(lambda: a.version == 2, timeout=2.0)
        (d / "p.yaml").unlink()
        d.rmdir()
        await wait_for(lambda: bool(errors), timeout=2.0)
        assert "does not exist" in errors[0] and a.version == 2
    finally:
        await watcher.stop()
    await watcher.stop()  # idempotent


# ---------------------------------------------------------------- the decision cache

def test_cached_decisions_never_outlive_what_they_depend_on() -> None:
    """Warm the cache with an allow, then change one input at a time: each must be decided afresh."""
    from dataclasses import replace
    a = authz(rule("ml-team", resources=("model:*",), subject={"roles": ["ml"], "labels": {"team": "nlp"},
                                                              "tiers": ["user"], "owners": ["bob"],
                                                              "key_may_use_model": True},
                   environment={"client_ips": ["10.0.0.0/8"], "hours": "08:00-18:00"}))
    p = Principal("k_ml", "user", "bob", roles=("ml",), labels={"team": "nlp"}, models=("deepseek",))
    at = lambda h, m=0: datetime(2024, 5, 1, h, m, tzinfo=timezone.utc)  # noqa: E731
    for _ in range(2):   # the second pass is served from the cache
        assert decide(a, p, "model:deepseek", "infer", now=at(17, 59)) == Decision(True, "ml-team")
    changed = [replace(p, roles=("ops",)), replace(p, labels={"team": "vision"}), replace(p, tier="app"),
               replace(p, owner="eve"), replace(p, models=("other",))]
    for q in changed:
        assert not decide(a, q, "model:deepseek", "infer", now=at(17, 59)).allowed, q
    assert not decide(a, p, "model:deepseek", "infer", ip="192.168.0.1", now=at(17, 59)).allowed
    assert not decide(a, p, "model:deepseek", "infer", now=at(18, 0)).allowed   # the next minute: closed
    assert decide(a, p, "model:deepseek", "infer", now=at(17, 59)).allowed      # and the old one still open


def test_keys_alike_share_one_entry_and_unread_environment_is_not_keyed() -> None:
    a = authz(rule("all"))   # no rule reads the client address or the time
    for i in range(50):
        decide(a, Principal(f"k{i}", "user", "bob"), "server", "read", ip=f"10.0.0.{i}",
               now=NOON + timedelta(minutes=i))
    assert len(a._state.cache) == 1
    b = authz(rule("vpn", environment={"client_ips": ["10.0.0.0/8"]}))
    for i in range(5):
        decide(b, USER, "server", "read", ip=f"10.0.0.{i}", now=NOON + timedelta(minutes=i))
    assert len(b._state.cache) == 5   # the address matters here; the minute still does not


def test_minutes_inside_the_same_time_windows_share_one_memo_entry() -> None:
    a = authz(rule("office", resources=("server",), environment={"hours": "08:00-18:00"}),
              rule("night", resources=("server",), effect="deny", environment={"hours": ["17:00-19:00"]}))
    at = lambda h, m=0: datetime(2024, 5, 1, h, m, tzinfo=timezone.utc)  # noqa: E731
    for minute in range(0, 60, 7):   # 09:00..09:56: office open, night closed: one class
        assert decide(a, USER, "server", "read", now=at(9, minute)).allowed
    assert len(a._state.cache) == 1
    decide(a, ADMIN, "server", "read", now=at(9, 59))
    assert len(a._state.cache) == 2   # another principal, same class: both kept
    # Each change of open windows is decided afresh, and the entries of the windows that ended go.
    for when, allowed in ((at(17, 30), False),    # both windows: deny wins
                          (at(18, 30), False),    # night only
                          (at(3), False),         # neither
                          (at(16, 59), True)):    # back in the first class
        assert decide(a, USER, "server", "read", now=when).allowed is allowed
        assert len(a._state.cache) == 1


def test_decision_cache_stays_bounded_and_keeps_the_recently_used() -> None:
    from proxy.steps import authz as authz_module
    a = authz(rule("all"))
    hot = Principal("k_hot", "user", "hot-owner")
    for i in range(authz_module._CACHE_MAX + 500):
        decide(a, Principal(f"k{i}", "user", f"owner{i}"), "server", "read")
        if i % 1000 == 0:
            decide(a, hot, "server", "read")
    cache = a._state.cache
    assert len(cache) == authz_module._CACHE_MAX
    assert any(k[1] == "hot-owner" for k in cache)          # used lately: kept
    assert not any(k[1] == "owner0" for k in cache)         # the oldest: evicted


def test_client_certs_match_the_subject_or_a_san_and_no_certificate_matches_none() -> None:
    a = authz(rule("billing-cert", resources=("server",),
                   environment={"client_certs": ["URI:spiffe://example.org/billing", "CN=ops,O=example"]}))
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    allowed = a.authorize(USER, Resource("server", "read"), "10.0.0.1", now,
                          ("CN=billing,O=example", "URI:spiffe://example.org/billing"))
    assert allowed == Decision(True, "billing-cert")
    assert a.authorize(USER, Resource("server", "read"), "10.0.0.1", now, ("CN=ops,O=example",)).allowed
    # Memoised decisions keep certificates apart: another identity, or none, is not served from the cache.
    for certs in (("URI:spiffe://example.org/ledger",), ()):
        assert a.authorize(USER, Resource("server", "read"), "10.0.0.1", now, certs) == Decision(False, "default_deny")
