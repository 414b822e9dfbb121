"""Key-encryption-key (KEK) providers: the root that wraps data keys, behind one small interface.

A provider only wraps and unwraps data keys (DEKs); it never sees a secret itself.
`file` (the default) keeps a 32-byte root in `<data_dir>/secrets/root.key`. An HSM
(PKCS#11), Vault transit or a cloud KMS is a new class with the same three members.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .private_file import create_once

ROOT_BYTES = 32          # AES-256
NONCE_BYTES = 12         # AES-GCM's standard nonce; random per wrap (2^32 wraps is far off)
_WRAP_VERSION = b"\x01"
# Associated data: a wrapped DEK cannot be passed off as any other AES-GCM blob under the root.
_WRAP_AD = b"seekgate/kek-wrap/v1"


class KekError(RuntimeError):
    """The KEK is missing, unsafe or wrong: seekgate refuses to start and says why."""


@runtime_checkable
class KekProvider(Protocol):
    """Wraps data keys under a root the process cannot (or should not) export."""

    key_id: str   # names the root, so a wrapped DEK records which root wrapped it

    def wrap(self, dek: bytes) -> bytes: ...

    def unwrap(self, blob: bytes) -> bytes:
        """The DEK; raises KekError when the blob was not wrapped by this root or was altered."""
        ...


class FileKek:
    """The root in a 0600 file. Use `FileKek.load_or_create(data_dir)`."""

    def __init__(self, root: bytes) -> None:
        if len(root) != ROOT_BYTES:
            raise KekError(f"root key must be {ROOT_BYTES} bytes, got {len(root)}")
        self._aead = AESGCM(root)
        # A public name for the root, from a one-way function of it: reveals nothing usable.
        self.key_id = "file:" + hmac.new(root, b"seekgate/kek-id", hashlib.sha256).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, data_dir: Path) -> FileKek:
        """Read `<data_dir>/secrets/root.key`, creating it (0600, dir 0700) on first start.

        Refuses (KekError) a file readable or writable by anyone but its owner: the
        mode bits are checked rather than access(2), which says yes to root anyway.
        """
        sdir = Path(data_dir) / "secrets"
        if not sdir.exists():
            sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(sdir, 0o700)   # mkdir's mode is masked by the umask
        path = sdir / "root.key"
        if not path.exists():
            create_once(path, secrets.token_bytes(ROOT_BYTES))
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise KekError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise KekError(f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are wider than 0600; "
                           f"run `chmod 600 {path}` if the file is yours")
        root = path.read_bytes()
        if len(root) != ROOT_BYTES:
            raise KekError(f"{path}: expected {ROOT_BYTES} bytes, found {len(root)}")
        return cls(root)

    def wrap(self, dek: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return _WRAP_VERSION + nonce + self._aead.encrypt(nonce, dek, _WRAP_AD)

    def unwrap(self, blob: bytes) -> bytes:
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != _WRAP_VERSION:
            raise KekError("wrapped data key is malformed")
        try:
            return self._aead.decrypt(blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:], _WRAP_AD)
        except InvalidTag:
            raise KekError("data key does not unwrap under this root: wrong root.key, "
                           "or the stored data key was altered") from None


