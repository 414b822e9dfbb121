"""The `vault` KEK provider: data keys wrapped by a HashiCorp Vault transit key (hvac).

The root never leaves Vault. A wrapped DEK is Vault's ciphertext (`vault:v<n>:...`),
and its key_id names the transit key version that made it, so rotation is Vault's own:
`rotate` adds a key version, `rewrap` has Vault re-encrypt a DEK under the newest one
without the DEK leaving Vault, and `retire` raises the key's min_decryption_version
past versions no stored DEK needs. The token comes from the environment, never YAML.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any

import hvac
import requests
from hvac.exceptions import InvalidPath, VaultError

from .kek import KekError

_CIPHERTEXT_RE = re.compile(r"vault:v([1-9][0-9]*):[A-Za-z0-9+/=]+", re.ASCII)
_TIMEOUT_S = 10.0
_ERRORS = (VaultError, requests.RequestException)


class VaultKek:
    """A transit key in Vault; created (aes256-gcm96) on first start if the token may."""

    def __init__(self, addr: str, token: str, key_name: str, mount: str = "transit") -> None:
        self._name, self._mount = key_name, mount
        self._client = hvac.Client(url=addr, token=token, timeout=_TIMEOUT_S)
        self._transit = self._client.secrets.transit
        try:
            if not self._client.is_authenticated():
                raise KekError(f"vault: the token is not valid at {addr}")
            try:
                self._read()
            except InvalidPath:
                self._transit.create_key(key_name, key_type="aes256-gcm96", mount_point=mount)
                self._read()
        except _ERRORS as exc:
            raise KekError(f"vault: transit key {mount}/{key_name} at {addr}: {_brief(exc)}") from None

    def _read(self) -> dict[str, Any]:
        data: dict[str, Any] = self._transit.read_key(self._name, mount_point=self._mount)["data"]
        if data.get("exportable") or data.get("allow_plaintext_backup"):
            # A root Vault would hand out is no better than a file on this host.
            raise KekError(f"vault: transit key {self._mount}/{self._name} is exportable; refuse to use it")
        self.key_id = self._kid(int(data["latest_version"]))
        self._min_decryption = int(data.get("min_decryption_version", 1))
        return data

    def reload(self) -> None:
        try:
            self._read()
        except _ERRORS as exc:
            raise KekError(f"vault: reading transit key {self._mount}/{self._name}: {_brief(exc)}") from None

    def _kid(self, version: int) -> str:
        return f"vault:{self._mount}/{self._name}:v{version}"

    def _stamp(self, ciphertext: str) -> tuple[str, bytes]:
        m = _CIPHERTEXT_RE.fullmatch(ciphertext)
        if m is None:
            raise KekError("vault returned an unexpected ciphertext")
        return self._kid(int(m.group(1))), ciphertext.encode("ascii")

    def wrap(self, dek: bytes) -> bytes:
        try:
            out = self._transit.encrypt_data(self._name, base64.b64encode(dek).decode("ascii"),
                                             mount_point=self._mount)
        except _ERRORS as exc:
            raise KekError(f"vault: wrapping a data key failed: {_brief(exc)}") from None
        kid, blob = self._stamp(out["data"]["ciphertext"])
        self.key_id = kid   # rotated elsewhere? Vault wraps with its latest version
        return blob

    def _ciphertext(self, blob: bytes, key_id: str) -> str:
        try:
            text = blob.decode("ascii")
        except UnicodeDecodeError:
            raise KekError("wrapped data key is malformed") from None
        if _CIPHERTEXT_RE.fullmatch(text) is None or self._stamp(text)[0] != key_id:
            raise KekError(f"wrapped data key is malformed or not from {key_id}")
        return text

    def unwrap(self, blob: bytes, key_id: str) -> bytes:
        text = self._ciphertext(blob, key_id)
        try:
            out = self._transit.decrypt_data(self._name, text, mount_point=self._mount)
        except _ERRORS as exc:
            raise KekError(f"data key does not unwrap under {key_id}: {_brief(exc)}") from None
        return base64.b64decode(out["data"]["plaintext"])

    def rewrap(self, blob: bytes, key_id: str) -> tuple[str, bytes]:
        text = self._ciphertext(blob, key_id)
        try:
            out = self._transit.rewrap_data(self._name, text, mount_point=self._mount)
        except _ERRORS as exc:
            raise KekError(f"vault: rewrapping a data key failed: {_brief(exc)}") from None
        kid, new = self._stamp(out["data"]["ciphertext"])
        self.key_id = kid
        return kid, new

    def rotate(self) -> str:
        try:
            self._transit.rotate_key(self._name, mount_point=self._mount)
            self._read()
        except _ERRORS as exc:
            raise KekError(f"vault: rotating {self._mount}/{self._name} failed: {_brief(exc)}") from None
        return self.key_id

    def retire(self, in_use: Iterable[str]) -> list[str]:
        try:
            self._read()
            latest = int(self.key_id.rsplit(":v", 1)[1])
            used = [int(k.rsplit(":v", 1)[1]) for k in in_use if k.startswith(self._kid(0)[:-1])]
            floor = min([*used, latest])
            if floor <= self._min_decryption:
                return []
            self._transit.update_key_configuration(self._name, min_decryption_version=floor,
                                                   mount_point=self._mount)
        except _ERRORS as exc:
            raise KekError(f"vault: retiring old versions of {self._mount}/{self._name} failed: "
                           f"{_brief(exc)}") from None
        gone = [self._kid(v) for v in range(self._min_decryption, floor)]
        self._min_decryption = floor
        return gone

    def close(self) -> None:
        self._client.adapter.close()


def _brief(exc: BaseException) -> str:
    """One line: Vault's errors carry multi-line bodies."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
