"""`seekgate db migrate` against a real PostgreSQL database, and on the SQLite default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.store.pg_schema import LATEST, MIGRATIONS


def run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def test_db_migrate_applies_once_then_reports_current(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("SEEKGATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SEEKGATE_STORE_URL", pg_url)
    first = run(capsys, "--data-dir", str(tmp_path / "d"), "db", "migrate")
    assert first["applied"] == [v for v, _, _ in MIGRATIONS] and first["version"] == first["latest"] == LATEST
    again = run(capsys, "--data-dir", str(tmp_path / "d"), "db", "migrate")
    assert again["applied"] == [] and again["version"] == LATEST
    # The migration is an admin change: the CLI audited it (once: the no-op run writes nothing).
    lines = (tmp_path / "d" / "audit" / "audit.cli.jsonl").read_text().splitlines()
    assert [json.loads(line)["admin"]["action"] for line in lines] == ["db.migrate"]
    # With the schema in place, the other commands use the shared store.
    capsys.readouterr()
    assert main(["--data-dir", str(tmp_path / "d"), "keys", "list", "--json"]) == 0


def test_db_migrate_on_sqlite_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEEKGATE_STORE_URL", raising=False)
    result = run(capsys, "--data-dir", str(tmp_path / "d"), "db", "migrate")
    assert result["applied"] == [] and str(result["store"]).startswith("sqlite ")


def test_db_migrate_with_the_server_down_is_one_line_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEEKGATE_STORE_URL", "postgresql://u:hunter2@127.0.0.1:1/x")
    assert main(["--data-dir", str(tmp_path / "d"), "db", "migrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("seekgate: store_unavailable") and "hunter2" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("source", "target", "message"), [
    ("missing.db", "new.db", "--from missing.db: no such SQLite file"),
    ("sqlite:///missing.db", "new.db", "--from missing.db: no such SQLite file"),
    ("seekgate.db", "mysql://h/x", "--to 'mysql://h/x': use postgresql://"),
])
def test_db_copy_refuses_a_missing_source_or_unknown_scheme_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        source: str, target: str, message: str) -> None:
    # SQLite creates what it opens: a mistyped --from copied an empty store and exited 0.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEEKGATE_STORE_URL", raising=False)
    run(capsys, "--data-dir", str(tmp_path / "d"), "db", "migrate")
    (tmp_path / "d" / "seekgate.db").rename(tmp_path / "seekgate.db")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["--data-dir", str(tmp_path / "d"), "db", "copy", "--from", source, "--to", target]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flag", ["--actor", "--key-id", "--endpoint"])
def test_audit_query_with_a_non_utf8_filter_is_one_line_exit_2(tmp_path: Path, pg_url: str, flag: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # On the shared PostgreSQL index asyncpg could not encode the surrogates: a DataError traceback.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEEKGATE_STORE_URL", pg_url)
    run(capsys, "--data-dir", str(tmp_path / "d"), "db", "migrate")
    code = main(["--data-dir", str(tmp_path / "d"), "audit", "query", flag,
                 b"\xffx".decode("utf-8", "surrogateescape")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith(f"seekgate: bad {flag}") and len(err.splitlines()) == 1
