"""The key store's cross-process change signal: every committed change moves it, nothing else does."""

from __future__ import annotations

import time
from pathlib import Path

from proxy.store import KeyRecord
from proxy.store.change_signal import ChangeSignal
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows


def test_two_mappings_of_one_file_see_each_other(tmp_path: Path) -> None:
    a, b = ChangeSignal(tmp_path / "x.rev"), ChangeSignal(tmp_path / "x.rev")
    assert a.value() == b.value()
    before = b.value()
    a.changed()
    assert b.value() != before and b.value() == a.value()
    assert (tmp_path / "x.rev").stat().st_mode & 0o777 == 0o600
    a.close()
    assert a.value() is None and b.value() is not None
    b.close()


async def test_every_change_from_any_process_moves_the_signal_and_reads_do_not(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    server, cli = await SqliteStore.open(path), await SqliteStore.open(path)   # two processes' views
    try:
        now = time.time()
        rec = KeyRecord(key_id="abcdefghijkl", secret_hash="h", tier="user", owner="o", created_at=now)
        changes = [lambda: cli.create_key(rec), lambda: cli.revoke_key(rec.key_id, now)]
        for change in changes:
            before = server.change_signal()
            await change()
            assert server.change_signal() != before
        rows = await SqliteSecretRows.open(cli)
        before = server.change_signal()
        await rows.revoke_session("ab" * 16, now)
        assert server.change_signal() != before
        before = server.change_signal()
        await cli.get_key(rec.key_id)
        await cli.list_keys()
        await cli.revision()
        assert server.change_signal() == before
    finally:
        await server.close()
        await cli.close()
