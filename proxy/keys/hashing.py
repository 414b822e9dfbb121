"""Keyed hashing of API key secrets, and the versioned pepper that keys it (kept in the envelope).

Why HMAC-SHA256 and not PBKDF2/scrypt: keys are 256-bit random, so there is nothing
to brute-force; a slow KDF (PBKDF2 at 100k iterations, ~60 ms) would only add that
much latency to every request for no security gain. The pepper keeps a stolen
database useless without the KEK that unwraps the pepper.

Pepper rotation: peppers are envelope secrets `pepper/<version>`. Each key row records
the version its hash was made with; a row under an older version is re-hashed with
the current one the next time its key is used successfully (steps/authn.py). A new version
starts hashing only after PEPPER_PUBLISH_S, by which time every process has loaded it
(they reload every crypto.refresh_interval_s), so no process ever meets a row hashed
with a pepper it does not hold yet.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .envelope import EnvelopeError
from .private_file import create_once

if TYPE_CHECKING:
    from .envelope import Envelope

log = logging.getLogger("seekgate.keys")

PEPPER_BYTES = 32
PEPPER_PREFIX = "pepper/"       # envelope secret names: pepper/<version>
LEGACY_PEPPER_VERSION = 1       # rows made before versions existed; the migrated pepper file
PEPPER_PUBLISH_S = 10.0         # a new pepper hashes nothing until every process has had time to load it


class Pepper(bytes):
    """The current pepper (these bytes), its version, and the older versions rows may still be hashed under.

    A bytes subclass on purpose: every existing `hash_secret(pepper, token)` keeps hashing
    under the current pepper unchanged, while authn can pick the version a row names.
    """

    version: int
    _all: dict[int, bytes]

    def __new__(cls, peppers: Mapping[int, bytes], version: int) -> Pepper:
        if version not in peppers:
            raise ValueError(f"pepper version {version} is not among {sorted(peppers)}")
        for v, p in peppers.items():
            if len(p) != PEPPER_BYTES:
                raise ValueError(f"pepper version {v}: expected {PEPPER_BYTES} bytes, found {len(p)}")
        obj = super().__new__(cls, peppers[version])
        obj.version, obj._all = version, dict(peppers)
        return obj

    def for_version(self, version: int) -> bytes | None:
        """The pepper of `version`; None when this process does not hold it."""
        return self._all.get(version)

    @property
    def versions(self) -> list[int]:
        return sorted(self._all)

    def __repr__(self) -> str:   # never the bytes
        return f"Pepper(version={self.version}, versions={self.versions})"


def pepper_version(pepper: bytes) -> int:
    """The version new hashes under `pepper` record (plain bytes: the legacy version)."""
    return pepper.version if isinstance(pepper, Pepper) else LEGACY_PEPPER_VERSION


def pepper_for(pepper: bytes, version: int) -> bytes | None:
    """The pepper a row of `version` was hashed with; plain bytes answer for every version."""
    return pepper.for_version(version) if isinstance(pepper, Pepper) else pepper


def hash_secret(pepper: bytes, token: str) -> str:
    """Hex HMAC-SHA256(pepper, token): what the store keeps instead of the key."""
    return hmac.new(pepper, token.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_secret(pepper: bytes, token: str, stored_hex: str) -> bool:
    """Constant-time check of a token against a stored hash; False on any garbage."""
    computed = hash_secret(pepper, token).encode("ascii")
    try:
        stored = stored_hex.encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(computed, stored)


def legacy_pepper_path(data_dir: Path) -> Path:
    return Path(data_dir) / "secrets" / "pepper"


async def load_pepper(envelope: Envelope, data_dir: Path, now: float,
                      publish_s: float = PEPPER_PUBLISH_S) -> Pepper:
    """Every pepper version from the envelope, making the first on first start.

    A pepper file left by an older seekgate (`<data_dir>/secrets/pepper`) becomes version 1,
    and the file is deleted only once the envelope's copy has been read back and matches.
    """
    path = legacy_pepper_path(data_dir)
    first = PEPPER_PREFIX + str(LEGACY_PEPPER_VERSION)
    if path.exists():
        await _migrate_pepper_file(envelope, path, first)
    listing = await envelope.listing(PEPPER_PREFIX)
    if not listing:
        await envelope.add(first, secrets.token_bytes(PEPPER_BYTES))
        listing = await envelope.listing(PEPPER_PREFIX)
    peppers: dict[int, bytes] = {}
    published: list[int] = []
    for name, created_at in listing:
        version = int(name[len(PEPPER_PREFIX):])
        value = await envelope.get(name)
        if value is None:
            continue   # retired since it was listed
        peppers[version] = value
        if created_at <= now - publish_s:
            published.append(version)
    if not peppers:
        raise EnvelopeError("no pepper in the envelope")
    # The newest published version hashes; with none published yet (first start), the oldest.
    current = max(published) if published else min(peppers)
    return Pepper(peppers, current)


async def _migrate_pepper_file(envelope: Envelope, path: Path, name: str) -> None:
    try:
        value = path.read_bytes()   # noqa: ASYNC240  (once, at start-up)
    except FileNotFoundError:
        return   # another starter migrated it a moment ago
    if len(value) != PEPPER_BYTES:
        raise EnvelopeError(f"{path}: expected {PEPPER_BYTES} bytes, found {len(value)}")
    stored = await envelope.add(name, value)
    if stored != value or not await envelope.verify(name, value):
        raise EnvelopeError(f"{path} differs from the pepper in the key store ({name}); keys hashed "
                         f"with the file would stop working, so it is left in place: move it away "
                         f"only if the store's pepper is the right one")
    path.unlink(missing_ok=True)   # noqa: ASYNC240  (once, at start-up)
    log.info("moved the pepper file %s into the envelope as %s", path, name)


async def add_pepper_version(envelope: Envelope) -> int:
    """A new pepper version (it starts hashing after PEPPER_PUBLISH_S); returns the version."""
    versions = [int(n[len(PEPPER_PREFIX):]) for n in await envelope.names(PEPPER_PREFIX)]
    version = max(versions, default=0) + 1
    await envelope.add(PEPPER_PREFIX + str(version), secrets.token_bytes(PEPPER_BYTES))
    return version


def load_or_create_pepper(data_dir: Path) -> bytes:
    """Legacy: read `<data_dir>/secrets/pepper`, creating it (0600, dir 0700) if missing.

    seekgate itself keeps the pepper in the envelope now (`load_pepper`), and moves
    this file there on start; this remains for tools that predate that.

    Creation is race-free across processes: the pepper is written to a temp file and
    hard-linked into place, so a reader never sees a half-written file and two
    starters agree on one pepper.
    """
    sdir = Path(data_dir) / "secrets"
    if not sdir.exists():
        sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(sdir, 0o700)  # mkdir's mode is masked by the umask
    path = sdir / "pepper"
    if not path.exists():
        create_once(path, secrets.token_bytes(PEPPER_BYTES))
    pepper = path.read_bytes()
    if len(pepper) != PEPPER_BYTES:
        # Fail closed: a truncated pepper would silently invalidate (or weaken) every key.
        raise ValueError(f"{path}: expected {PEPPER_BYTES} bytes, found {len(pepper)}")
    return pepper
