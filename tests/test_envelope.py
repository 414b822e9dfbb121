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
    assert again.unwrap(kek.wrap(b"d" * 32)) == b"d" * 32


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


def test_wrap_is_authenticated_and_tied_to_its_root(tmp_path: Path) -> None:
    a, b = FileKek(b"a" * 32), FileKek(b"b" * 32)
    blob = a.wrap(b"k" * 32)
    assert b"k" * 32 not in blob and a.wrap(b"k" * 32) != blob   # fresh nonce every wrap
    with pytest.raises(KekError):
        b.unwrap(blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(KekError):
        a.unwrap(tampered)
    with pytest.raises(KekError, match="malformed"):
        a.unwrap(b"\x02" + blob[1:])


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
