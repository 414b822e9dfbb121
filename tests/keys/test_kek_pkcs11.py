"""The pkcs11 KEK provider against a real SoftHSM2 token, initialised here in a temp dir (SOFTHSM2_CONF)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import AttributeSensitive, KeyUnextractable

from proxy.keys.envelope import Envelope
from proxy.keys.kek import KekError, KekProvider
from proxy.keys.kek_pkcs11 import Pkcs11Kek
from proxy.keys.secrets_setup import open_kek
from proxy.settings import load_settings
from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_secrets import SqliteSecretRows

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN, SO_PIN = "20261129", "so-20261129"


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh SoftHSM2 token, labelled per module. SoftHSM reads its config once per process,
    so every test in this process shares this one token directory."""
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    label = "seekgate-test"
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN,
                    "--pin", PIN], check=True, capture_output=True, env=os.environ.copy())
    yield label
    if saved is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = saved


def session(token: str) -> pkcs11.Session:
    tok = pkcs11.lib(MODULE).get_token(token_label=token)
    try:
        return tok.open(user_pin=PIN, rw=True)
    except pkcs11.exceptions.UserAlreadyLoggedIn:   # a provider in this process is logged in
        return tok.open(rw=True)


def test_wrap_unwrap_in_the_token_and_the_root_never_leaves_it(token: str) -> None:
    kek = Pkcs11Kek(MODULE, token, PIN, "root-a")
    try:
        assert isinstance(kek, KekProvider)
        assert kek.key_id.startswith(f"pkcs11:{token}/root-a.1/")
        dek = os.urandom(32)
        blob = kek.wrap(dek)
        assert dek not in blob and kek.wrap(dek) != blob      # a fresh nonce every wrap
        assert kek.unwrap(blob, kek.key_id) == dek
        with pytest.raises(KekError, match="does not unwrap"):
            kek.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), kek.key_id)
        with pytest.raises(KekError, match="holds no root"):
            kek.unwrap(blob, f"pkcs11:{token}/root-a.9/00")
        # Another process (here: another provider object) unwraps with the same token key.
        again = Pkcs11Kek(MODULE, token, PIN, "root-a")
        try:
            assert again.key_id == kek.key_id and again.unwrap(blob, kek.key_id) == dek
        finally:
            again.close()
    finally:
        kek.close()


def test_the_root_key_is_not_extractable(token: str) -> None:
    Pkcs11Kek(MODULE, token, PIN, "root-b").close()
    with session(token) as s:
        root = s.get_key(object_class=ObjectClass.SECRET_KEY, label="root-b.1")
        assert root[Attribute.EXTRACTABLE] is False
        assert root[Attribute.SENSITIVE] is True
        assert root[Attribute.TOKEN] is True
        with pytest.raises(AttributeSensitive):
            root[Attribute.VALUE]
        # Nor can it be wrapped out under another key.
        wrapper = s.generate_key(KeyType.AES, 256, label="wrapper", store=False)
        with pytest.raises(KeyUnextractable):
            wrapper.wrap_key(root)


def test_rotation_adds_a_version_in_the_token_old_wraps_still_open_until_retired(token: str) -> None:
    kek = Pkcs11Kek(MODULE, token, PIN, "root-c")
    try:
        old_id, dek = kek.key_id, os.urandom(32)
        old_blob = kek.wrap(dek)
        new_id = kek.rotate()
        assert new_id.startswith(f"pkcs11:{token}/root-c.2/")
        assert kek.unwrap(old_blob, old_id) == dek           # the old version still unwraps
        rewrapped_id, blob = kek.rewrap(old_blob, old_id)
        assert rewrapped_id == new_id and kek.unwrap(blob, new_id) == dek
        assert kek.retire([old_id]) == []                    # still in use: kept
        assert kek.retire([new_id]) == [old_id]              # nothing names it: destroyed in the token
        with session(token) as s:
            labels = sorted(o[Attribute.LABEL] for o in s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
                            if o[Attribute.LABEL].startswith("root-c."))
        assert labels == ["root-c.2"]
        with pytest.raises(KekError, match="holds no root"):
            kek.unwrap(old_blob, old_id)
    finally:
        kek.close()


def test_a_wrong_pin_or_token_refuses_in_one_line(token: str) -> None:
    with pytest.raises(KekError, match="cannot log in") as e:
        Pkcs11Kek(MODULE, token, "0000", "root-a")
    assert "\n" not in str(e.value)
    with pytest.raises(KekError, match="no single token"):
        Pkcs11Kek(MODULE, "no-such-token", PIN, "root-a")
    with pytest.raises(KekError, match="PIN"):
        open_kek(load_settings(None, env={}, overrides={"crypto.provider": "pkcs11", "crypto.pkcs11_module": MODULE,
                                                        "crypto.pkcs11_token_label": token}), Path("."), env={})


async def test_envelope_over_the_token_survives_root_rotation(token: str, tmp_path: Path) -> None:
    settings = load_settings(None, env={}, overrides={
        "data_dir": str(tmp_path), "crypto.provider": "pkcs11", "crypto.pkcs11_module": MODULE,
        "crypto.pkcs11_token_label": token, "crypto.pkcs11_key_label": "root-e"})
    kek = open_kek(settings, tmp_path, env={"SEEKGATE_PKCS11_PIN": PIN})
    store = await SqliteStore.open(tmp_path / "keys.db")
    try:
        env = Envelope(await SqliteSecretRows.open(store), kek)
        secret = os.urandom(32)
        await env.add("s", secret)
        first = kek.key_id
        await env.rotate_root()
        assert kek.key_id != first
        assert {r[0] for r in await store._db.execute_fetchall("SELECT kek_id FROM deks")} == {kek.key_id}
        fresh = Envelope(await SqliteSecretRows.open(store), open_kek(settings, tmp_path,
                                                                     env={"SEEKGATE_PKCS11_PIN": PIN}))
        assert await fresh.get("s") == secret
        fresh.kek.close()
        deks = list(env._deks.values())
    finally:
        await store.close()
        kek.close()
    disk = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert not list((tmp_path).glob("secrets/root*"))   # no root file: the root is in the token
    for needle in (secret, *deks):
        assert needle not in disk and needle.hex().encode() not in disk
