"""The `pkcs11` KEK provider: the root is a non-extractable AES-256 key inside an HSM token.

Data keys are wrapped and unwrapped by the token itself (CKM_AES_GCM with the same
associated data as the file provider); the root's value never reaches this process.
Each root generation is its own key object labelled `<key_label>.<n>` with a random
CKA_ID (so two processes rotating at once make two distinct roots, never one name for
two keys); rotation generates the next one in the token, and `retire` destroys
generations no wrapped data key names any more. The PIN comes from the environment, never from YAML.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterable
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams, Mechanism

from .kek import NONCE_BYTES, WRAP_AD, WRAP_VERSION, KekError

_TAG_BITS = 128
# What the root may do: encrypt and decrypt data keys, nothing else; never leave the token.
_ROOT_TEMPLATE = {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                  Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False}


class Pkcs11Kek:
    """Roots in a PKCS#11 token, one session held open for the process's lifetime."""

    def __init__(self, module: str, token_label: str, pin: str, key_label: str) -> None:
        self._label = key_label
        self._label_re = re.compile(re.escape(key_label) + r"\.([1-9][0-9]*)")
        self._token_label = token_label
        self._lock = threading.Lock()   # a PKCS#11 session is not for concurrent use
        try:
            lib = pkcs11.lib(module)
        except (RuntimeError, OSError, PKCS11Error) as exc:
            raise KekError(f"pkcs11: cannot load module {module}: {exc!r}") from None
        try:
            token = lib.get_token(token_label=token_label)
        except (pkcs11.NoSuchToken, pkcs11.MultipleTokensReturned):
            raise KekError(f"pkcs11: no single token labelled {token_label!r} in {module}") from None
        try:
            self._session = token.open(user_pin=pin, rw=True)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # Login is per process and token: another provider here holds it, and this session shares it.
            self._session = token.open(rw=True)
        except PKCS11Error as exc:
            raise KekError(f"pkcs11: cannot log in to token {token_label!r}: {type(exc).__name__} "
                           f"(wrong PIN?)") from None
        self._keys: dict[str, Any] = {}
        self.key_id = ""
        with self._lock:
            self._load()
            if not self._keys:
                self._generate(1)
                self._load()

    def _kid(self, version: int, obj_id: bytes) -> str:
        return f"pkcs11:{self._token_label}/{self._label}.{version}/{obj_id.hex()}"

    def _load(self) -> None:
        found: dict[tuple[int, bytes], Any] = {}
        for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            m = self._label_re.fullmatch(obj[Attribute.LABEL])
            if m:
                found[(int(m.group(1)), bytes(obj[Attribute.ID]))] = obj
        self._keys = {self._kid(*k): found[k] for k in sorted(found)}
        self._versions = sorted(v for v, _ in found)
        if found:
            self.key_id = self._kid(*max(found))

    def _generate(self, version: int) -> None:
        try:
            self._session.generate_key(KeyType.AES, 256, label=f"{self._label}.{version}", store=True,
                                       id=secrets.token_bytes(8),
                                       capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                                       template=_ROOT_TEMPLATE)
        except PKCS11Error as exc:
            raise KekError(f"pkcs11: cannot generate root {self._label}.{version}: {exc!r}") from None

    def reload(self) -> None:
        with self._lock:
            self._load()

    def wrap(self, dek: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            self._load()   # never wrap under a root another process has rotated away
            try:
                sealed = self._keys[self.key_id].encrypt(
                    dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, WRAP_AD, _TAG_BITS))
            except PKCS11Error as exc:
                raise KekError(f"pkcs11: wrapping a data key failed: {exc!r}") from None
        return WRAP_VERSION + nonce + bytes(sealed)

    def unwrap(self, blob: bytes, key_id: str) -> bytes:
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != WRAP_VERSION:
            raise KekError("wrapped data key is malformed")
        with self._lock:
            if key_id not in self._keys:
                self._load()   # rotated by another process since this one started
            key = self._keys.get(key_id)
            if key is None:
                raise KekError(f"the token holds no root {key_id} (current root is {self.key_id})")
            try:
                return bytes(key.decrypt(blob[1 + NONCE_BYTES:], mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(blob[1:1 + NONCE_BYTES], WRAP_AD, _TAG_BITS)))
            except PKCS11Error:
                raise KekError("data key does not unwrap under this root: wrong root, "
                               "or the stored data key was altered") from None

    def rewrap(self, blob: bytes, key_id: str) -> tuple[str, bytes]:
        return self.key_id, self.wrap(self.unwrap(blob, key_id))

    def rotate(self) -> str:
        with self._lock:
            self._load()
            self._generate(max(self._versions, default=0) + 1)
            self._load()
            return self.key_id

    def retire(self, in_use: Iterable[str]) -> list[str]:
        keep = set(in_use) | {self.key_id}
        with self._lock:
            gone = [kid for kid in self._keys if kid not in keep]
            for kid in gone:
                try:
                    self._keys[kid].destroy()
                except PKCS11Error as exc:
                    raise KekError(f"pkcs11: cannot destroy old root {kid}: {exc!r}") from None
            self._load()
        return gone

    def close(self) -> None:
        with self._lock:
            try:
                self._session.close()
            except PKCS11Error:
                pass
