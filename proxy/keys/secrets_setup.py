"""Start-up wiring of the recoverable secrets: KEK provider -> envelope -> keyring (signing keys, pepper)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from proxy.keys.envelope import Envelope
from proxy.keys.hashing import Pepper, load_pepper
from proxy.keys.kek import FileKek, KekError, KekProvider
from proxy.keys.rotation import Keyring, publish_s
from proxy.settings import Settings
from proxy.store.backend import SecretRows, Store, open_secret_rows, open_store


def open_kek(settings: Settings | None, data_dir: Path, env: Mapping[str, str] = os.environ,
             stored_roots: Iterable[str] = ()) -> KekProvider:
    """The configured KEK provider; KekError (one line: what is missing or wrong) if it cannot be used.

    `stored_roots`: the roots the store's DEKs are wrapped by; the file provider creates a root
    only when there are none.
    """
    c = None if settings is None else settings.crypto
    if c is None or c.provider == "file":
        root_file = Path(c.root_key_file) if c is not None and c.root_key_file else None
        return FileKek.load_or_create(data_dir, stored_roots, root_file)
    if c.provider == "pkcs11":
        try:
            from proxy.keys.kek_pkcs11 import Pkcs11Kek
        except ImportError as exc:
            raise KekError(f"crypto.provider pkcs11 needs python-pkcs11 (pip install 'seekgate[hsm]'): {exc}") \
                from None
        pin = env.get(c.pkcs11_pin_env)
        if not pin:
            raise KekError(f"crypto.provider pkcs11: set the token PIN in ${c.pkcs11_pin_env}")
        return Pkcs11Kek(c.pkcs11_module, c.pkcs11_token_label, pin, c.pkcs11_key_label)
    if c.provider == "vault":
        try:
            from proxy.keys.kek_vault import VaultKek
        except ImportError as exc:
            raise KekError(f"crypto.provider vault needs hvac (pip install 'seekgate[vault]'): {exc}") from None
        token = env.get(c.vault_token_env)
        if not token:
            raise KekError(f"crypto.provider vault: set the Vault token in ${c.vault_token_env}")
        return VaultKek(c.vault_addr, token, c.vault_key, c.vault_mount)
    raise KekError(f"unknown crypto.provider {c.provider!r}")


async def open_envelope(data_dir: Path, store: Store, settings: Settings | None = None,
                        kek: KekProvider | None = None) -> tuple[Envelope, SecretRows]:
    """The envelope over the store's secret rows, keyed by the configured KEK (`file` without settings)."""
    rows = await open_secret_rows(store)
    if kek is None:
        kek = open_kek(settings, data_dir, stored_roots=[kek_id for _, kek_id, _, _ in await rows.list_deks()])
    return Envelope(rows, kek), rows


async def open_keyring(settings: Settings, data_dir: Path, store: Store,
                       kek: KekProvider | None = None) -> Keyring:
    """Envelope, signing keys and pepper, loaded and checked: a missing or wrong KEK stops the start here."""
    envelope, rows = await open_envelope(data_dir, store, settings, kek)
    try:
        # Leftovers of an interrupted rotation are finished by Keyring.run, in the background.
        return await Keyring.open(envelope, rows, store, settings, data_dir)
    except BaseException:
        envelope.kek.close()
        raise


async def open_pepper(settings: Settings, store: Store) -> Pepper:
    """The pepper for tools that hash keys outside the server (CLI, bootstrap), from the envelope."""
    data_dir = Path(settings.data_dir)
    envelope, _ = await open_envelope(data_dir, store, settings)
    try:
        return await load_pepper(envelope, data_dir, time.time(), publish_s(settings))
    finally:
        envelope.kek.close()


def load_pepper_sync(settings: Settings) -> Pepper:
    """`open_pepper` on its own event loop and store connection, for synchronous callers."""
    async def go() -> Pepper:
        store = await open_store(settings.store, Path(settings.data_dir))
        try:
            return await open_pepper(settings, store)
        finally:
            await store.close()
    return asyncio.run(go())
