"""crypto.root_key_file: replicas with separate data dirs mount one root and share one store's secrets."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from proxy.keys.kek import KekError
from proxy.keys.secrets_setup import open_kek, open_pepper
from proxy.settings import load_settings
from proxy.store.backend import open_store


def mounted_root(tmp_path: Path) -> Path:
    """A root laid out the way Kubernetes mounts a Secret: a symlink into a versioned directory."""
    mount = tmp_path / "mount"
    (mount / "..2026_01_01").mkdir(parents=True)
    real = mount / "..2026_01_01" / "root.key"
    real.write_bytes(secrets.token_bytes(32))
    os.chmod(real, 0o400)
    (mount / "root.key").symlink_to(real)
    return mount / "root.key"


def test_replicas_pointed_at_one_mounted_root_use_the_same_root(tmp_path: Path) -> None:
    root = mounted_root(tmp_path)
    a = open_kek(load_settings(None, env={}, overrides={"crypto.root_key_file": str(root)}), tmp_path / "a")
    b = open_kek(load_settings(None, env={}, overrides={"crypto.root_key_file": str(root)}), tmp_path / "b")
    assert a.key_id == b.key_id
    assert b.unwrap(a.wrap(b"\x07" * 32), a.key_id) == b"\x07" * 32
    assert not (tmp_path / "a" / "secrets").exists()   # nothing made under the data dir


def test_a_missing_configured_root_is_refused_once_the_store_has_wrapped_keys(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, overrides={"crypto.root_key_file": str(tmp_path / "gone" / "root.key")})
    with pytest.raises(KekError, match="root key missing"):
        open_kek(settings, tmp_path / "d", stored_roots=["abc"])


def test_a_readable_configured_root_is_refused(tmp_path: Path) -> None:
    root = mounted_root(tmp_path)
    os.chmod(root.resolve(), 0o644)
    with pytest.raises(KekError, match="wider than 0600"):
        open_kek(load_settings(None, env={}, overrides={"crypto.root_key_file": str(root)}), tmp_path / "d")


async def test_two_replicas_on_one_postgres_store_and_one_root_share_the_pepper(tmp_path: Path, pg_url: str) -> None:
    root = mounted_root(tmp_path)
    peppers = []
    for replica in ("a", "b"):
        settings = load_settings(None, env={}, overrides={
            "crypto.root_key_file": str(root), "store.url": pg_url, "store.auto_migrate": True,
            "data_dir": str(tmp_path / replica)})
        store = await open_store(settings.store, tmp_path / replica)
        try:
            peppers.append(await open_pepper(settings, store))   # the first replica makes it, the second reads it
        finally:
            await store.close()
    assert peppers[0] == peppers[1] and len(peppers[0]) >= 32
