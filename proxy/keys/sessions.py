"""Session tokens: short-lived EdDSA (Ed25519) JWTs minted from a user or app key, and their strict verifier.

Every choice an attacker could steer is fixed here rather than read from the token:
the algorithm is EdDSA only; `kid` is a lookup in the in-memory key set, never a
path or URL; headers that point elsewhere for a key (jku, x5u, jwk, x5c) or ask
for extensions (crit) are refused; every claim is required; lifetimes are capped.
Times are checked against the caller's `now`, so tests drive a clock, not sleeps.

Signing keys rotate (`rotate_signing_key`): the newest key signs at once, and an older
one keeps verifying until every token it signed has expired (the session TTL plus a
leeway after its successor appeared), then `retire_signing_keys` drops it for good.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from proxy.context import Principal
from proxy.errors import Unauthenticated
from proxy.keys.envelope import Envelope

ALGORITHM = "EdDSA"                  # pinned: the only algorithm verify() accepts
MAX_TTL_S = 900                      # 15 minutes, from the design article; settings may only lower it
MAX_TOKEN_CHARS = 2048               # ours are ~450; anything much larger is not ours
CLOCK_SKEW_S = 5                     # tolerated for nbf/iat only (replicas' clocks); never for exp
MINTING_TIERS = ("user", "app")      # sessions cannot mint sessions; device keys stay with their app
REQUIRED_CLAIMS = ("iss", "aud", "sub", "jti", "iat", "nbf", "exp", "tier", "roles", "parent")
SIGNING_KEY_PREFIX = "jwt-signing/"  # envelope secret names: jwt-signing/<kid>
_ALLOWED_HEADERS = frozenset({"alg", "typ", "kid"})
_KID_RE = re.compile(r"[0-9a-f]{16}", re.ASCII)
_JTI_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
_KEY_ID_RE = re.compile(r"[a-z2-7]{12}", re.ASCII)
_BASE64URL_RE = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)


def _canonical_base64url(segment: str) -> bool:
    """Whether `segment` is unpadded base64url and the one spelling of the bytes it decodes to."""
    if len(segment) % 4 == 1 or not _BASE64URL_RE.fullmatch(segment):
        return False
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:
        return False
    return base64.urlsafe_b64encode(decoded).rstrip(b"=") == segment.encode()


def is_jti(text: str) -> bool:
    """Whether `text` has the shape of a session id (so junk never reaches the store)."""
    return isinstance(text, str) and _JTI_RE.fullmatch(text) is not None


class Revocations(Protocol):
    async def session_revoked(self, jti: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a verified token says; the parent chain is still to be checked against the store."""

    jti: str
    sub: str
    parent: str
    roles: tuple[str, ...]
    iat: int
    exp: int


@dataclass(frozen=True, slots=True)
class MintedSession:
    token: str
    jti: str
    expires_at: int


async def load_signing_keys(envelope: Envelope) -> tuple[dict[str, Ed25519PrivateKey], str]:
    """Every stored signing key (kid -> key) and the kid new tokens use, creating the first one.

    The private keys are envelope-encrypted in the store; their plaintext exists only here, in memory.
    """
    names = await envelope.names(SIGNING_KEY_PREFIX)
    if not names:
        await rotate_signing_key(envelope)
        names = await envelope.names(SIGNING_KEY_PREFIX)   # another starter may have added its own
    keys: dict[str, Ed25519PrivateKey] = {}
    for name in names:
        raw = await envelope.get(name)
        if raw is not None:   # None: retired since it was listed
            keys[name[len(SIGNING_KEY_PREFIX):]] = Ed25519PrivateKey.from_private_bytes(raw)
    return keys, names[-1][len(SIGNING_KEY_PREFIX):]   # newest signs; never retired


def _new_signing_key() -> tuple[str, bytes]:
    raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return secrets.token_hex(8), raw


async def rotate_signing_key(envelope: Envelope) -> str:
    """A new signing key, which signs every token minted from now on; returns its kid."""
    kid, raw = _new_signing_key()
    await envelope.add(SIGNING_KEY_PREFIX + kid, raw)
    return kid


def retiring(listing: list[tuple[str, float]], now: float, keep_s: float) -> list[str]:
    """The signing-key names whose every token has expired: replaced more than `keep_s` ago.

    `listing` is (name, created_at) oldest first; a key stopped signing when the next one appeared.
    """
    return [name for (name, _), (_, successor_at) in zip(listing, listing[1:], strict=False) if now >= successor_at + keep_s]


async def retire_signing_keys(envelope: Envelope, now: float, keep_s: float) -> list[str]:
    """Delete the replaced signing keys no unexpired token can name any more; returns their kids."""
    gone = []
    for name in retiring(await envelope.listing(SIGNING_KEY_PREFIX), now, keep_s):
        if await envelope.delete(name):
            gone.append(name[len(SIGNING_KEY_PREFIX):])
    return gone


