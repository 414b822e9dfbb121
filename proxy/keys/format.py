"""API key format: `sgk_<key_id>_<secret>_<check>`, generated, parsed and checksummed."""

from __future__ import annotations

import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

PREFIX = "sgk_"
KEY_ID_LEN = 12             # lowercase base32, 60 random bits: the public identifier
SECRET_BYTES = 32           # 256 random bits
SECRET_LEN = 43             # base64url of 32 bytes, no padding
CHECK_LEN = 6               # base62 of CRC32 (62**6 > 2**32, so the full CRC fits)
TOKEN_LEN = len(PREFIX) + KEY_ID_LEN + 1 + SECRET_LEN + 1 + CHECK_LEN  # 67

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62_INDEX = {c: i for i, c in enumerate(_B62)}

# base64url may itself contain "_", so fields are located by fixed width, never by split.
_TOKEN_RE = re.compile(
    rf"{PREFIX}(?P<key_id>[a-z2-7]{{{KEY_ID_LEN}}})_"
    rf"(?P<secret>[A-Za-z0-9_-]{{{SECRET_LEN}}})_"
    rf"(?P<check>[0-9A-Za-z]{{{CHECK_LEN}}})",
    re.ASCII,
)


class KeyFormatError(ValueError):
    """A token that is not a well-formed seekgate key; `reason` is malformed | bad_checksum."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A token that passed the format and checksum checks; its secret is not yet verified."""

    key_id: str
    token: str

    def __repr__(self) -> str:
        # Keep the secret out of logs and tracebacks.
        return f"ParsedKey(key_id={self.key_id!r}, token='<redacted>')"


def _checksum(body: str) -> str:
    """Base62 of CRC32 over everything before the check, fixed width.

    CRC32 catches every burst error up to 32 bits, so any single-character typo in
    the body changes it; base62 keeps all 32 bits in 6 characters, and the fixed-width
    encoding is one-to-one, so a typo in the check itself is caught too.
    """
    n = zlib.crc32(body.encode("ascii"))
    out = []
    for _ in range(CHECK_LEN):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def _random_key_id() -> str:
    bits = secrets.randbits(5 * KEY_ID_LEN)
    return "".join(_B32[(bits >> (5 * i)) & 31] for i in range(KEY_ID_LEN))


def generate_key() -> tuple[str, str]:
    """Make a new key; returns (key_id, full_token). The token is shown once and never stored."""
    key_id = _random_key_id()
    secret = secrets.token_urlsafe(SECRET_BYTES)  # 32 bytes -> 43 chars, unpadded
    body = f"{PREFIX}{key_id}_{secret}_"
    return key_id, body + _checksum(body)


def parse_key(token: str) -> ParsedKey:
    """Check a token's shape and checksum without touching the store.

    Raises KeyFormatError("malformed") or KeyFormatError("bad_checksum"), and nothing
    else, whatever the input.
    """
    if not isinstance(token, str) or len(token) != TOKEN_LEN:
        raise KeyFormatError("malformed")
    m = _TOKEN_RE.fullmatch(token)
    if m is None:
        raise KeyFormatError("malformed")
    body = token[: TOKEN_LEN - CHECK_LEN]
    # Not secret-dependent in a useful way (CRC is public), but compare in constant time anyway.
    if not hmac.compare_digest(_checksum(body), m["check"]):
        raise KeyFormatError("bad_checksum")
    return ParsedKey(key_id=m["key_id"], token=token)


def key_prefix_and_last4(token: str) -> tuple[str, str]:
    """The parts safe to show in listings: (`sgk_<key_id>`, last four characters)."""
    parsed = parse_key(token)
    return PREFIX + parsed.key_id, parsed.token[-4:]
