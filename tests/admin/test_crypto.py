"""The /admin/v1/crypto API through a real seekgate in front of the real Triton: admins rotate, nobody else does."""

from __future__ import annotations

import json
from typing import Any

import jwt

from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, wait_for
from tests.keys.test_rotation import secrets_now
from tests.relay import TcpRelay

BASE = "/admin/v1/crypto"


def _crypto(gw: Gateway, key: str, operation: str, body: Any = b"") -> tuple[int, dict[str, Any]]:
    method = "GET" if operation == "status" else "POST"
    status, _, raw = call(gw.url + f"{BASE}/{operation}", method, body if method == "POST" else None, key)
    return status, json.loads(raw)


def _audited(gw: Gateway, action: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(gw) if r.get("admin", {}).get("action") == action]


def test_each_rotation_through_the_admin_api_changes_the_state_and_is_audited(gw: Gateway, admin: str) -> None:
    status, before = _crypto(gw, admin, "status")
    assert status == 200 and before["provider"] == "file" and before["pepper"]["versions"] == [1]
    expected = {
        "rotate-dek": lambda r, s: r["dek_id"] == s["dek"]["current"] != before["dek"]["current"],
        "rotate-root": lambda r, s: r["root"] == s["root"]["key_id"] != before["root"]["key_id"],
        "rotate-jwt": lambda r, s: r["kid"] == s["jwt"]["active_kid"] != before["jwt"]["active_kid"],
        "rotate-pepper": lambda r, s: r["pepper_version"] == 2 and s["pepper"]["versions"] == [1, 2],
    }
    for operation, changed in expected.items():
        status, result = _crypto(gw, admin, operation, {})
        assert status == 200, result
        now = _crypto(gw, admin, "status")[1]
        assert changed(result, now), (operation, result, now)
        assert wait_for(lambda operation=operation: len(_audited(gw, f"crypto.{operation}")) == 1, 5.0), operation
        record = _audited(gw, f"crypto.{operation}")[0]
        assert (record["status"], record["http_status"], record["resource"]) == ("allowed", 200, "admin:crypto")
        assert record["admin"]["detail"] == result
        assert record["admin"]["before"] != record["admin"]["after"]
        assert set(record["admin"]["after"]) == {"root", "dek", "jwt_kid", "pepper_versions"}
    # This server signs with the new kid at once: the rotation ran on its own keyring.
    _, user = gw.key(owner="alice", roles=("user",))
    status, _, raw = call(gw.url + "/v1/sessions", "POST", b"", key=user)
    assert status == 200
    assert jwt.get_unverified_header(json.loads(raw)["token"])["kid"] == now["jwt"]["active_kid"]
    assert wait_for(lambda: len(_audited(gw, "crypto.status")) == len(expected) + 1, 5.0)
    # No secret, DEK or root in the audit log, in the clear or hex.
    log = b"".join(p.read_bytes() for p in (gw.data_dir / "audit").glob("*.jsonl"))
    for name, value in secrets_now(gw).items():
        assert value not in log and value.hex().encode() not in log, name


def test_the_crypto_api_is_for_admins_only_and_never_reaches_triton(gw: Gateway, relay: TcpRelay, admin: str) -> None:
    _, user = gw.key(owner="bob", roles=("user",))
    _, app = gw.key(tier="app", owner="svc", roles=())
    state = _crypto(gw, admin, "status")[1]
    relay.clear()
    for key in (user, app):
        for operation in ("status", "rotate-dek", "rotate-root", "rotate-jwt", "rotate-pepper"):
            status, answer = _crypto(gw, key, operation, {})
            assert (operation, status) == (operation, 403), answer
    assert call(gw.url + f"{BASE}/status")[0] == 401
    assert BASE.encode() not in relay.seen()
    after = _crypto(gw, admin, "status")[1]
    assert {k: after[k] for k in ("root", "dek", "jwt")} == {k: state[k] for k in ("root", "dek", "jwt")}
    assert wait_for(lambda: sum(r["status"] == "denied" and r["resource"] == "admin:crypto"
                                for r in audit_records(gw)) == 10, 5.0)


def test_unknown_crypto_routes_wrong_methods_and_bodies_are_refused(gw: Gateway, admin: str) -> None:
    for method, path in (("POST", "rotate-everything"), ("GET", "rotate-dek"), ("POST", "status"),
                         ("DELETE", "rotate-root"), ("POST", "rotate-dek/now")):
        status, _, _ = call(gw.url + f"{BASE}/{path}", method, {} if method == "POST" else None, admin)
        assert (method, path, status) == (method, path, 404)
    before = _crypto(gw, admin, "status")[1]["dek"]["current"]
    status, answer = _crypto(gw, admin, "rotate-dek", {"now": True})
    assert (status, answer) == (400, {"error": "rotate-dek takes no body (or {})"})
    assert _crypto(gw, admin, "status")[1]["dek"]["current"] == before
