"""Tests for proxy.store.copy and `seekgate db copy`: a populated SQLite install moved to PostgreSQL.

Everything real: keys made and revoked through the seekgate command on a SQLite data dir, the copy
run by the command, then the same tokens verified by authn against the PostgreSQL store.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.main import main
from proxy.errors import Unauthenticated
from proxy.keys.secrets_setup import open_pepper
from proxy.paths import store_path
from proxy.settings import load_settings
from proxy.steps.authn import authenticate
from proxy.store.backend import open_secret_rows, open_store

REPO = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out) if out.strip().startswith("{") else out


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("SEEKGATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SEEKGATE_POLICY_DIRECTORY", str(REPO / "policies"))


def test_db_copy_keeps_every_key_working_and_every_revocation(
        clean_env: None, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = str(tmp_path / "data")
    user = run(capsys, "--data-dir", data, "keys", "create", "--tier", "user", "--name", "alice", "--role", "admin",
               "--json")
    app = run(capsys, "--data-dir", data, "keys", "create", "--tier", "app", "--name", "billing", "--rpm", "60",
              "--json")
    dev = run(capsys, "--data-dir", data, "keys", "create", "--tier", "device", "--parent", app["key_id"], "--json")
    gone = run(capsys, "--data-dir", data, "keys", "create", "--tier", "app", "--name", "old", "--json")
    gone_dev = run(capsys, "--data-dir", data, "keys", "create", "--tier", "device", "--parent", gone["key_id"],
                   "--json")
    run(capsys, "--data-dir", data, "keys", "revoke", gone["key_id"])
    run(capsys, "--data-dir", data, "sessions", "revoke", "a" * 32)

    report = run(capsys, "--data-dir", data, "db", "copy", "--from", str(store_path(Path(data))), "--to", pg_url)
    assert report["keys"] == 5 and report["revoked"] == 2 and report["revoked_sessions"] == 1
    assert report["secrets"] >= 1 and report["data_keys"] >= 1   # the pepper, under its data key
    assert report["to"].startswith("postgresql ") and report["from"].startswith("sqlite ")

    # A second copy into the now-populated database is refused, leaving it as it was.
    capsys.readouterr()
    assert main(["--data-dir", data, "db", "copy", "--from", str(store_path(Path(data))), "--to", pg_url]) == 1
    assert "not empty" in capsys.readouterr().err

    monkeypatch.setenv("SEEKGATE_STORE_URL", pg_url)
    settings = load_settings(None, overrides={"data_dir": data})

    async def check() -> None:
        store = await open_store(settings.store, Path(data))
        try:
            assert (await store.revision()) >= report["revision"] - 1
            pepper = await open_pepper(settings, store)   # unwrapped with the same root key file
            now = time.time()
            for made in (user, app, dev):
                principal = await authenticate(made["key"], store, pepper, "127.0.0.1", now)
                assert principal.key_id == made["key_id"]
            for made in (gone, gone_dev):
                with pytest.raises(Unauthenticated) as info:
                    await authenticate(made["key"], store, pepper, "127.0.0.1", now)
                assert info.value.reason == "revoked"
            assert (await store.get_key(app["key_id"])).limits == {"rpm": 60}  # type: ignore[union-attr]
            assert await (await open_secret_rows(store)).session_revoked("a" * 32)
        finally:
            await store.close()
    asyncio.run(check())

    # The CLI works on the copy as it did on the file: a new key, listed beside the copied ones.
    run(capsys, "--data-dir", data, "keys", "create", "--tier", "user", "--name", "bob", "--json")
    listed = run(capsys, "--data-dir", data, "keys", "list", "--json")
    assert len(listed["keys"]) == 6
