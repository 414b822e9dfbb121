"""The console session cookie and its CSRF token: how they are written, read and checked. No I/O.

The cookie holds a session token (keys/sessions.py, at most 15 minutes) minted from the key given at
sign-in; the key itself never reaches the browser again. The CSRF token is derived from the cookie's
token, so it is bound to that one session, costs no server-side state, and a page on another origin,
which can neither read the cookie nor our pages, cannot produce it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

COOKIE = "seekgate_console"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
_CSRF_CONTEXT = b"seekgate console csrf v1"


def _utf8(text: str) -> bytes:
    # A cookie or header of bytes that are not UTF-8 reaches us with lone surrogates (surrogateescape),
    # which plain encode() refuses: any text a client sends must become bytes, never a 500.
    return text.encode("utf-8", "surrogatepass")


def csrf_token(session_token: str) -> str:
    """The CSRF token of one session: HMAC-SHA256 keyed by the session token (secret, HttpOnly)."""
    mac = hmac.new(_utf8(session_token), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def csrf_valid(session_token: str, presented: str | None) -> bool:
    # compare_digest: the comparison time says nothing about how much of a guess was right. On bytes:
    # given str it raises TypeError for any non-ASCII character, and a forged token may hold any.
    return bool(presented) and hmac.compare_digest(_utf8(csrf_token(session_token)), _utf8(presented or ""))
