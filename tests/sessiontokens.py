"""Hand-built JWTs for the attack tests: every header and claim under the test's control."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def attack_tokens(key: Ed25519PrivateKey, kid: str, good: dict[str, Any], now: int) -> dict[str, str]:
    """name -> token: each must be refused. `good` are the claims of a valid token at `now`."""
    ed = key.sign
    hdr = {"alg": "EdDSA", "typ": "JWT", "kid": kid}
    pub_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def claims(**kw: Any) -> dict[str, Any]:
        c = {**good, **kw}
        return {k: v for k, v in c.items() if v is not _DROP}

    tokens = {
        "alg_none": raw_token({**hdr, "alg": "none"}, good, lambda _: b""),
        "alg_None": raw_token({**hdr, "alg": "None"}, good, lambda _: b""),
        "alg_none_no_sig": raw_token({**hdr, "alg": "none"}, good, lambda _: b"").rsplit(".", 1)[0] + ".",
        "hs256_with_public_key": raw_token({**hdr, "alg": "HS256"}, good,
                                           lambda m: hmac.new(pub_pem, m, hashlib.sha256).digest()),
        "missing_exp": raw_token(hdr, claims(exp=_DROP), ed),
        "expired": raw_token(hdr, claims(iat=now - 1000, nbf=now - 1000, exp=now - 100), ed),
        "future_nbf": raw_token(hdr, claims(nbf=now + 600, exp=now + 900), ed),
        "future_iat": raw_token(hdr, claims(iat=now + 600, nbf=now + 600, exp=now + 900), ed),
        "lifetime_over_max": raw_token(hdr, claims(exp=good["iat"] + 901), ed),
        "exp_as_string": raw_token(hdr, claims(exp=str(good["exp"])), ed),
        "wrong_iss": raw_token(hdr, claims(iss="evil"), ed),
        "lookalike_iss": raw_token(hdr, claims(iss=good["iss"] + " "), ed),
        "cyrillic_iss": raw_token(hdr, claims(iss=good["iss"].replace("e", "\u0435")), ed),
        "wrong_aud": raw_token(hdr, claims(aud="other"), ed),
        "lookalike_aud": raw_token(hdr, claims(aud=good["aud"].upper()), ed),
        "aud_list": raw_token(hdr, claims(aud=[good["aud"], "other"]), ed),
        "missing_jti": raw_token(hdr, claims(jti=_DROP), ed),
        "missing_parent": raw_token(hdr, claims(parent=_DROP), ed),
        "missing_roles": raw_token(hdr, claims(roles=_DROP), ed),
        "tier_not_session": raw_token(hdr, claims(tier="user"), ed),
        "unknown_kid": raw_token({**hdr, "kid": "0123456789abcdef"}, good, ed),
        "path_kid": raw_token({**hdr, "kid": "../../secrets/root.key"}, good, ed),
        "no_kid": raw_token({"alg": "EdDSA", "typ": "JWT"}, good, ed),
        "jku_header": raw_token({**hdr, "jku": "http://127.0.0.1:1/jwks.json"}, good, ed),
        "x5u_header": raw_token({**hdr, "x5u": "http://127.0.0.1:1/cert.pem"}, good, ed),
        "jwk_header": raw_token({**hdr, "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64(b"x" * 32)}}, good, ed),
        "x5c_header": raw_token({**hdr, "x5c": ["MIIB"]}, good, ed),
        "oversized": raw_token(hdr, claims(pad="A" * 3000), ed),
        "garbage": "not.a.jwt",
    }
    valid = raw_token(hdr, good, ed)
    head, body, sig = valid.split(".")
    flipped = b64(bytes([base64.urlsafe_b64decode(sig + "==")[0] ^ 1]) + base64.urlsafe_b64decode(sig + "==")[1:])
    tokens["tampered_signature"] = f"{head}.{body}.{flipped}"
    tokens["tampered_claims"] = f"{head}.{b64(json.dumps(claims(roles=['admin'])).encode())}.{sig}"
    other = Ed25519PrivateKey.generate()
    tokens["signed_by_another_key"] = raw_token(hdr, good, other.sign)
    return tokens


class _Drop:
    pass


_DROP: Any = _Drop()
