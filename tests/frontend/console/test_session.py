"""The console's CSRF token: bound to one session token, compared in constant time, never empty."""

from __future__ import annotations

from proxy.frontend.console.session import csrf_token, csrf_valid


def test_the_csrf_token_is_bound_to_its_session() -> None:
    a, b = "header.payload-a.sig", "header.payload-b.sig"
    assert csrf_token(a) == csrf_token(a) != csrf_token(b)
    assert csrf_valid(a, csrf_token(a))
    assert not csrf_valid(a, csrf_token(b))   # another session's token
    assert not csrf_valid(a, None) and not csrf_valid(a, "")
    assert a not in csrf_token(a) and len(csrf_token(a)) == 43   # 256 bits, base64url without padding


def test_a_forged_token_of_any_characters_is_simply_wrong() -> None:
    """compare_digest on str raises TypeError for non-ASCII; a header or cookie of non-UTF-8 bytes holds surrogates."""
    a = "header.payload-a.sig"
    for forged in ("\u00e9", "\u00e9" * 43, "\udce9", csrf_token(a)[:-1] + "\u00e9"):
        assert not csrf_valid(a, forged)
    garbled = "\udcff\udcfe"
    assert csrf_valid(garbled, csrf_token(garbled)) and not csrf_valid(garbled, csrf_token(a))
