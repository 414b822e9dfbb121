"""/admin/v1/policies: the rules in force with file and line, the last reload, and the evaluator."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.frontend.test_http import call
from tests.gateway import Gateway, wait_for


def listing(gw: Gateway, admin: str) -> dict[str, Any]:
    status, _, raw = call(gw.url + "/admin/v1/policies", key=admin)
    assert status == 200
    return json.loads(raw)


def evaluate(gw: Gateway, admin: str, question: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, raw = call(gw.url + "/admin/v1/policies/evaluate", "POST", question, admin)
    return status, json.loads(raw)


def test_the_rules_in_force_name_their_file_and_line(gw: Gateway, admin: str) -> None:
    doc = listing(gw, admin)
    rules = {r["id"]: r for r in doc["rules"]}
    lines = (gw.policy_dir / "default.yaml").read_text().splitlines()
    deny = rules["deny-triton-admin"]
    assert deny["effect"] == "deny" and deny["file"].endswith("default.yaml")
    assert lines[deny["line"] - 1].strip() == "- id: deny-triton-admin"
    assert deny["subject"] == {"not_roles": ["admin"]} and "admin:keys" in deny["resources"]
    assert doc["last_reload"] is None


def test_a_broken_edit_is_reported_as_the_last_reload_and_the_old_policy_stays(gw: Gateway, admin: str) -> None:
    version = listing(gw, admin)["version"]
    broken = gw.policy_dir / "zz-broken.yaml"
    broken.write_text("rules:\n  - id: bad\n    effect: maybe\n    resources: [server]\n    actions: [read]\n")
    try:
        assert wait_for(lambda: (listing(gw, admin)["last_reload"] or {}).get("ok") is False, 5.0)
        doc = listing(gw, admin)
        assert doc["version"] == version and "zz-broken.yaml:3" in doc["last_reload"]["error"]
    finally:
        broken.unlink()
    assert wait_for(lambda: (listing(gw, admin)["last_reload"] or {}).get("ok") is True, 5.0)


def test_the_evaluator_gives_the_decision_and_the_deciding_rule(gw: Gateway, admin: str) -> None:
    user = {"tier": "user", "roles": ["user"]}
    assert evaluate(gw, admin, {"principal": user, "method": "POST", "path": "/v2/models/deepseek/generate"}) == (
        200, {"allowed": True, "rule": "models-use", "stage": "authorize", "reason": None, "http_status": None,
              "resource": "model:deepseek", "action": "infer", "model": "deepseek"})
    status, doc = evaluate(gw, admin, {"principal": user, "method": "POST", "path": "/v2/repository/index"})
    assert (doc["allowed"], doc["rule"], doc["http_status"]) == (False, "deny-triton-admin", 403)
    status, doc = evaluate(gw, admin, {"principal": user, "method": "GET", "path": "/v2/nowhere"})
    assert (doc["allowed"], doc["stage"], doc["http_status"]) == (False, "classify", 404)


def test_the_evaluator_reads_a_stored_key_as_authentication_would(gw: Gateway, admin: str) -> None:
    key_id, _ = gw.key(owner="svc", roles=("user",), models=("other-model",))
    status, doc = evaluate(gw, admin, {"key_id": key_id, "path": "/v2/models/deepseek/generate"})
    assert status == 200 and (doc["allowed"], doc["rule"]) == (False, "default_deny")   # not its model
    gw.revoke(key_id)
    status, doc = evaluate(gw, admin, {"key_id": key_id, "path": "/v2/models/other-model/generate"})
    assert (doc["allowed"], doc["stage"], doc["reason"], doc["http_status"]) == (False, "authenticate", "revoked", 401)
    assert evaluate(gw, admin, {"key_id": "aaaaaaaaaaaa", "path": "/v2"})[0] == 404


@pytest.mark.parametrize("question, message", [
    ({"path": "/v2", "principal": {}, "extra": 1}, "unknown field(s): extra"),
    ({"principal": {}}, "path is required"),
    ({"path": "/v2", "principal": {}, "method": "BREW"}, "method must be one of"),
    ({"path": "/v2", "principal": {}, "client_ip": "nope"}, "client_ip: 'nope' is not an IP address"),
    ({"path": "/v2", "principal": {}, "time": "noon"}, "time: 'noon' is not an ISO 8601 time"),
    ({"path": "/v2"}, "give key_id, or principal"),
    ({"path": "/v2", "principal": {"tier": "root"}}, "principal.tier must be one of"),
    ({"path": "/v2", "principal": {}, "method": ["GET"]}, "method must be one of"),
    ({"path": "/v2", "principal": {"tier": ["user"]}}, "principal.tier must be one of"),
    # Not read as the owner "['alice']", which an owners: [alice] rule would then wrongly deny.
    ({"path": "/v2", "principal": {"owner": ["alice"]}}, "principal.owner must be a string"),
    ({"path": "/v2", "principal": {"owner": 5}}, "principal.owner must be a string"),
    ({"path": "/v2", "principal": {}, "client_ip": 5}, "client_ip: 5 is not an IP address"),
])
def test_bad_questions_get_400_and_say_why(gw: Gateway, admin: str, question: dict[str, Any], message: str) -> None:
    status, doc = evaluate(gw, admin, question)
    assert status == 400 and doc["error"].startswith(message), doc


def test_a_time_at_the_edge_of_the_calendar_is_a_400_when_a_rule_has_hours(gw: Gateway, admin: str) -> None:
    """Rules with hours read the time in UTC: an offset that carries it past year 9999 could not be, a 500."""
    hours = gw.policy_dir / "zz-business-hours.yaml"
    hours.write_text("rules:\n  - id: business-hours\n    effect: allow\n    subject: {roles: [teller]}\n"
                     "    resources: [server]\n    actions: [read]\n    environment: {hours: '08:00-18:00'}\n")
    try:
        assert wait_for(lambda: any(r["id"] == "business-hours" for r in listing(gw, admin)["rules"]), 5.0)
        question = {"principal": {"roles": ["teller"]}, "method": "GET", "path": "/v2"}
        assert evaluate(gw, admin, {**question, "time": "2026-01-05T09:00:00-05:00"})[0] == 200
        for edge in ("9999-12-31T23:00:00-05:00", "0001-01-01T01:00:00+05:00"):
            status, doc = evaluate(gw, admin, {**question, "time": edge})
            assert status == 400 and doc == {"error": f"time: {edge!r} is out of range"}, (edge, status, doc)
    finally:
        hours.unlink()
