"""Every change made from the command line leaves an audit record with before/after, and never a secret."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from proxy.audit.writer import query_audit, tail_audit
from tests.cli.test_main import Cli, all_bytes, cli  # noqa: F401  (the fixture)


def cli_records(cli: Cli) -> list[dict[str, Any]]:   # noqa: F811  (a Cli passed in, beside the fixture)
    path = cli.data / "audit" / "audit.cli.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_key_change_from_the_cli_is_audited(cli: Cli) -> None:  # noqa: F811
    app = cli.json("keys", "create", "--tier", "app", "--name", "svc", "--allow-ip", "10.0.0.0/24", "--json")
    dev = cli.json("keys", "create", "--tier", "device", "--parent", app["key_id"], "--json")
    user = cli.json("keys", "create", "--tier", "user", "--name", "bob", "--json")
    rot = cli.json("keys", "rotate", app["key_id"], "--grace", "1h", "--json")
    assert cli("keys", "revoke", user["key_id"])[0] == 0
    leak = cli.json("keys", "revoke", rot["key_id"], "--compromised", "--json")
    assert cli("sessions", "revoke", "cd" * 16)[0] == 0

    recs = cli_records(cli)
    assert [r["admin"]["action"] for r in recs] == ["keys.create", "keys.create", "keys.create", "keys.rotate",
                                                   "keys.revoke", "keys.revoke_compromised", "sessions.revoke"]
    assert all(r["actor"].startswith("cli:") and r["protocol"] == "cli" and r["status"] == "allowed"
               for r in recs)
    create = recs[0]["admin"]
    assert create["target"] == app["key_id"] and create["before"] == {}
    assert create["after"][app["key_id"]]["allowed_cidrs"] == ["10.0.0.0/24"]
    rotate = recs[3]["admin"]
    assert rotate["target"] == app["key_id"] and set(rotate["before"]) == {app["key_id"], dev["key_id"]}
    assert rotate["after"][dev["key_id"]]["parent_id"] == rot["key_id"]   # the device moved
    revoke = recs[4]["admin"]
    assert revoke["before"][user["key_id"]]["status"] == "active"
    assert revoke["after"][user["key_id"]]["status"] == "revoked"
    compromised = recs[5]["admin"]
    assert compromised["after"][leak["replacement"]["key_id"]]["status"] == "active"
    assert {dev["key_id"], rot["key_id"]} <= set(compromised["after"])
    assert recs[6]["admin"]["after"] == {"cd" * 16: {"revoked": True}}
    # The shared index and `audit tail` see them; no key or hash is written anywhere in the audit dir.
    indexed = asyncio.run(query_audit(cli.data, actor=recs[0]["actor"]))
    assert len(indexed) == len(recs)
    assert len(tail_audit(cli.data, 100)) == len(recs)
    audit_bytes = all_bytes(cli.data / "audit")
    for token in (app["key"], dev["key"], user["key"], rot["key"], leak["replacement"]["key"]):
        assert token.encode() not in audit_bytes


def test_crypto_rotations_are_audited(cli: Cli) -> None:  # noqa: F811
    cli.json("keys", "create", "--tier", "user", "--name", "bob", "--json")   # opens the envelope
    for action in ("rotate-dek", "rotate-root", "rotate-jwt", "rotate-pepper"):
        code, _, err = cli("crypto", action)
        assert code == 0, err
    actions = [r["admin"]["action"] for r in cli_records(cli)]
    assert actions == ["keys.create", "crypto.rotate-dek", "crypto.rotate-root", "crypto.rotate-jwt",
                       "crypto.rotate-pepper"]
    # The resource each has through the admin API, so one query finds both ways of doing it.
    assert [r["resource"] for r in cli_records(cli)] == ["admin:keys"] + ["admin:crypto"] * 4
    assert cli("crypto", "status")[0] == 0 and len(cli_records(cli)) == 5   # reading is not a change


def test_an_unwritable_audit_log_fails_the_command(cli: Cli) -> None:  # noqa: F811
    cli.data.mkdir(parents=True, exist_ok=True)
    (cli.data / "audit").write_text("not a directory")   # root ignores permissions; this it cannot get past
    code, _, err = cli("keys", "create", "--tier", "user", "--name", "bob", "--json")
    # Refused before the key is issued: no key exists whose secret was never shown.
    assert code == 1 and "refused, nothing changed: the audit log cannot be written" in err
    def status() -> dict[str, Any]:
        return {k: v for k, v in cli.json("crypto", "status").items() if k != "checked_at"}
    before = status()
    code, _, err = cli("crypto", "rotate-dek")
    assert code == 1 and "crypto rotate-dek" in err
    assert status() == before   # refused before the data key was rotated
