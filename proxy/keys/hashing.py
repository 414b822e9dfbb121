"""Keyed hashing of API key secrets and the pepper that keys it.

Why HMAC-SHA256 and not PBKDF2/scrypt: keys are 256-bit random, so there is nothing
to brute-force; a slow KDF (PBKDF2 at 100k iterations, ~60 ms) would only add that
much latency to every request for no security gain. The pepper keeps a stolen
database useless without the pepper file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .private_file import create_once

PEPPER_BYTES = 32


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


def load_or_create_pepper(data_dir: Path) -> bytes:
    """Read `<data_dir>/secrets/pepper`, creating it (0600, dir 0700) if missing.

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