class SessionAuthority:
    """Mints and verifies session tokens with an in-memory Ed25519 key set."""

    def __init__(self, keys: Mapping[str, Ed25519PrivateKey], active_kid: str, *, issuer: str,
                 audience: str, ttl_s: float, revocations: Revocations | None = None) -> None:
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"session ttl must be in (0, {MAX_TTL_S}] seconds, got {ttl_s}")
        self.replace_keys(keys, active_kid)
        self.issuer, self.audience, self.ttl_s = issuer, audience, int(ttl_s)
        self._revocations = revocations
        # Set by the keyring: reloads the key set from the store (a kid another process just made).
        self.reload: Callable[[], Awaitable[bool]] | None = None

    def replace_keys(self, keys: Mapping[str, Ed25519PrivateKey], active_kid: str) -> None:
        """Swap in a rotated key set: `active_kid` signs from now on, every kid in `keys` verifies."""
        if active_kid not in keys:
            raise ValueError(f"active kid {active_kid!r} is not in the key set")
        public: dict[str, Ed25519PublicKey] = {k: v.public_key() for k, v in keys.items()}
        # One assignment per attribute, signing key last: a mint in between uses a kid verify knows.
        self._public = public
        self._signing, self._active_kid = keys[active_kid], active_kid

    @property
    def active_kid(self) -> str:
        return self._active_kid

    @property
    def kids(self) -> list[str]:
        return sorted(self._public)

    def mint(self, parent: Principal, now: float) -> MintedSession:
        """A token for `parent`'s holder; its scope (roles) is the parent's, checked again on every use."""
        if parent.tier not in MINTING_TIERS:
            raise Unauthenticated("session_from_wrong_tier")
        iat = int(now)
        jti = secrets.token_hex(16)
        claims = {"iss": self.issuer, "aud": self.audience, "sub": parent.owner, "jti": jti,
                  "iat": iat, "nbf": iat, "exp": iat + self.ttl_s, "tier": "session",
                  "roles": list(parent.roles), "parent": parent.key_id}
        token = jwt.encode(claims, self._signing, algorithm=ALGORITHM,
                           headers={"kid": self._active_kid, "typ": "JWT"})
        return MintedSession(token=token, jti=jti, expires_at=iat + self.ttl_s)

    def verify(self, token: str, now: float) -> SessionClaims:
        """The token's claims if it is one of ours, unexpired; Unauthenticated(reason) otherwise.

        Does not consult revocation or the parent chain: authn does, on every request.
        """
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("session_token_too_large")
        if not token.isascii():   # a JWT is base64url and dots; PyJWT would choke on a lone surrogate
            raise Unauthenticated("malformed")
        segments = token.split(".")
        if len(segments) != 3 or not all(map(_canonical_base64url, segments)):
            # One spelling per token, whatever the PyJWT release: older ones accept a signature whose
            # last character has its unused low bits set, so one session had several spellings.
            raise Unauthenticated("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed") from None
        if not _ALLOWED_HEADERS.issuperset(header):
            raise Unauthenticated("session_header_refused")   # jku, x5u, jwk, x5c, crit, ...
        if header.get("alg") != ALGORITHM or header.get("typ", "JWT") != "JWT":
            raise Unauthenticated("session_bad_alg")
        kid = header.get("kid")
        public = self._public.get(kid) if isinstance(kid, str) and _KID_RE.fullmatch(kid) else None
        if public is None:
            raise Unauthenticated("session_unknown_kid")
        try:
            claims = jwt.decode(token, public, algorithms=[ALGORITHM], audience=self.audience,
                                issuer=self.issuer,
                                # Times are checked below against the caller's clock.
                                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True,
                                         "verify_aud": True, "verify_iss": True, "strict_aud": True,
                                         "verify_exp": False, "verify_nbf": False, "verify_iat": False})
        except jwt.InvalidSignatureError:
            raise Unauthenticated("session_bad_signature") from None
        except jwt.MissingRequiredClaimError:
            raise Unauthenticated("session_missing_claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise Unauthenticated("session_wrong_audience_or_issuer") from None
        except jwt.PyJWTError:
            raise Unauthenticated("malformed") from None
        return self._check_claims(claims, now)

    def _check_claims(self, c: dict[str, Any], now: float) -> SessionClaims:
        # Exact types: PyJWT checked presence; a bool or a string here is a forgery or a bug.
        if c["iss"] != self.issuer or c["aud"] != self.audience:
            raise Unauthenticated("session_wrong_audience_or_issuer")
        iat, nbf, exp = c["iat"], c["nbf"], c["exp"]
        if not all(type(t) is int for t in (iat, nbf, exp)):
            raise Unauthenticated("malformed")
        if now >= exp:
            raise Unauthenticated("session_expired")
        if nbf > now + CLOCK_SKEW_S or iat > now + CLOCK_SKEW_S:
            raise Unauthenticated("session_not_yet_valid")
        if exp - iat > MAX_TTL_S or exp <= iat or nbf < iat:
            raise Unauthenticated("session_lifetime_too_long")
        roles, parent, jti, sub = c["roles"], c["parent"], c["jti"], c["sub"]
        if c["tier"] != "session" or not isinstance(sub, str) \
                or not isinstance(roles, list) or not all(isinstance(r, str) for r in roles) \
                or not isinstance(parent, str) or not _KEY_ID_RE.fullmatch(parent) \
                or not isinstance(jti, str) or not _JTI_RE.fullmatch(jti):
            raise Unauthenticated("malformed")
        return SessionClaims(jti=jti, sub=sub, parent=parent, roles=tuple(roles), iat=iat, exp=exp)

    async def revoked(self, jti: str) -> bool:
        """Whether the session `jti` was revoked by an operator; store errors propagate (fail closed)."""
        return self._revocations is not None and await self._revocations.session_revoked(jti)
