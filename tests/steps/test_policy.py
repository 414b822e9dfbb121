"""Tests for proxy.policy: loading, validation with line numbers, and the compiler's totality."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.context import Principal, Resource
from proxy.steps.authz import Authorizer, Decision, build_enforcer
from proxy.steps.policy import (
    ACTIONS,
    DEFAULT_DENY,
    PolicyError,
    check_policy_dir,
    compile_rules,
    load_policy_dir,
    policy_files,
)

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "policies"


def write(d: Path, name: str, text: str) -> Path:
    f = d / name
    f.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return f


def test_shipped_default_policy_is_valid() -> None:
    assert check_policy_dir(DEFAULT_DIR) == []
    ids = [r.id for r in load_policy_dir(DEFAULT_DIR).rules]
    assert ids == ["admin-all", "models-use", "sessions-mint", "server-read", "deny-triton-admin"]


def test_rule_fields_are_parsed(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", """
        rules:
          - id: r1
            effect: allow
            description: office hours from the VPN
            subject: {roles: [ml], not_roles: [intern], tiers: [user], owners: [bob],
                      labels: {team: nlp}, key_may_use_model: true}
            resources: ["model:*", server]
            actions: [infer, read]
            environment: {client_ips: [10.0.0.0/8, "::1/128"], hours: ["08:00-18:00", "22:00-02:00"]}
    """)
    (r,) = load_policy_dir(tmp_path).rules
    assert (r.id, r.effect, r.resources, r.actions) == ("r1", "allow", ("model:*", "server"),
                                                         ("infer", "read"))
    assert r.subject.roles == ("ml",) and r.subject.not_roles == ("intern",)
    assert r.subject.labels == (("team", "nlp"),) and r.subject.key_may_use_model is True
    assert [str(n) for n in r.environment.client_ips] == ["10.0.0.0/8", "::1/128"]
    assert r.environment.hours == ((480, 1080), (1320, 120))
    assert r.source == f"{tmp_path / 'a.yaml'}:2"


def test_files_load_in_sorted_order_and_hidden_or_other_files_are_skipped(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", "rules: [{id: b, effect: allow, resources: [server], actions: [read]}]\n")
    write(tmp_path, "a.yaml", "rules: [{id: a, effect: allow, resources: [server], actions: [read]}]\n")
    write(tmp_path, ".a.yaml.swp.yaml", "not: [valid\n")
    write(tmp_path, "notes.txt", "rules: nonsense\n")
    write(tmp_path, "c.yaml", "# only a comment\n")
    assert [f.name for f in policy_files(tmp_path)] == ["a.yaml", "b.yml", "c.yaml"]
    assert [r.id for r in load_policy_dir(tmp_path).rules] == ["a", "b"]


def test_every_error_in_every_file_is_reported_with_file_and_line(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", """
        rules:
          - id: foo
            effect: alow
            resources: [repositry, "model:*"]
            actions: [infr]
            colour: blue
          - id: bar
            effect: allow
            resources: [server]
            actions: [read]
            subject:
              tiers: [robot]
              labels: {gpu: yes}
              key_may_use_model: "yes"
            environment:
              client_ips: [10.0.0.0/33]
              hours: "18:00-08:60"
    """)
    b = write(tmp_path, "b.yaml", """
        rules:
          - id: foo
            effect: deny
            resources: [server]
            actions: ["*"]
          - effect: deny
            id: 7
            resources: server
            actions: []
    """)
    c = write(tmp_path, "c.yaml", "rules:\n  - id: x\n    effect: [allow\n")
    errors = check_policy_dir(tmp_path)
    expected = [
        f"{a}:3: rule 'foo': unknown effect 'alow'",
        f"{a}:4: rule 'foo': unknown resource 'repositry'",
        f"{a}:5: rule 'foo': unknown action 'infr'",
        f"{a}:6: rule 'foo': unknown key 'colour' in rule",
        f"{a}:12: rule 'bar': unknown tier 'robot'",
        f"{a}:13: rule 'bar': label 'gpu': True must map a string to a string",
        f"{a}:14: rule 'bar': key_may_use_model must be true or false",
        f"{a}:16: rule 'bar': bad CIDR '10.0.0.0/33'",
        f"{a}:17: rule 'bar': bad hour range '18:00-08:60'",
        f"{b}:7: rule id 7 must be a string",
        f"{b}:8: resources must be a non-empty list of strings",
        f"{b}:9: actions must be a non-empty list of strings",
        f"{c}:4: YAML syntax error",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errors), (want, errors)
    # b.yaml's valid rule 'foo' clashes with a.yaml's, even though a.yaml's is broken
    # there is only one well-formed 'foo', so no duplicate is reported for it.
    assert len(errors) == len(expected)
    with pytest.raises(PolicyError) as exc:
        load_policy_dir(tmp_path)
    assert exc.value.errors == errors and str(exc.value) == "\n".join(errors)


def test_duplicate_ids_across_files_and_duplicate_keys(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "rules:\n  - {id: same, effect: allow, resources: [server], actions: [read]}\n")
    b = write(tmp_path, "b.yaml", """
        rules:
          - id: other
            effect: allow
            effect: deny
            resources: [server]
            actions: [read]
          - {id: same, effect: deny, resources: [server], actions: [read]}
    """)
    assert check_policy_dir(tmp_path) == [
        f"{b}:4: rule 'other': duplicate key 'effect' in rule",
        f"{b}:7: duplicate rule id 'same' (first defined at {a}:2)",
    ]


@pytest.mark.parametrize("text, message", [
    ("- just a list\n", "policy file must be a mapping"),
    ("rules: {id: x}\n", "'rules' must be a list of rules"),
    ("rulez: []\n", "unknown key 'rulez' in policy file"),
    ("rules: [42]\n", "a rule must be a mapping, got int"),
    ("rules: [{id: default_deny, effect: allow, resources: [server], actions: [read]}]\n", "rule id"),
    ("rules: [{id: x, effect: allow, resources: ['a|b'], actions: [read]}]\n", "unknown resource"),
    ("rules: [{id: x, effect: allow, resources: ['model:'], actions: [read]}]\n", "unknown resource"),
    ("rules: [{id: x, effect: allow, resources: [server], actions: [read], subject: []}]\n",
     "subject must be a mapping"),
    ("rules: [{id: x, effect: allow, resources: [server], actions: [read], environment: {hours: '09:00-09:00'}}]\n",
     "bad hour range"),
    ("rules: [{id: x, effect: allow, resources: [server], actions: [read], environment: {hours: '24:00-01:00'}}]\n",
     "bad hour range"),
    ("rules: [{id: x, effect: allow, resources: [server], actions: [read], environment: {client_ips: [nope]}}]\n",
     "bad CIDR"),
    ("rules: [{id: x, effect: allow, resources: [server], actions: [read], subject: {labels: [a]}}]\n",
     "subject.labels must be a mapping"),
    ("rules: [{id: x, effect: allow, resources: [server], actions: [read], subject: {roles: [1]}}]\n",
     "subject.roles: 1 is not a non-empty string"),
    ("when: 2024-02-30\n", "YAML syntax error"),
])
def test_single_mistakes_are_caught(tmp_path: Path, text: str, message: str) -> None:
    f = write(tmp_path, "p.yaml", text)
    errors = check_policy_dir(tmp_path)
    assert len(errors) >= 1 and errors[0].startswith(f"{f}:") and message in errors[0], errors


def test_valid_edge_cases(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", """
        rules:
          - &base {id: first, effect: allow, actions: [read], resources: [server]}
          - {<<: *base, id: merged}
          - {id: all-day, effect: allow, resources: ["*", "model:deep*"], actions: ["*"],
             environment: {hours: "00:00-24:00", client_ips: ["10.1.2.3"]}}
    """)
    rules = load_policy_dir(tmp_path).rules
    assert [r.id for r in rules] == ["first", "merged", "all-day"]
    assert rules[1].resources == ("server",) and rules[2].environment.hours == ((0, 1440),)


def test_missing_dir_is_an_error_and_empty_dir_is_an_empty_policy(tmp_path: Path) -> None:
    assert "does not exist" in check_policy_dir(tmp_path / "nope")[0]
    assert load_policy_dir(tmp_path).rules == ()


def test_compile_rules_without_line_info() -> None:
    ps = compile_rules([{"id": "r", "effect": "deny", "resources": ["server"], "actions": ["*"]}])
    assert ps.rules[0].source == "<memory>:1"
    with pytest.raises(PolicyError, match=r"<memory>:1: rule 'r': unknown effect"):
        compile_rules([{"id": "r", "effect": "maybe", "resources": ["server"], "actions": ["*"]}])


# ---------------------------------------------------------------- the compiler is total

_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=12),
                    st.sampled_from(["allow", "deny", "*", "model:*", "server", "admin:keys", "infer",
                                     "read", "admin", "user", "10.0.0.0/8", "::1", "08:00-18:00",
                                     "22:00-24:00", "admin-all", "[", "model:[a-", "x|y"]))
_value = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), _scalar), inner,
                                                 max_size=4)), max_leaves=10)
_keys = st.sampled_from(["id", "effect", "description", "subject", "resources", "actions", "environment",
                         "roles", "not_roles", "tiers", "owners", "labels", "key_may_use_model",
                         "client_ips", "hours", "other"])
_junk_rule = st.dictionaries(_keys, st.one_of(_value, st.dictionaries(_keys, _value, max_size=4)), max_size=8)
# Well-formed rules, some with one field swapped for junk, so that the success
# path and every single-mistake path are exercised too.
_names = st.lists(st.sampled_from(["admin", "ml", "user", "bob"]), min_size=1, max_size=3)
_valid_rule = st.fixed_dictionaries(
    {"id": st.sampled_from(["a", "b", "c", "r.1"]),
     "effect": st.sampled_from(["allow", "deny"]),
     "resources": st.lists(st.sampled_from(["*", "model:*", "model:deepseek", "model:m", "server",
                                            "repository", "admin:keys", "s?rver"]), min_size=1, max_size=3),
     "actions": st.lists(st.sampled_from(["*", "infer", "read", "admin"]), min_size=1, max_size=3)},
    optional={"subject": st.fixed_dictionaries({}, optional={
        "roles": _names, "not_roles": _names, "owners": _names,
        "tiers": st.lists(st.sampled_from(["app", "device", "user", "session"]), min_size=1),
        "labels": st.dictionaries(st.sampled_from(["a", "env"]), st.sampled_from(["b", "prod"]), max_size=2),
        "key_may_use_model": st.booleans()}),
     "environment": st.fixed_dictionaries({}, optional={
         "client_ips": st.lists(st.sampled_from(["10.0.0.0/8", "10.0.0.1", "::/0"]), min_size=1),
         "hours": st.sampled_from(["08:00-18:00", "22:00-02:00", "00:00-24:00", ["09:00-10:00"]])}),
     "description": st.just("text")})
_mutated_rule = st.tuples(_valid_rule, _keys, _value).map(lambda t: {**t[0], t[1]: t[2]})
_rule = st.one_of(_valid_rule, _mutated_rule, _junk_rule)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(_valid_rule, max_size=3), st.lists(_rule, max_size=4), _value))
def test_random_rules_compile_or_raise_policy_error(raw: object) -> None:
    try:
        policy = compile_rules(raw)
    except PolicyError as e:
        assert e.errors and all(msg.startswith("<memory>:") for msg in e.errors)
        return
    build_enforcer(policy)
    decision = Authorizer(policy).authorize(
        Principal("k", "user", "o", roles=("admin",), labels={"a": "b"}, models=("m",)),
        Resource("model:m", "infer"), "10.0.0.1", datetime(2024, 1, 1, 9, tzinfo=timezone.utc))
    assert isinstance(decision, Decision)


def test_rule_limits_are_parsed_and_checked(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", """
        rules:
          - id: interns
            effect: allow
            subject: {roles: [intern]}
            resources: ["model:*"]
            actions: [infer]
            limits: {rpm: 10, tpm: 5000}
    """)
    (r,) = load_policy_dir(tmp_path).rules
    assert r.limits == (("rpm", 10), ("tpm", 5000))
    a = Authorizer(load_policy_dir(tmp_path))
    assert a.rule_limits("interns") is not None and a.rule_limits("interns").rpm == 10
    assert a.rule_limits("other") is None and a.rule_limits(None) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    write(bad, "b.yaml", """
        rules:
          - {id: d, effect: deny, resources: [server], actions: [read], limits: {rpm: 1}}
          - {id: u, effect: allow, resources: [server], actions: [read], limits: {rps: 1}}
          - {id: n, effect: allow, resources: [server], actions: [read], limits: {rpm: -1}}
          - {id: e, effect: allow, resources: [server], actions: [read], limits: {}}
    """)
    errors = check_policy_dir(bad)
    assert len(errors) == 4
    assert "rule 'd': limits on a deny rule would never apply" in errors[0]
    assert "unknown limit 'rps'" in errors[1] and "must be an integer 0 or more" in errors[2]
    assert "non-empty mapping" in errors[3]


# ---------------------------------------------------------------- deny wins, and nothing allows by default

_principal = st.builds(
    lambda tier, owner, roles, labels, models: Principal("k", tier, owner, roles=roles, labels=labels,
                                                         models=models),
    st.sampled_from(["app", "device", "user", "session"]), st.sampled_from(["admin", "ml", "bob"]),
    st.lists(st.sampled_from(["admin", "ml", "user", "bob"]), max_size=3).map(tuple),
    st.dictionaries(st.sampled_from(["a", "env"]), st.sampled_from(["b", "prod"]), max_size=2),
    st.lists(st.sampled_from(["m", "deepseek", "*"]), max_size=2).map(tuple))
_resource = st.builds(Resource, st.sampled_from(["model:m", "model:deepseek", "server", "repository",
                                                  "admin:keys", "sessions", "statistics"]),
                      st.sampled_from(sorted(ACTIONS)))
_request = st.tuples(_principal, _resource, st.sampled_from(["10.0.0.1", "192.168.1.1", "::1"]),
                     st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2024, 1, 2),
                                  timezones=st.just(timezone.utc)))
_unique_rules = st.lists(_valid_rule, max_size=4, unique_by=lambda r: r["id"])
DENY_ALL = {"id": "zz-deny-all", "effect": "deny", "resources": ["*"], "actions": ["*"]}


@settings(max_examples=300, deadline=None)
@given(_unique_rules, st.lists(_request, min_size=1, max_size=5))
def test_no_allow_rule_or_a_matching_deny_rule_never_allows(rules: list[dict[str, object]],
                                                             requests: list[tuple[Principal, Resource, str,
                                                                                  datetime]]) -> None:
    only_denies = compile_rules([{**r, "effect": "deny"} for r in rules])
    with_deny_all = compile_rules([*rules, DENY_ALL])
    as_written = compile_rules(rules)
    allow_ids = {r["id"] for r in rules if r["effect"] == "allow"}
    deny_ids = {r["id"] for r in rules if r["effect"] == "deny"}
    for principal, resource, ip, now in requests:
        assert not Authorizer(only_denies).authorize(principal, resource, ip, now).allowed
        assert not Authorizer(with_deny_all).authorize(principal, resource, ip, now).allowed
        decision = Authorizer(as_written).authorize(principal, resource, ip, now)
        # An allow is always some allow rule's doing; a refusal names a deny rule or the default.
        assert decision.rule in (allow_ids if decision.allowed else deny_ids | {DEFAULT_DENY})
