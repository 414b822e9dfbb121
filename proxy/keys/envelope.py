"""Envelope encryption of recoverable secrets: AES-256-GCM under a data key (DEK), the DEK wrapped by a KEK.

Layout (rows in the key store, see proxy/store/sqlite_secrets.py):
  deks(dek_id, kek_id, wrapped)       the DEK, wrapped by the KEK provider; never stored in the clear
  secrets(name, dek_id, blob)         blob = nonce(12) || AES-GCM(DEK, secret, AD)
AD = "seekgate/secret/v1" NUL name NUL dek_id: a ciphertext copied onto another row,
or re-labelled with another DEK, fails to decrypt instead of answering as that secret.
Plaintext DEKs live only in this process's memory.

Rotation never stops reads: a new DEK serves new writes at once while rows under an
older one stay readable until `reencrypt` has moved them (each row swapped by a
compare-and-set, so two processes re-encrypting at once cannot lose a row); a new root
re-wraps DEKs (`rewrap`) without touching the secrets, and the old root is retired
only when no DEK still names it.
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
    async def list_deks(self) -> list[tuple[str, str, float, int]]: ...
    async def rewrap_dek(self, dek_id: str, old_kek_id: str, new_kek_id: str, wrapped: bytes) -> bool: ...
    async def secrets_not_under(self, dek_id: str) -> list[str]: ...
    async def replace_secret(self, name: str, old_dek_id: str, new_dek_id: str, blob: bytes) -> bool: ...
    async def delete_unused_deks(self, keep: str) -> list[str]: ...
    async def secret_listing(self, prefix: str) -> list[tuple[str, float]]: ...
    async def delete_secret(self, name: str) -> bool: ...
    async def record_event(self, name: str, at: float, *, only_if_absent: bool = False) -> None: ...


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
        try:
            dek = self._kek.unwrap(wrapped, kek_id)
        except KekError as exc:
            raise EnvelopeError(f"data key {dek_id} (wrapped by root {kek_id}): {exc}") from None
        if len(dek) != DEK_BYTES:
            raise EnvelopeError(f"data key {dek_id} unwraps to {len(dek)} bytes, expected {DEK_BYTES}")
        self._deks[dek_id] = dek
        return dek

    async def _current_dek(self) -> tuple[str, bytes]:
        """The DEK new writes use, made (and stored wrapped) on first use."""
        row = await self._rows.newest_dek()
        if row is None:
            now = self._clock()
            # The first DEK starts both schedules (a root in use from now on).
            await self._rows.record_event("root", now, only_if_absent=True)
            return await self._new_dek()
        return row[0], await self._dek(row[0])

    async def _new_dek(self) -> tuple[str, bytes]:
        dek_id, dek = secrets.token_hex(8), secrets.token_bytes(DEK_BYTES)
        now = self._clock()
        await self._rows.put_dek(dek_id, self._kek.key_id, self._kek.wrap(dek), now)
        await self._rows.record_event("dek", now)
        self._deks[dek_id] = dek
        return dek_id, dek

    @property
    def kek(self) -> KekProvider:
        return self._kek

    async def current_dek_id(self) -> str:
        return (await self._current_dek())[0]

    async def rotate_dek(self) -> str:
        """A new DEK for every write from now on; returns its id. Rows under older DEKs stay readable."""
        return (await self._new_dek())[0]

    async def reencrypt(self) -> int:
        """Move every secret onto the current DEK, then delete DEKs nothing uses; returns rows moved."""
        dek_id, dek = await self._current_dek()
        moved = 0
        for name in await self._rows.secrets_not_under(dek_id):
            read = await self._read(name)
            if read is None or read[0] == dek_id:
                continue   # deleted or moved by another process meanwhile
            if await self._rows.replace_secret(name, read[0], dek_id, self._seal(name, dek_id, dek, read[1])):
                moved += 1
        for gone in await self._rows.delete_unused_deks(keep=dek_id):
            self._deks.pop(gone, None)
        return moved

    async def rotate_root(self) -> str:
        """A new root generation at the provider, then every DEK re-wrapped under it; returns its id."""
        kek_id = self._kek.rotate()
        await self._rows.record_event("root", self._clock())
        await self.rewrap()
        return kek_id

    async def rewrap(self) -> int:
        """Re-wrap every DEK not under the current root (the data is untouched), then retire old roots."""
        # Learn of a rotation made elsewhere first, or this would wrap DEKs back under the old root.
        self._kek.reload()
        done = 0
        for dek_id, kek_id, _, _ in await self._rows.list_deks():
            if kek_id == self._kek.key_id:
                continue
            row = await self._rows.get_dek(dek_id)
            if row is None or row[0] != kek_id:
                continue
            try:
                new_kek_id, wrapped = self._kek.rewrap(row[1], kek_id)
            except KekError as exc:
                raise EnvelopeError(f"data key {dek_id} (wrapped by root {kek_id}): {exc}") from None
            if await self._rows.rewrap_dek(dek_id, kek_id, new_kek_id, wrapped):
                done += 1
        in_use = {kek_id for _, kek_id, _, _ in await self._rows.list_deks()}
        if in_use <= {self._kek.key_id}:
            self._kek.retire(in_use)   # only once nothing still needs an old root
        return done

    async def status(self) -> list[dict[str, object]]:
        """Every DEK: id, wrapping root, creation time, rows under it, and whether new writes use it."""
        current = (await self._rows.newest_dek() or ("",))[0]
        return [{"dek_id": d, "kek_id": k, "created_at": t, "secrets": n, "current": d == current}
                for d, k, t, n in await self._rows.list_deks()]

    def _seal(self, name: str, dek_id: str, dek: bytes, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(dek).encrypt(nonce, plaintext, associated_data(name, dek_id))

    async def add(self, name: str, plaintext: bytes) -> bytes:
        """Store `plaintext` under `name` unless a secret of that name exists; returns the stored value.

        Two processes adding the same name at once agree on one value: the loser reads the winner's.
        """
        dek_id, dek = await self._current_dek()
        blob = self._seal(name, dek_id, dek, plaintext)
        if await self._rows.add_secret(name, dek_id, blob, self._clock()):
            return plaintext
        stored = await self.get(name)
        assert stored is not None   # add_secret found the row, so it exists
        return stored

    async def get(self, name: str) -> bytes | None:
        """The secret's plaintext; None if never stored; EnvelopeError if it does not decrypt."""
        read = await self._read(name)
        return None if read is None else read[1]

    async def _read(self, name: str) -> tuple[str, bytes] | None:
        """(the DEK id of the row read, the plaintext); None if there is no such secret."""
        row = await self._rows.get_secret(name)
        while row is not None:
            try:
                return row[0], await self._decrypt(name, *row)
            except EnvelopeError:
                # Between reading the row and its DEK, another process may have re-encrypted the row
                # onto a newer DEK and deleted the old one: read the row again. Only a row that
                # moved is retried, so a missing or wrong DEK for a row that stays put still fails.
                moved = await self._rows.get_secret(name)
                if moved is not None and moved[0] == row[0]:
                    raise
                row = moved   # None: deleted meanwhile, as if never stored
        return None

    async def _decrypt(self, name: str, dek_id: str, blob: bytes) -> bytes:
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

    async def listing(self, prefix: str) -> list[tuple[str, float]]:
        """(name, created_at) of the stored secrets starting with `prefix`, oldest first."""
        return await self._rows.secret_listing(prefix)

    async def delete(self, name: str) -> bool:
        """Drop a secret for good (a retired signing key or pepper); True if it existed."""
        return await self._rows.delete_secret(name)

    async def verify(self, name: str, expected: bytes) -> bool:
        """Whether `name` decrypts to `expected` from the stored rows alone (no DEK cached in memory)."""
        try:
            return await Envelope(self._rows, self._kek, self._clock).get(name) == expected
        except EnvelopeError:
            return False
