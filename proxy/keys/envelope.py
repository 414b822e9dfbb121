"""Envelope encryption of recoverable secrets: AES-256-GCM under a data key (DEK), the DEK wrapped by a KEK.

Layout (rows in the key store, see proxy/store/sqlite_secrets.py):
  deks(dek_id, kek_id, wrapped)       the DEK, wrapped by the KEK provider; never stored in the clear
  secrets(name, dek_id, blob)         blob = nonce(12) || AES-GCM(DEK, secret, AD)
AD = "seekgate/secret/v1" NUL name NUL dek_id: a ciphertext copied onto another row,
or re-labelled with another DEK, fails to decrypt instead of answering as that secret.
Plaintext DEKs live only in this process's memory.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.keys.kek import KekError, KekProvider

DEK_BYTES = 32
NONCE_BYTES = 12


class SecretRows(Protocol):
    """What the envelope needs from a store (SqliteSecretRows implements it)."""

    async def newest_dek(self) -> tuple[str, str, bytes] | None: ...
    async def get_dek(self, dek_id: str) -> tuple[str, bytes] | None: ...
    async def put_dek(self, dek_id: str, kek_id: str, wrapped: bytes, now: float) -> None: ...
    async def get_secret(self, name: str) -> tuple[str, bytes] | None: ...
    async def secret_names(self, prefix: str) -> list[str]: ...
    async def add_secret(self, name: str, dek_id: str, blob: bytes, now: float) -> bool: ...


class EnvelopeError(RuntimeError):
    """A stored secret cannot be recovered (altered row, wrong KEK): refuse to start, say which."""


def associated_data(name: str, dek_id: str) -> bytes:
    return b"seekgate/secret/v1\0" + name.encode("utf-8") + b"\0" + dek_id.encode("ascii")


class Envelope:
    """Seal and open named secrets. Secrets are write-once by name (rotation adds a new name)."""

    def __init__(self, rows: SecretRows, kek: KekProvider, clock: Callable[[], float] = time.time) -> None:
        self._rows, self._kek, self._clock = rows, kek, clock
        self._deks: dict[str, bytes] = {}   # dek_id -> plaintext DEK, memory only

    async def _dek(self, dek_id: str) -> bytes:
        if dek_id in self._deks:
            return self._deks[dek_id]
        row = await self._rows.get_dek(dek_id)
        if row is None:
            raise EnvelopeError(f"data key {dek_id} is missing from the store")
        kek_id, wrapped = row
        if kek_id != self._kek.key_id:
            raise EnvelopeError(f"data key {dek_id} was wrapped by root {kek_id}, "
                                f"but the configured root is {self._kek.key_id}")
        try:
            dek = self._kek.unwrap(wrapped)
        except KekError as exc:
            raise EnvelopeError(f"data key {dek_id}: {exc}") from None
        if len(dek) != DEK_BYTES:
            raise EnvelopeError(f"data key {dek_id} unwraps to {len(dek)} bytes, expected {DEK_BYTES}")
        self._deks[dek_id] = dek
        return dek

    async def _current_dek(self) -> tuple[str, bytes]:
        """The DEK new writes use, made (and stored wrapped) on first use."""
        row = await self._rows.newest_dek()
        if row is None:
            dek_id, dek = secrets.token_hex(8), secrets.token_bytes(DEK_BYTES)
            await self._rows.put_dek(dek_id, self._kek.key_id, self._kek.wrap(dek), self._clock())
            self._deks[dek_id] = dek
            return dek_id, dek
        return row[0], await self._dek(row[0])

    async def add(self, name: str, plaintext: bytes) -> bytes:
        """Store `plaintext` under `name` unless a secret of that name exists; returns the stored value.

        Two processes adding the same name at once agree on one value: the loser reads the winner's.
        """
        dek_id, dek = await self._current_dek()
        nonce = secrets.token_bytes(NONCE_BYTES)
        blob = nonce + AESGCM(dek).encrypt(nonce, plaintext, associated_data(name, dek_id))
        if await self._rows.add_secret(name, dek_id, blob, self._clock()):
            return plaintext
        stored = await self.get(name)
        assert stored is not None   # add_secret found the row, so it exists
        return stored

    async def get(self, name: str) -> bytes | None:
        """The secret's plaintext; None if never stored; EnvelopeError if it does not decrypt."""
        row = await self._rows.get_secret(name)
        if row is None:
            return None
        dek_id, blob = row
        dek = await self._dek(dek_id)
        if len(blob) < NONCE_BYTES + 16:
            raise EnvelopeError(f"secret {name!r} is truncated")
        try:
            return AESGCM(dek).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data(name, dek_id))
        except InvalidTag:
            raise EnvelopeError(f"secret {name!r} does not decrypt: the row was altered or moved") from None

    async def get_or_create(self, name: str, make: Callable[[], bytes]) -> bytes:
        existing = await self.get(name)
        return existing if existing is not None else await self.add(name, make())

    async def names(self, prefix: str) -> list[str]:
        """Stored secret names starting with `prefix`, oldest first."""
        return await self._rows.secret_names(prefix)
