"""The seekgate command, run in-process through main() against a temporary data dir."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from proxy.audit.writer import AuditWriter
from proxy.cli.bootstrap import bootstrap_admin, bootstrap_message, triton_launch, upstream_mismatch
from proxy.cli.main import main, parse_time
from proxy.keys.hashing import verify_secret
from proxy.keys.secrets_setup import load_pepper_sync
from proxy.paths import store_path, tiny_checkpoint_path
from proxy.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


class Cli:
    def __init__(self, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.data, self.capsys = data, capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--data-dir", str(self.data), *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self(*args)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.chdir(tmp_path)   # no config/seekgate.yaml here: defaults only
    for var in [v for v in os.environ if v.startswith("SEEKGATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SEEKGATE_POLICY_DIRECTORY", str(REPO / "policies"))
    return Cli(tmp_path / "data", capsys)


def all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_keys_create_json_prints_key_once_and_store_keeps_only_hash(cli: Cli) -> None:
    made = cli.json("keys", "create", "--tier", "user", "--name", "alice", "--role", "user",
                    "--role", "ml", "--label", "team=nlp", "--model", "deepseek", "--expires", "90d", "--json")
    key_id, token = made["key_id"], made["key"]
    assert token.startswith(f"sgk_{key_id}_") and made["roles"] == ["user", "ml"]
    assert made["labels"] == {"team": "nlp"} and made["status"] == "active"
    assert store_path(cli.data).exists()
    # The plaintext key (and its secret part alone) is nowhere on disk: db, WAL, anything.
    disk = all_bytes(cli.data)
    secret = token[len(f"sgk_{key_id}_"):][:43]   # fixed width: base64url may itself hold "_"
    assert token.encode() not in disk and secret.encode() not in disk
    shown = cli.json("keys", "show", key_id, "--json")
    assert token not in json.dumps(shown) and "secret_hash" not in shown

    async def stored_hash() -> str:
        from proxy.store.sqlite import SqliteStore
        async with await SqliteStore.open(store_path(cli.data)) as store:
            rec = await store.get_key(key_id)
            assert rec is not None
            return rec.secret_hash
    # The pepper lives in the envelope (keys/hashing.py), not in a file.
    pepper = load_pepper_sync(load_settings(None, env={}, overrides={"data_dir": str(cli.data)}))
    assert verify_secret(pepper, token, asyncio.run(stored_hash()))


def test_keys_create_human_output_and_options_after_command(cli: Cli, tmp_path: Path) -> None:
    code = main(["keys", "create", "--tier", "app", "--name", "billing", "--cidr", "10.0.0.0/8",
                 "--data-dir", str(cli.data)])
    out, err = cli.capsys.readouterr()
    assert code == 0, err
    line, token = out.strip().splitlines()
    assert line.startswith("created app key ") and "for billing" in line
    assert token.startswith("sgk_") and "not shown again" in err
    assert cli.json("keys", "list", "--json")["keys"][0]["allowed_cidrs"] == ["10.0.0.0/8"]


def test_keys_list_show_revoke(cli: Cli) -> None:
    app_key = cli.json("keys", "create", "--tier", "app", "--name", "billing", "--role", "svc", "--json")
    dev = cli.json("keys", "create", "--tier", "device", "--name", "sensor-1", "--parent",
                   app_key["key_id"], "--json")
    assert dev["parent_id"] == app_key["key_id"] and dev["roles"] == ["svc"]
    listed = cli.json("keys", "list", "--json")["keys"]
    assert [k["id"] for k in listed] == sorted([app_key["key_id"], dev["key_id"]])   # key id order, as the API
    assert app_key["key"] not in json.dumps(listed) and dev["key"] not in json.dumps(listed)
    code, out, _ = cli("keys", "list")
    assert code == 0 and out.splitlines()[0].split() == ["ID", "TIER", "OWNER", "ROLES", "STATUS",
                                                         "EXPIRES", "PARENT"]
    assert dev["key"] not in out and len(out.splitlines()) == 3
    code, out, _ = cli("keys", "show", dev["key_id"])
    assert code == 0 and f"parent_id: {app_key['key_id']}" in out and "status: active" in out
    code, out, _ = cli("keys", "revoke", app_key["key_id"])
    assert (code, out.strip()) == (0, "revoked 2 key(s)")
    assert {k["status"] for k in cli.json("keys", "list", "--json")["keys"]} == {"revoked"}
    code, out, _ = cli("keys", "revoke", dev["key_id"])
    assert code == 0 and "already revoked" in out


@pytest.mark.parametrize("args, message", [
    (("keys", "show", "aaaaaaaaaaaa"), "not found"),
    (("keys", "revoke", "aaaaaaaaaaaa"), "not found"),
])
def test_unknown_key_is_one_line_exit_1(cli: Cli, args: tuple[str, ...], message: str) -> None:
    code, out, err = cli(*args)
    assert code == 1 and out == "" and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (("--tier", "user", "--name", "a", "--cidr", "10.0.0.1/8"), "host bits"),
    (("--tier", "user", "--name", "a", "--expires", "soon"), "--expires: bad duration"),
    (("--tier", "user", "--name", "a", "--label", "novalue"), "key=value"),
    (("--tier", "device", "--name", "a"), "needs a parent"),
])
def test_keys_create_bad_input_exit_2(cli: Cli, args: tuple[str, ...], message: str) -> None:
    code, out, err = cli("keys", "create", *args)
    assert code == 2 and out == "" and message in err and err.startswith("seekgate: ")


def test_policy_check_good_dir(cli: Cli) -> None:
    code, out, _ = cli("policy", "check", str(REPO / "policies"))
    assert code == 0 and out.startswith("policy ok: ") and out.strip().endswith("rules in 1 files")
    code, out, _ = cli("policy", "check")   # the configured directory
    assert code == 0 and out.startswith("policy ok: ")


def test_policy_check_broken_dir_lists_lines(cli: Cli, tmp_path: Path) -> None:
    pdir = tmp_path / "pol"
    pdir.mkdir()
    (pdir / "a.yaml").write_text(
        "rules:\n"
        "  - id: ok\n    effect: allow\n    resources: ['model:*']\n    actions: [infer]\n"
        "  - id: bad\n    effect: permit\n    resources: ['model:*']\n    actions: [infr]\n")
    (pdir / "b.yaml").write_text("rules: [\n")
    code, out, _ = cli("policy", "check", str(pdir))
    assert code == 1
    assert f"{pdir / 'a.yaml'}:7:" in out and f"{pdir / 'a.yaml'}:9:" in out
    assert f"{pdir / 'b.yaml'}:" in out and "YAML syntax error" in out


def test_check_config_ok(cli: Cli) -> None:
    code, out, _ = cli("check-config")
    assert code == 0 and out.strip() == "config ok"


def test_check_config_lists_every_error(cli: Cli, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  http_port: 0\n  bogus: 1\nupstream:\n  http_url: ftp://x\n"
                   "audit:\n  max_bytes: lots\n")
    code, out, err = cli("--config", str(cfg), "check-config")
    assert code == 2 and out == ""
    for field in ("server.http_port", "server.bogus", "upstream.http_url", "audit.max_bytes"):
        assert field in err
    assert len(err.strip().splitlines()) >= 4


def test_check_config_missing_file_and_broken_policy(cli: Cli, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli("--config", str(tmp_path / "nope.yaml"), "check-config")
    assert code == 2 and "does not exist" in err
    pdir = tmp_path / "pol"
    pdir.mkdir()
    (pdir / "x.yaml").write_text("rules:\n  - id: x\n    effect: nope\n    resources: [server]\n"
                                 "    actions: [read]\n")
    monkeypatch.setenv("SEEKGATE_POLICY_DIRECTORY", str(pdir))
    code, out, err = cli("check-config")
    assert code == 2 and out.strip() == "config ok" and f"{pdir / 'x.yaml'}:3:" in err


def test_config_that_is_not_utf8_is_one_line_exit_2(cli: Cli, tmp_path: Path) -> None:
    # A Latin-1 file (or a binary one named by mistake) is bad input: it was a UnicodeDecodeError traceback.
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("server:\n  host: caf\xe9\n".encode("latin-1"))
    code, out, err = cli("--config", str(cfg), "check-config")
    assert code == 2 and out == ""
    assert f"{cfg}: cannot read" in err and "Traceback" not in err


def test_tls_dev_cert_into_a_file_is_one_line_exit_1(cli: Cli, tmp_path: Path) -> None:
    # --dir naming a file (or a path under one) was a FileExistsError / NotADirectoryError traceback.
    (tmp_path / "afile").write_text("keep")
    for target in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        code, out, err = cli("tls", "dev-cert", "--dir", str(target))
        assert code == 1 and out == "" and err.startswith("seekgate: tls dev-cert: cannot write to")
        assert len(err.splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("args", [("keys", "show"), ("keys", "revoke"), ("keys", "revoke", "--compromised"),
                                  ("keys", "rotate", "--grace", "1h")])
def test_non_utf8_key_id_is_not_found_not_store_unavailable(cli: Cli, args: tuple[str, ...]) -> None:
    # A non-UTF-8 argument reaches Python as surrogates; the store could not encode it.
    code, out, err = cli(*args, b"\xffkey".decode("utf-8", "surrogateescape"))
    assert code == 1 and out == ""
    assert err.startswith("seekgate: key ") and err.rstrip().endswith("not found") and "store_unavailable" not in err


def test_model_tiny_into_a_file_is_one_line_exit_1(cli: Cli, tmp_path: Path) -> None:
    # --out under a file was a NotADirectoryError traceback.
    (tmp_path / "afile").write_text("keep")
    code, out, err = cli("model", "tiny", "--out", str(tmp_path / "afile" / "ckpt"))
    assert code == 1 and out == "" and err.startswith("seekgate: model tiny: cannot write to")
    assert len(err.splitlines()) == 1 and (tmp_path / "afile").read_text() == "keep"


def test_key_change_with_an_unwritable_audit_log_is_refused_before_it_is_made(cli: Cli) -> None:
    # keys create issued an active key, then failed on the audit record: its secret was never shown.
    key_id = cli.json("keys", "create", "--tier", "app", "--name", "a", "--json")["key_id"]
    before = cli.json("keys", "list", "--json")
    audit_dir = cli.data / "audit"
    for p in audit_dir.iterdir():
        p.unlink()
    audit_dir.rmdir()
    audit_dir.write_text("")   # a file where the audit directory should be
    for args in (("keys", "create", "--tier", "app", "--name", "b"), ("keys", "revoke", key_id),
                 ("keys", "rotate", key_id, "--grace", "1h"), ("keys", "revoke", key_id, "--compromised"),
                 ("sessions", "revoke", "0" * 32)):
        code, out, err = cli(*args)
        assert code == 1 and out == "" and "refused, nothing changed" in err, args
    assert cli.json("keys", "list", "--json") == before
    audit_dir.unlink()   # the session was not revoked either: revoking it now is a first revocation
    code, out, _ = cli("sessions", "revoke", "0" * 32)
    assert code == 0 and "already revoked" not in out


def test_store_url_that_is_not_utf8_is_a_setting_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stray byte in SEEKGATE_STORE_URL reached asyncpg's connect and died with a traceback.
    monkeypatch.setenv("SEEKGATE_STORE_URL", b"postgresql://u:pw\xff@127.0.0.1:1/x".decode("utf-8", "surrogateescape"))
    code, out, err = cli("keys", "list")
    assert code == 2 and out == "" and err.strip() == "store.url: is not UTF-8"


def _write_audit(data: Path, records: list[dict[str, Any]]) -> None:
    async def go() -> None:
        writer = AuditWriter(data)
        await writer.start()
        for rec in records:
            writer.submit(rec)
        await writer.close()
    asyncio.run(go())


def test_audit_tail_and_query(cli: Cli) -> None:
    # Recent timestamps, so the writer's retention pruning never touches them.
    day = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=10)
    stamps = [day, day + timedelta(days=1), day + timedelta(days=2),
              datetime.now(timezone.utc) - timedelta(minutes=30)]
    recs = [{"timestamp": stamps[i].isoformat().replace("+00:00", "Z"), "event_id": f"e{i}", "actor": actor,
             "key_id": key, "status": status, "http_status": code, "protocol": "http"}
            for i, (actor, key, status, code) in enumerate([
                ("alice", "k1", "allowed", 200), ("bob", "k2", "denied", 403),
                ("alice", "k1", "denied", 401), ("carol", "k3", "error", 503)])]
    recs[3] |= {"protocol": "openai", "openai": {"endpoint": "/v1/chat/completions", "user": "u1"}}
    _write_audit(cli.data, recs)
    code, out, _ = cli("audit", "tail", "-n", "2")
    assert code == 0 and [json.loads(ln)["event_id"] for ln in out.splitlines()] == ["e2", "e3"]

    def query(*args: str) -> list[str]:
        code, out, err = cli("audit", "query", *args)
        assert code == 0, err
        return [json.loads(ln)["event_id"] for ln in out.splitlines()]
    assert query() == ["e3", "e2", "e1", "e0"]
    assert query("--actor", "alice") == ["e2", "e0"]
    assert query("--key-id", "k2") == ["e1"]
    assert query("--status", "denied") == ["e2", "e1"]
    since = (day + timedelta(days=1)).isoformat()
    until = (day + timedelta(days=2, hours=1)).strftime("%Y-%m-%dT%H:%M:%S")   # naive: UTC
    assert query("--since", since, "--until", until) == ["e2", "e1"]
    assert query("--since", "1h") == ["e3"]
    assert query("--limit", "1") == ["e3"]
    assert query("--protocol", "openai") == ["e3"] and query("--protocol", "http") == ["e2", "e1", "e0"]
    assert query("--endpoint", "/v1/chat/completions") == ["e3"] and query("--endpoint", "/v1/completions") == []


@pytest.mark.parametrize("args", [("audit", "tail", "-n", "-1"), ("audit", "query", "--limit", "-5")])
def test_audit_negative_count_is_refused(cli: Cli, args: tuple[str, ...],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # It printed nothing and exited 0: an operator would read that as "no records".
    _write_audit(cli.data, [{"timestamp": "2026-01-01T00:00:00Z", "actor": "a", "status": "allowed"}])
    with pytest.raises(SystemExit) as exc:
        main(["--data-dir", str(cli.data), *args])
    assert exc.value.code == 2 and "must be 0 or more" in capsys.readouterr().err


def test_parse_time() -> None:
    assert parse_time("1h", 10_000.0) == 6400.0
    assert parse_time("2024-01-01T00:00:00Z", 0) == parse_time("2024-01-01T00:00:00", 0) == 1704067200.0
    with pytest.raises(Exception, match="bad time"):
        parse_time("yesterday", 0)


def test_model_tiny_builds_checkpoint(cli: Cli, tmp_path: Path) -> None:
    out_dir = tmp_path / "tiny"
    code, out, err = cli("model", "tiny", "--out", str(out_dir), "--seed", "1")
    assert code == 0, err
    assert Path(out.strip()) == out_dir
    assert (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists()
    assert json.loads((out_dir / "seekgate-tiny.json").read_text())["seed"] == 1


def test_serve_rejects_zero_workers(cli: Cli) -> None:
    code, _, err = cli("serve", "--workers", "0")
    assert code == 2 and "--workers: must be 1 or more" in err


def test_triton_launch_error_is_one_line(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # run_foreground installs SIGINT/SIGTERM handlers; keep pytest's own.
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setenv("SEEKGATE_TRITON_MODEL_REPOSITORY", str(tmp_path / "no-repo"))
    monkeypatch.setenv("SEEKGATE_TRITON_CHECKPOINT", str(tmp_path / "ckpt"))
    code, _, err = cli("triton")
    assert code == 1 and err.startswith("seekgate: triton: no model repository")
    assert len(err.strip().splitlines()) == 1


def test_triton_launch_uses_configured_or_tiny_checkpoint(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, overrides={"data_dir": str(tmp_path), "triton.http_port": 19000})
    tiny = tiny_checkpoint_path(tmp_path)
    tiny.mkdir(parents=True)
    (tiny / "config.json").write_text("{}")   # ensure_tiny_checkpoint: present, so not rebuilt
    (tiny / "tokenizer.json").write_text("{}")
    launch = triton_launch(settings)
    assert (launch.checkpoint, launch.host, launch.http_port) == (tiny, "127.0.0.1", 19000)
    custom = load_settings(None, env={}, overrides={"data_dir": str(tmp_path), "triton.checkpoint": "/models/ds"})
    assert triton_launch(custom).checkpoint == Path("/models/ds")


def test_bootstrap_admin_once(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, overrides={"data_dir": str(tmp_path)})
    key = bootstrap_admin(settings)
    assert key is not None and key.startswith("sgk_")
    assert bootstrap_admin(settings) is None   # an admin exists now: nothing is printed again
    assert key.encode() not in all_bytes(tmp_path)
    banner = bootstrap_message(settings, key)
    assert banner.count(key) == 2   # the key line and the export line
    assert 'curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/v2/models/deepseek/generate' in banner
    assert "tritonclient" in banner and 'os.environ["KEY"]' in banner


def test_upstream_must_point_at_the_triton_up_starts(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    assert upstream_mismatch(load_settings(None, env={})) is None
    moved = load_settings(None, env={}, overrides={"triton.http_port": 28000})
    assert "triton.http_port (28000)" in (upstream_mismatch(moved) or "")
    moved = load_settings(None, env={}, overrides={"upstream.grpc_target": "127.0.0.1:9"})
    assert "upstream.grpc_target" in (upstream_mismatch(moved) or "")
    monkeypatch.setenv("SEEKGATE_TRITON_HTTP_PORT", "28000")
    code, _, err = cli("up")   # refused before anything starts
    assert code == 2 and "would not reach" in err


def test_keys_create_with_limits(cli: Cli) -> None:
    made = cli.json("keys", "create", "--tier", "user", "--name", "quota", "--rpm", "60", "--tpm", "0",
                    "--concurrency", "2", "--daily-tokens", "1000", "--monthly-tokens", "20000", "--json")
    want = {"rpm": 60, "tpm": 0, "concurrency": 2, "daily_tokens": 1000, "monthly_tokens": 20000}
    assert made["limits"] == want
    assert cli.json("keys", "show", made["key_id"], "--json")["limits"] == want
    plain = cli.json("keys", "create", "--tier", "user", "--name", "defaults", "--json")
    assert plain["limits"] == {}   # unset: the tier's defaults from config apply


def test_the_issue_command_shapes(cli: Cli) -> None:
    """The exact commands of the key-lifecycle issue: --allow-ip, a device under --parent, a leak, --expiring."""
    app = cli.json("keys", "create", "--tier", "app", "--allow-ip", "10.0.0.0/24", "--allow-ip", "192.168.7.9",
                   "--json")
    assert app["allowed_cidrs"] == ["10.0.0.0/24", "192.168.7.9/32"] and app["tier"] == "app"
    assert app["owner"] == app["key_id"]   # no --name: the key is named by its id
    dev = cli.json("keys", "create", "--tier", "device", "--parent", app["key_id"], "--json")
    assert (dev["parent_id"], dev["owner"], dev["allowed_cidrs"]) == (app["key_id"], app["owner"],
                                                                      app["allowed_cidrs"])
    code, out, err = cli("keys", "create", "--tier", "device", "--parent", app["key_id"],
                         "--allow-ip", "10.0.1.0/24")
    assert code == 2 and "outside parent key" in err

    soon = cli.json("keys", "create", "--tier", "user", "--name", "temp", "--expires", "24h", "--json")
    _write_audit(cli.data, [{"key_id": app["key_id"], "actor": app["owner"], "client_ip": "10.0.0.5",
                             "model": "deepseek", "status": "allowed", "http_status": 200,
                             "input_tokens": 4, "output_tokens": 6}])
    code, out, err = cli("keys", "revoke", app["key_id"], "--compromised", "--json")
    assert code == 0, err
    leak = json.loads(out)
    assert {"revoked", "replacement", "report"} <= set(leak)
    assert leak["revoked"] == [app["key_id"], dev["key_id"]]
    replacement = leak["replacement"]
    assert replacement["key"].startswith(f"sgk_{replacement['key_id']}_")
    assert replacement["allowed_cidrs"] == app["allowed_cidrs"]
    report = leak["report"]
    assert report["uses"] == 1 and report["client_ips"] == {"10.0.0.5": 1}
    assert report["tokens"] == {"input": 4, "output": 6} and report["revoked"] == leak["revoked"]

    listed = cli.json("keys", "list", "--expiring", "72h", "--json")["keys"]
    assert [k["id"] for k in listed] == [soon["key_id"]]   # the app replacement lives a year
    code, out, _ = cli("keys", "list", "--expiring", "72h")
    assert code == 0 and len(out.splitlines()) == 2 and soon["key_id"] in out
    code, _, err = cli("keys", "list", "--expiring", "never")
    assert code == 2 and "--expiring" in err


def test_sessions_revoke(cli: Cli) -> None:
    jti = "ab" * 16
    code, out, _ = cli("sessions", "revoke", jti)
    assert code == 0 and out.strip() == f"revoked session {jti}"
    code, out, _ = cli("sessions", "revoke", jti)
    assert code == 0 and "already revoked" in out
    code, _, err = cli("sessions", "revoke", "nope")
    assert code == 1 and "not a session id" in err


def test_rotating_an_app_key_moves_its_devices(cli: Cli) -> None:
    app = cli.json("keys", "create", "--tier", "app", "--name", "svc", "--allow-ip", "10.0.0.0/24", "--json")
    dev = cli.json("keys", "create", "--tier", "device", "--parent", app["key_id"], "--json")
    rot = cli.json("keys", "rotate", app["key_id"], "--grace", "1h", "--json")
    assert rot["moved"] == [dev["key_id"]] and rot["allowed_cidrs"] == ["10.0.0.0/24"]
    assert cli.json("keys", "show", dev["key_id"], "--json")["parent_id"] == rot["key_id"]
    code, out, _ = cli("keys", "rotate", rot["key_id"], "--grace", "1h")
    assert code == 0 and "moved 1 device key(s) to " in out and dev["key_id"] in out


@pytest.fixture(params=["sqlite", "postgres"])
def store_cli(request: pytest.FixtureRequest, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The cli fixture on each backend: its SQLite file, or a fresh PostgreSQL database (migrated at open)."""
    if request.param == "postgres":
        monkeypatch.setenv("SEEKGATE_STORE_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("SEEKGATE_STORE_AUTO_MIGRATE", "true")
    return cli


@pytest.fixture
def paged_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pages of 2 keys; a whole-store read (list_keys, list_expiring) fails the test. The limits asked for."""
    from proxy.store import pages
    from proxy.store.postgres import PostgresStore
    from proxy.store.sqlite import SqliteStore
    monkeypatch.setattr(pages, "PAGE_SIZE", 2)
    limits: list[int] = []
    for cls in (SqliteStore, PostgresStore):
        page_keys = cls.page_keys

        async def counted(self: Any, limit: int, *args: Any, _page_keys: Any = page_keys) -> Any:
            limits.append(limit)
            return await _page_keys(self, limit, *args)

        async def whole(self: Any, *args: Any) -> Any:
            raise AssertionError("read every key in one query")
        monkeypatch.setattr(cls, "page_keys", counted)
        monkeypatch.setattr(cls, "list_keys", whole)
        monkeypatch.setattr(cls, "list_expiring", whole)
    return limits


def test_keys_list_streams_page_by_page_in_the_same_format(store_cli: Cli, paged_reads: list[int]) -> None:
    cli = store_cli
    made = [cli.json("keys", "create", "--tier", "user", "--name", name, "--role", "user", "--expires", expires,
                     "--json") for name, expires in (("a", "90d"), ("a-much-longer-owner", "2d"), ("bo", "never"),
                                                     ("c", "4d"), ("dee", "90d"))]
    ids = sorted(m["key_id"] for m in made)
    paged_reads.clear()
    code, out, err = cli("keys", "list", "--json")
    assert code == 0, err
    # Byte for byte what json.dumps writes for the whole listing, from pages of 2 (2 + 2 + 1).
    listed = json.loads(out)["keys"]
    assert [k["id"] for k in listed] == ids and out == json.dumps({"keys": listed}, ensure_ascii=False) + "\n"
    assert paged_reads == [2, 2, 2]
    code, out, err = cli("keys", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TIER", "OWNER", "ROLES", "STATUS", "EXPIRES", "PARENT"]
    assert [line.split()[0] for line in lines[1:]] == ids
    # One table: every column starts where its header does, as wide as its widest cell.
    owner_at, roles_at, status_at = (lines[0].index(h) for h in ("OWNER", "ROLES", "STATUS"))
    assert roles_at - owner_at == len("a-much-longer-owner") + 2
    for line, view in zip(lines[1:], listed, strict=True):
        assert line[owner_at:roles_at].rstrip() == view["owner"] and line[status_at:].startswith("active  ")
    soon = cli.json("keys", "list", "--expiring", "72h", "--json")["keys"]
    assert sorted(k["owner"] for k in soon) == ["a-much-longer-owner"]
    assert [k["id"] for k in cli.json("keys", "list", "--expiring", "100d", "--json")["keys"]] \
        == sorted(m["key_id"] for m in made if m["owner"] != "bo")


def test_rotate_and_revoke_read_the_subtree_not_every_key(store_cli: Cli, paged_reads: list[int]) -> None:
    cli = store_cli
    app = cli.json("keys", "create", "--tier", "app", "--name", "svc", "--json")
    devs = [cli.json("keys", "create", "--tier", "device", "--parent", app["key_id"], "--json")["key_id"]
            for _ in range(3)]
    other = cli.json("keys", "create", "--tier", "app", "--name", "other", "--json")
    cli.json("keys", "create", "--tier", "device", "--parent", other["key_id"], "--json")
    rot = cli.json("keys", "rotate", app["key_id"], "--grace", "1h", "--json")
    assert sorted(rot["moved"]) == sorted(devs)
    code, out, err = cli("keys", "revoke", rot["key_id"])
    assert (code, out.strip()) == (0, "revoked 4 key(s)"), err
    leak = cli.json("keys", "revoke", other["key_id"], "--compromised", "--json")
    assert len(leak["revoked"]) == 2 and leak["revoked"][0] == other["key_id"]
    record = json.loads((cli.data / "audit" / "audit.cli.jsonl").read_text().splitlines()[-2])
    assert record["admin"]["action"] == "keys.revoke"
    assert sorted(record["admin"]["before"]) == sorted([rot["key_id"], *devs])


def test_keys_list_into_a_closed_pipe_stops_quietly(cli: Cli) -> None:
    """`seekgate keys list | head`: the reader leaves before the listing ends; no traceback, status 141."""
    for name in ("a", "b", "c"):
        cli.json("keys", "create", "--tier", "user", "--name", name, "--json")
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader is gone before the first line: the first flush meets a broken pipe
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, "-m", "proxy", "--data-dir", str(cli.data), "keys", "list"],
                              stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=60)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr.decode()) == (141, "")
