"""Key-encryption-key (KEK) providers: the root that wraps data keys, behind one small interface.

A provider only wraps and unwraps data keys (DEKs); it never sees a secret itself.
A provider may hold several root generations: `key_id` names the one new wraps use,
older ones still unwrap until `retire` is told no data key needs them. `file` (the
default) keeps 32-byte roots in `<data_dir>/secrets/root.key` (generation 1) and
`root.<n>.key`; `pkcs11` (kek_pkcs11.py) and `vault` (kek_vault.py) keep them out of
this process; a cloud KMS is a new class with the same members.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .private_file import create_once

ROOT_BYTES = 32          # AES-256
NONCE_BYTES = 12         # AES-GCM's standard nonce; random per wrap (2^32 wraps is far off)
WRAP_VERSION = b"\x01"
# Associated data: a wrapped DEK cannot be passed off as any other AES-GCM blob under the root.
WRAP_AD = b"seekgate/kek-wrap/v1"
_GENERATION_RE = re.compile(r"root\.([1-9][0-9]*)\.key", re.ASCII)


class KekError(RuntimeError):
    """The KEK is missing, unsafe or wrong: seekgate refuses to start and says why."""


@runtime_checkable
class KekProvider(Protocol):
    """Wraps data keys under a root the process cannot (or should not) export."""

    key_id: str   # the root new wraps use; a wrapped DEK records which root wrapped it

    def wrap(self, dek: bytes) -> bytes:
        """`dek` wrapped under the current root (`key_id`)."""
        ...

    def unwrap(self, blob: bytes, key_id: str) -> bytes:
        """The DEK that root `key_id` wrapped; KekError when that root is unknown or the blob was altered."""
        ...

    def rewrap(self, blob: bytes, key_id: str) -> tuple[str, bytes]:
        """(current key_id, the same DEK wrapped under it), from a blob root `key_id` wrapped."""
        ...

    def rotate(self) -> str:
        """Make a new root generation current and return its key_id; older ones keep unwrapping."""
        ...

    def retire(self, in_use: Iterable[str]) -> list[str]:
        """Forget the old roots no wrapped DEK names any more; returns their ids."""
        ...

    def reload(self) -> None:
        """Re-read the root generations: another process may have rotated (or retired) one."""
        ...

    def close(self) -> None: ...


def _key_id(root: bytes) -> str:
    # A public name for the root, from a one-way function of it: reveals nothing usable.
    return "file:" + hmac.new(root, b"seekgate/kek-id", hashlib.sha256).hexdigest()[:16]


def _seal(aead: AESGCM, dek: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return WRAP_VERSION + nonce + aead.encrypt(nonce, dek, WRAP_AD)


def _open(aead: AESGCM, blob: bytes) -> bytes:
    if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != WRAP_VERSION:
        raise KekError("wrapped data key is malformed")
    try:
        return aead.decrypt(blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:], WRAP_AD)
    except InvalidTag:
        raise KekError("data key does not unwrap under this root: wrong root key, "
                       "or the stored data key was altered") from None


class FileKek:
    """Roots in 0600 files, one per generation. Use `FileKek.load_or_create(data_dir)`."""

    def __init__(self, root: bytes, older: Iterable[bytes] = (), sdir: Path | None = None) -> None:
        self._roots: dict[str, AESGCM] = {}
        self._paths: dict[str, Path] = {}
        self._sdir = sdir
        self._first = "root.key"   # generation 1's file name in _sdir
        for r in (*older, root):
            if len(r) != ROOT_BYTES:
                raise KekError(f"root key must be {ROOT_BYTES} bytes, got {len(r)}")
            self._roots[_key_id(r)] = AESGCM(r)
        self.key_id = _key_id(root)

    @classmethod
    def load_or_create(cls, data_dir: Path, stored_roots: Iterable[str] = (),
                       root_file: Path | None = None) -> FileKek:
        """Read every root generation under `<data_dir>/secrets/`, creating root.key (0600, dir 0700) on first start.

        `stored_roots`: the roots the store's wrapped DEKs name. When there are any, this is no
        first start: a missing root file is refused (KekError) rather than replaced by a new root
        that unwraps nothing. Refuses a file readable or writable by anyone but its owner: the
        mode bits are checked rather than access(2), which says yes to root anyway.

        `root_file` (crypto.root_key_file) replaces `<data_dir>/secrets/root.key`, so replicas can
        mount one secret; later generations (root.<n>.key) sit beside it. It is resolved once, since
        orchestrators mount secrets as symlinks into a versioned directory; the file itself must
        still be a private regular file.
        """
        if root_file is None:
            sdir, first = Path(data_dir) / "secrets", "root.key"
        else:
            resolved = Path(root_file).resolve()
            sdir, first = resolved.parent, resolved.name
        if not sdir.exists():
            sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(sdir, 0o700)   # mkdir's mode is masked by the umask
        if not (sdir / first).exists() and not _generations(sdir):
            wrapped_by = sorted(set(stored_roots))
            if wrapped_by:
                raise KekError(f"root key missing: {sdir / first}; the store's DEKs are wrapped by "
                               f"root {', '.join(wrapped_by)} (restore the root file from its backup)")
            create_once(sdir / first, secrets.token_bytes(ROOT_BYTES))
        kek = cls.__new__(cls)
        kek._sdir, kek._first = sdir, first
        kek._load()
        return kek

    def _load(self) -> None:
        assert self._sdir is not None
        first = self._sdir / self._first
        files = [(1, first)] if first.exists() else []
        files += _generations(self._sdir)
        if not files:
            raise KekError(f"{self._sdir}: no root key file ({self._first} or root.<n>.key)")
        roots, paths = {}, {}
        for _, path in sorted(files):
            kid = _key_id(root := _read_root(path))
            roots[kid], paths[kid] = AESGCM(root), path
        self._roots, self._paths, self.key_id = roots, paths, kid   # the highest generation wraps

    def reload(self) -> None:
        if self._sdir is not None:
            self._load()

    def wrap(self, dek: bytes) -> bytes:
        # Never wrap under a root another process has rotated away (and may have deleted).
        self.reload()
        return _seal(self._roots[self.key_id], dek)

    def unwrap(self, blob: bytes, key_id: str) -> bytes:
        if key_id not in self._roots and self._sdir is not None:
            self._load()   # another process may have rotated the root since this one started
        aead = self._roots.get(key_id)
        if aead is None:
            raise KekError(f"no root file holds root {key_id} (current root is {self.key_id})")
        return _open(aead, blob)

    def rewrap(self, blob: bytes, key_id: str) -> tuple[str, bytes]:
        return self.key_id, self.wrap(self.unwrap(blob, key_id))

    def rotate(self) -> str:
        if self._sdir is None:
            raise KekError("an in-memory root cannot be rotated")
        self._load()
        gens = _generations(self._sdir)
        nxt = max((n for n, _ in gens), default=1) + 1
        create_once(self._sdir / f"root.{nxt}.key", secrets.token_bytes(ROOT_BYTES))
        self._load()
        return self.key_id

    def retire(self, in_use: Iterable[str]) -> list[str]:
        keep = set(in_use) | {self.key_id}
        gone = [kid for kid in self._roots if kid not in keep]
        for kid in gone:
            path = self._paths.pop(kid, None)
            if path is not None:
                path.unlink(missing_ok=True)
            del self._roots[kid]
        return gone

    def close(self) -> None:
        pass


def _generations(sdir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in sdir.iterdir():
        m = _GENERATION_RE.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _read_root(path: Path) -> bytes:
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise KekError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KekError(f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are wider than 0600; "
                       f"run `chmod 600 {path}` if the file is yours")
    root = path.read_bytes()
    if len(root) != ROOT_BYTES:
        raise KekError(f"{path}: expected {ROOT_BYTES} bytes, found {len(root)}")
    return root
