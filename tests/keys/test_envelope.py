"""Envelope encryption: the file KEK provider, sealed secrets bound to their row, nothing plain on disk."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from proxy.keys.envelope import Envelope, EnvelopeError
from proxy.keys.kek import FileKek, KekError, KekProvider
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_root_key_is_created_0600_in_a_0700_dir_and_reloads_the_same(tmp_path: Path) -> None:
    kek = FileKek.load_or_create(tmp_path)
    assert isinstance(kek, KekProvider)
    root = tmp_path / "secrets" / "root.key"
    assert mode(root) == 0o600 and mode(root.parent) == 0o700
    assert len(root.read_bytes()) == 32
    again = FileKek.load_or_create(tmp_path)
    assert again.key_id == kek.key_id
    # The id names the root without revealing it.
    assert root.read_bytes().hex() not in kek.key_id
    assert again.unwrap(kek.wrap(b"d" * 32), kek.key_id) == b"d" * 32


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o660, 0o644, 0o700])
def test_root_key_with_permissions_wider_than_0600_refuses_to_start(tmp_path: Path, bits: int) -> None:
    FileKek.load_or_create(tmp_path)
    root = tmp_path / "secrets" / "root.key"
    os.chmod(root, bits)
    if bits & 0o077:
        with pytest.raises(KekError, match="wider than 0600"):
            FileKek.load_or_create(tmp_path)
    else:
        FileKek.load_or_create(tmp_path)   # 0700: owner only, still accepted


def test_truncated_root_key_refuses_to_start(tmp_path: Path) -> None:
    FileKek.load_or_create(tmp_path)
    root = tmp_path / "secrets" / "root.key"
    root.write_bytes(b"x" * 16)
    with pytest.raises(KekError, match="expected 32 bytes"):
        FileKek.load_or_create(tmp_path)


def test_a_missing_root_is_not_replaced_when_the_store_names_one(tmp_path: Path) -> None:
    root_id = FileKek.load_or_create(tmp_path).key_id
    path = tmp_path / "secrets" / "root.key"
    path.unlink()
    with pytest.raises(KekError) as info:
        FileKek.load_or_create(tmp_path, stored_roots=[root_id, root_id])
    assert str(info.value) == (f"root key missing: {path}; the store's DEKs are wrapped by root {root_id} "
                               "(restore the root file from its backup)")
    assert not path.exists()
    # Nothing wrapped yet: a first start, and a root is made.
    assert FileKek.load_or_create(tmp_path, stored_roots=[]).key_id != root_id and path.exists()


def test_wrap_is_authenticated_and_tied_to_its_root(tmp_path: Path) -> None:
    a, b = FileKek(b"a" * 32), FileKek(b"b" * 32)
    blob = a.wrap(b"k" * 32)
    assert b"k" * 32 not in blob and a.wrap(b"k" * 32) != blob   # fresh nonce every wrap
    with pytest.raises(KekError, match="no root file holds"):
        b.unwrap(blob, a.key_id)
    with pytest.raises(KekError, match="does not unwrap"):
        FileKek(b"b" * 32, older=[b"a" * 32]).unwrap(blob, b.key_id)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(KekError):
        a.unwrap(tampered, a.key_id)
    with pytest.raises(KekError, match="malformed"):
        a.unwrap(b"\x02" + blob[1:], a.key_id)


async def open_envelope(data_dir: Path) -> tuple[SqliteStore, Envelope]:
    store = await SqliteStore.open(data_dir / "keys.db")
    return store, Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(data_dir))


async def test_secrets_round_trip_across_restarts(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    try:
        assert await env.get("missing") is None
        assert await env.add("jwt-signing/one", b"secret-one") == b"secret-one"
        assert await env.add("jwt-signing/two", b"secret-two") == b"secret-two"
        # Write-once: a second add of the same name returns what is stored.
        assert await env.add("jwt-signing/one", b"other") == b"secret-one"
        assert await env.names("jwt-signing/") == ["jwt-signing/one", "jwt-signing/two"]
    finally:
        await store.close()
    store, env = await open_envelope(tmp_path)
    try:
        assert await env.get("jwt-signing/two") == b"secret-two"
        assert await env.get_or_create("pepper", lambda: b"p" * 32) == b"p" * 32
        assert await env.get_or_create("pepper", lambda: b"q" * 32) == b"p" * 32
    finally:
        await store.close()


async def test_concurrent_creators_agree_on_one_value(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    other = Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path))
    try:
        a, b = await asyncio.gather(env.add("name", b"from-a"), other.add("name", b"from-b"))
        assert a == b and a in (b"from-a", b"from-b")
    finally:
        await store.close()


async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    try:
        await env.add("a", b"secret-a")
        await env.add("b", b"secret-b")
        await store._db.execute("UPDATE secrets SET blob = (SELECT blob FROM secrets WHERE name = 'a') "
                                "WHERE name = 'b'")
        with pytest.raises(EnvelopeError, match="altered or moved"):
            await env.get("b")
        assert await env.get("a") == b"secret-a"
    finally:
        await store.close()


async def test_a_different_root_cannot_open_the_store(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    try:
        await env.add("a", b"secret-a")
    finally:
        await store.close()
    root = tmp_path / "secrets" / "root.key"
    root.write_bytes(b"z" * 32)
    store, env = await open_envelope(tmp_path)
    try:
        with pytest.raises(EnvelopeError, match="wrapped by root"):
            await env.get("a")
        # Even with the id forged to match, the wrap does not open under the wrong root.
        await store._db.execute("UPDATE deks SET kek_id = ?", (FileKek(b"z" * 32).key_id,))
        with pytest.raises(EnvelopeError, match="does not unwrap"):
            await env.get("a")
    finally:
        await store.close()


async def test_database_bytes_hold_no_plaintext_secret_dek_or_root(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    secret = os.urandom(32)
    try:
        await env.add("s", secret)
        deks = list(env._deks.values())
        assert len(deks) == 1
    finally:
        await store.close()
    root = (tmp_path / "secrets" / "root.key").read_bytes()
    disk = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert len(disk) > 0
    for needle in (secret, deks[0], root):
        assert needle not in disk and needle.hex().encode() not in disk


# ------------------------------------------------------------------ rotation


async def test_dek_rotation_serves_new_writes_at_once_and_reencrypts_old_rows(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    try:
        await env.add("a", b"secret-a")
        first = await env.current_dek_id()
        blob_a = (await store._db.execute_fetchall("SELECT blob FROM secrets WHERE name = 'a'"))[0][0]
        second = await env.rotate_dek()
        assert second != first and await env.current_dek_id() == second
        await env.add("b", b"secret-b")
        # New writes use the new DEK at once; the old row still reads under the old one.
        rows = dict(await store._db.execute_fetchall("SELECT name, dek_id FROM secrets"))
        assert rows == {"a": first, "b": second}
        assert await env.get("a") == b"secret-a"
        assert [d["current"] for d in await env.status()] == [False, True]
        assert await env.reencrypt() == 1
        rows = dict(await store._db.execute_fetchall("SELECT name, dek_id FROM secrets"))
        assert rows == {"a": second, "b": second}
        assert (await store._db.execute_fetchall("SELECT blob FROM secrets WHERE name = 'a'"))[0][0] != blob_a
        assert [d["dek_id"] for d in await env.status()] == [second]   # the unused DEK is gone
        # A process that never saw either DEK reads everything from the rows alone.
        fresh = Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path))
        assert (await fresh.get("a"), await fresh.get("b")) == (b"secret-a", b"secret-b")
        assert await env.reencrypt() == 0
    finally:
        await store.close()


async def test_reads_never_fail_while_another_process_rotates_the_dek(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    other_store, other = await open_envelope(tmp_path)
    try:
        for i in range(5):
            await env.add(f"s{i}", f"value-{i}".encode())

        async def reader() -> int:
            reads = 0
            for _ in range(30):
                fresh = Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path))
                for i in range(5):
                    assert await fresh.get(f"s{i}") == f"value-{i}".encode()
                    reads += 1
                await asyncio.sleep(0)
            return reads

        async def rotator() -> None:
            for _ in range(5):
                await other.rotate_dek()
                await other.reencrypt()
                await asyncio.sleep(0)
        reads, _ = await asyncio.gather(reader(), rotator())
        assert reads == 150
    finally:
        await other_store.close()
        await store.close()



class RotatedMidRead:
    """Real rows; before the first DEK read, another process re-encrypts every row and deletes the old DEK.

    The interleaving the test above hits only now and then under load, made certain.
    """

    def __init__(self, rows: SqliteSecretRows, other: Envelope) -> None:
        self.rows, self.other, self.rotated = rows, other, False

    async def get_dek(self, dek_id: str) -> tuple[str, bytes] | None:
        if not self.rotated:
            self.rotated = True
            await self.other.rotate_dek()
            assert await self.other.reencrypt() == 1   # the row moved, and its old DEK is gone
        return await self.rows.get_dek(dek_id)

    def __getattr__(self, name: str) -> object:
        return getattr(self.rows, name)


async def test_a_read_whose_dek_is_deleted_under_it_reads_the_moved_row(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    other_store, other = await open_envelope(tmp_path)
    try:
        await env.add("s", b"value")
        old_dek = await env.current_dek_id()
        mid_read = RotatedMidRead(await SqliteSecretRows.open(store), other)
        assert await Envelope(mid_read, FileKek.load_or_create(tmp_path)).get("s") == b"value"  # type: ignore[arg-type]
        assert mid_read.rotated and await mid_read.rows.get_dek(old_dek) is None
        # A row that did not move still fails on a missing DEK: the retry is for moved rows only.
        await store._db.execute("PRAGMA foreign_keys = OFF")   # a corrupted store: the row names a deleted DEK
        await store._db.execute("UPDATE secrets SET dek_id = ? WHERE name = 's'", (old_dek,))
        await store._db.commit()
        with pytest.raises(EnvelopeError, match="missing from the store"):
            await Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path)).get("s")
    finally:
        await other_store.close()
        await store.close()


async def test_root_rotation_rewraps_deks_without_touching_secrets_then_retires_the_old_root(
        tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    try:
        await env.add("a", b"secret-a")
        old_root = env.kek.key_id
        before = await store._db.execute_fetchall("SELECT name, dek_id, blob FROM secrets")
        started_before = FileKek.load_or_create(tmp_path)   # another process, started before the rotation
        new_root = await env.rotate_root()
        assert new_root != old_root
        sdir = tmp_path / "secrets"
        assert sorted(p.name for p in sdir.iterdir()) == ["root.2.key"]   # root.key retired: nothing needs it
        assert mode(sdir / "root.2.key") == 0o600
        assert await store._db.execute_fetchall("SELECT name, dek_id, blob FROM secrets") == before
        assert {r[0] for r in await store._db.execute_fetchall("SELECT kek_id FROM deks")} == {new_root}
        # The older process finds the new generation on disk when it meets its id.
        late = Envelope(await SqliteSecretRows.open(store), started_before)
        assert await late.get("a") == b"secret-a"
        restarted = Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path))
        assert restarted.kek.key_id == new_root and await restarted.get("a") == b"secret-a"
    finally:
        await store.close()


async def test_an_interrupted_root_rotation_keeps_reading_the_old_root_until_rewrapped(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    try:
        await env.add("a", b"secret-a")
        old_root = env.kek.key_id
        env.kek.rotate()   # crash here: the new root exists, no DEK is re-wrapped yet
        restarted = Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path))
        assert restarted.kek.key_id != old_root
        assert await restarted.get("a") == b"secret-a"   # the old root still unwraps
        assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == ["root.2.key", "root.key"]
        assert await restarted.rewrap() == 1
        assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == ["root.2.key"]
        assert await Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path)).get("a") \
            == b"secret-a"
    finally:
        await store.close()


async def test_database_bytes_hold_no_plaintext_after_every_rotation(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    secret = os.urandom(32)
    roots, deks = [], set()
    try:
        await env.add("s", secret)
        for _ in range(2):
            roots.append((tmp_path / "secrets" / sorted(os.listdir(tmp_path / "secrets"))[-1]).read_bytes())
            deks |= set(env._deks.values())   # the DEKs live in memory only; reencrypt forgets retired ones
            await env.rotate_dek()
            deks |= set(env._deks.values())
            await env.reencrypt()
            await env.rotate_root()
        await store._db.execute("PRAGMA wal_checkpoint(FULL)")
    finally:
        await store.close()
    disk = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert len(deks) == 3 and len(roots) == 2
    for needle in (secret, *deks, *roots):
        assert needle not in disk and needle.hex().encode() not in disk


# ------------------------------------------------------------------ the pepper in the envelope


async def test_a_pepper_file_moves_into_the_envelope_and_is_deleted_only_once_verified(tmp_path: Path) -> None:
    from proxy.keys.hashing import Pepper, load_or_create_pepper, load_pepper
    legacy = load_or_create_pepper(tmp_path)   # as an older seekgate left it
    store, env = await open_envelope(tmp_path)
    try:
        pepper = await load_pepper(env, tmp_path, now=0.0)
        assert isinstance(pepper, Pepper) and bytes(pepper) == legacy and pepper.version == 1
        assert not (tmp_path / "secrets" / "pepper").exists()
        assert await load_pepper(env, tmp_path, now=0.0) == legacy   # stable across starts
        assert repr(pepper) == "Pepper(version=1, versions=[1])"   # never the bytes
    finally:
        await store.close()


async def test_a_pepper_file_that_differs_from_the_envelope_is_kept_and_start_refused(tmp_path: Path) -> None:
    from proxy.keys.hashing import load_pepper
    store, env = await open_envelope(tmp_path)
    try:
        await load_pepper(env, tmp_path, now=0.0)            # the envelope has version 1 already
        stray = tmp_path / "secrets" / "pepper"
        stray.write_bytes(b"s" * 32)
        with pytest.raises(EnvelopeError, match="differs from the pepper in the key store"):
            await load_pepper(env, tmp_path, now=0.0)
        assert stray.read_bytes() == b"s" * 32
    finally:
        await store.close()


async def test_a_new_pepper_version_hashes_only_once_published(tmp_path: Path) -> None:
    from proxy.keys.hashing import add_pepper_version, load_pepper
    store, env = await open_envelope(tmp_path)
    try:
        first = await load_pepper(env, tmp_path, now=1000.0, publish_s=10)
        assert await add_pepper_version(env) == 2
        created = (await env.listing("pepper/"))[-1][1]
        early = await load_pepper(env, tmp_path, now=created + 1, publish_s=10)
        assert early.version == 1 and early.versions == [1, 2] and bytes(early) == bytes(first)
        late = await load_pepper(env, tmp_path, now=created + 10, publish_s=10)
        assert late.version == 2 and late.for_version(1) == bytes(first) and bytes(late) != bytes(first)
    finally:
        await store.close()


async def test_a_wrong_or_missing_root_refuses_to_start_in_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.main import main
    from proxy.keys.secrets_setup import open_keyring
    from proxy.paths import store_path
    from proxy.settings import load_settings
    settings = load_settings(None, env={}, overrides={"data_dir": str(tmp_path)})
    assert await asyncio.to_thread(main, ["--data-dir", str(tmp_path), "crypto", "status"]) == 0
    (tmp_path / "secrets" / "root.key").write_bytes(os.urandom(32))   # the wrong root
    store = await SqliteStore.open(store_path(tmp_path))
    try:
        with pytest.raises(EnvelopeError, match="wrapped by root"):
            await open_keyring(settings, tmp_path, store)
    finally:
        await store.close()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["--data-dir", str(tmp_path), "crypto", "status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrapped by root" in err
    (tmp_path / "secrets" / "root.key").unlink()   # the root missing: a new one would not open the store
    assert await asyncio.to_thread(main, ["--data-dir", str(tmp_path), "crypto", "status"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


async def test_a_process_that_missed_a_root_rotation_never_wraps_back_under_the_old_root(tmp_path: Path) -> None:
    store, env = await open_envelope(tmp_path)
    try:
        await env.add("a", b"secret-a")
        stale = Envelope(await SqliteSecretRows.open(store), FileKek.load_or_create(tmp_path))
        assert await stale.get("a") == b"secret-a"
        new_root = await env.rotate_root()
        # The stale process's background pass: it must learn of root 2, not undo the rotation.
        assert await stale.rewrap() == 0
        await stale.rotate_dek()
        assert {r[0] for r in await store._db.execute_fetchall("SELECT kek_id FROM deks")} == {new_root}
        assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == ["root.2.key"]
    finally:
        await store.close()
