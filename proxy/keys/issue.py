"""Key issuance shared by the CLI and the admin API: validate, bound by the parent, store the hash."""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Final, Literal

from proxy.keys.format import generate_key, key_prefix_and_last4
from proxy.keys.hashing import hash_secret, pepper_version
from proxy.quotas import parse_limits
from proxy.store import KeyRecord, KeyStore

DAY = 86400.0
ISSUABLE_TIERS = ("app", "device", "user")
# Rotation periods from the design article: long-lived app keys, shorter user keys.
DEFAULT_EXPIRY_S = {"app": 365 * DAY, "user": 90 * DAY}
# Passed as expires_in_s to mean "the tier's default" (None means "never expires").
TIER_DEFAULT: Final = "default"
ExpiresIn = float | None | Literal["default"]

MAX_TEXT = 200
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]*", re.ASCII)   # roles, label keys, models
_KEY_ID_RE = re.compile(r"[a-z2-7]{12}", re.ASCII)
_DURATION_RE = re.compile(r"(\d+)([dhms])", re.ASCII)
_UNIT_S = {"d": DAY, "h": 3600.0, "m": 60.0, "s": 1.0}
# The longest duration accepted (a century; "never" is the word for longer). An expiry far beyond
# it, stored, was past what a date can show (year 9999), so every key listing failed from then on.
MAX_DURATION_S = 36500 * DAY


def parse_duration(text: str) -> float | None:
    """"90d" | "12h" | "30m" | "3600s" -> seconds; "never" -> None. ValueError otherwise."""
    spec = str(text).strip().lower()
    if spec == "never":
        return None
    m = _DURATION_RE.fullmatch(spec)
    # Digits past any real duration are refused before int() (which caps a string at 4300 digits)
    # and the float product (which overflows) see them.
    digits = m[1].lstrip("0") if m is not None else ""
    if m is None or not 0 < len(digits) <= 12:
        raise ValueError(f"bad duration {text!r}: use a positive number with d, h, m or s "
                         f"(e.g. 90d, 12h, 30m, 3600s) or 'never'")
    seconds = int(digits) * _UNIT_S[m[2]]
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {text!r} is over a century (36500d): use 'never' for a key that never expires")
    return seconds


def is_key_id(text: str) -> bool:
    """Whether `text` has the shape of a key id (so lookups of junk never reach the store)."""
    return isinstance(text, str) and _KEY_ID_RE.fullmatch(text) is not None


def iso_utc(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    try:
        return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        # Past what a date can show: stored before durations were capped (MAX_DURATION_S), or by hand. Shown
        # as the calendar's end, not a 500 on every key listing that includes it.
        return "9999-12-31T23:59:59Z" if epoch > 0 else "0001-01-01T00:00:00Z"


def key_status(rec: KeyRecord, now: float) -> str:
    if rec.revoked_at is not None:
        return "revoked"
    if rec.expires_at is not None and now >= rec.expires_at:
        return "expired"
    return "active"


# An audit record names at most this many changed keys (a revoked app key may have thousands of
# devices); `admin.detail` then says how many there were.
MAX_AUDITED_KEYS = 100


def audited_views(recs: Sequence[KeyRecord | None], now: float) -> dict[str, Any]:
    """key id -> public view, for an audit record's admin.before / admin.after (never a secret or hash)."""
    return {r.key_id: public_view(r, now) for r in recs[:MAX_AUDITED_KEYS] if r is not None}


def public_view(rec: KeyRecord, now: float | None = None) -> dict[str, Any]:
    """What listings show. Never the secret hash: it is built field by field on purpose."""
    return {
        "id": rec.key_id, "prefix": rec.prefix, "last4": rec.last4, "tier": rec.tier,
        "owner": rec.owner, "roles": list(rec.roles), "labels": dict(rec.labels),
        "models": list(rec.models), "allowed_cidrs": list(rec.allowed_cidrs),
        "parent_id": rec.parent_id, "successor_id": rec.successor_id, "limits": dict(rec.limits),
        "created_at": iso_utc(rec.created_at), "expires_at": iso_utc(rec.expires_at),
        "revoked_at": iso_utc(rec.revoked_at),
        "status": key_status(rec, time.time() if now is None else now),
    }


# ---------------------------------------------------------------- validation helpers

def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)   # a lone string is one name, not its characters
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or len(v) > MAX_TEXT or _NAME_RE.fullmatch(v) is None:
            raise ValueError(f"bad {what} {v!r}: use letters, digits and _ . : @ / - "
                             f"(at most {MAX_TEXT} characters)")
        if v not in out:
            out.append(v)
    return tuple(out)


def _labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (labels or {}).items():
        _names((k,), "label name")
        if not isinstance(v, str) or not v or len(v) > MAX_TEXT or not v.isprintable():
            raise ValueError(f"bad value for label {k!r}: must be a non-empty printable string "
                             f"of at most {MAX_TEXT} characters")
        out[k] = v
    return out


def _owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner.strip() or len(owner) > MAX_TEXT \
            or not owner.isprintable():
        raise ValueError(f"owner (name) must be a non-empty printable string of at most "
                         f"{MAX_TEXT} characters")
    return owner.strip()


def parse_cidrs(cidrs: Iterable[str]) -> tuple[str, ...]:
    """Validate and normalise CIDRs; a bare address means that one host."""
    if isinstance(cidrs, str):
        cidrs = (cidrs,)
    out: list[str] = []
    for c in cidrs:
        try:
            net = ipaddress.ip_network(str(c).strip(), strict=True)
        except ValueError as exc:
            # strict: "10.1.2.3/8" is refused rather than silently widened to 10.0.0.0/8.
            raise ValueError(f"bad CIDR {c!r}: {exc}") from None
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def _within(child: str, parents: tuple[str, ...]) -> bool:
    net = ipaddress.ip_network(child)
    for p in parents:
        pnet = ipaddress.ip_network(p, strict=False)
        if net.version == pnet.version and net.subnet_of(pnet):  # type: ignore[arg-type]
            return True
    return False


def _expiry(expires_in_s: ExpiresIn, now: float, tier: str) -> float | None:
    if expires_in_s == TIER_DEFAULT:
        return now + DEFAULT_EXPIRY_S[tier] if tier in DEFAULT_EXPIRY_S else None
    if expires_in_s is None:
        return None
    if isinstance(expires_in_s, bool) or not isinstance(expires_in_s, (int, float)) \
            or not math.isfinite(expires_in_s) or expires_in_s <= 0:
        raise ValueError(f"expiry must be a positive number of seconds, got {expires_in_s!r}")
    return now + float(expires_in_s)


async def _live_parent(store: KeyStore, parent_id: str, now: float) -> KeyRecord:
    """The parent app key, refused unless it and every ancestor are unrevoked and unexpired."""
    chain = await store.get_chain(parent_id) if is_key_id(parent_id) else []
    if not chain:
        raise ValueError(f"parent key {parent_id!r} not found")
    parent = chain[0]
    if parent.tier != "app":
        raise ValueError(f"a device key's parent must be an app key; {parent_id} is a "
                         f"{parent.tier} key")
    for rec in chain:
        status = key_status(rec, now)
        if status != "active":
            raise ValueError(f"parent key {parent_id} is {status}" if rec is parent
                             else f"an ancestor of parent key {parent_id} is {status}")
    return parent


# ---------------------------------------------------------------- issuance

async def issue_key(store: KeyStore, pepper: bytes, *, tier: str, owner: str | None,
                    roles: Iterable[str] = (), labels: Mapping[str, str] | None = None,
                    models: Iterable[str] = (), allowed_cidrs: Iterable[str] = (),
                    parent_id: str | None = None, expires_in_s: ExpiresIn = TIER_DEFAULT,
                    limits: Mapping[str, int] | None = None, now: float) -> tuple[KeyRecord, str]:
    """Create and store a key (as `new_key` makes it); returns (record, plaintext token). The token is shown once."""
    rec, token = await new_key(store, pepper, tier=tier, owner=owner, roles=roles, labels=labels, models=models,
                               allowed_cidrs=allowed_cidrs, parent_id=parent_id, expires_in_s=expires_in_s,
                               limits=limits, now=now)
    await store.create_key(rec)
    return rec, token


async def new_key(store: KeyStore, pepper: bytes, *, tier: str, owner: str | None,
                  roles: Iterable[str] = (), labels: Mapping[str, str] | None = None,
                  models: Iterable[str] = (), allowed_cidrs: Iterable[str] = (),
                  parent_id: str | None = None, expires_in_s: ExpiresIn = TIER_DEFAULT,
                  limits: Mapping[str, int] | None = None, now: float) -> tuple[KeyRecord, str]:
    """A key validated and made, not stored yet (the store only reads a device's parent); (record, token).

    `expires_in_s`: seconds from `now`, None for never, TIER_DEFAULT for the tier's
    default (app 365 days, user 90 days, device its parent's expiry). A device key
    lives inside its parent app key's bounds: CIDRs, models and roles are inherited
    when not given and must lie within the parent's when given; its labels extend the
    parent's; its expiry is clamped to the parent's. `owner` None: a device takes its
    parent's owner, any other key its own key id. Raises ValueError on bad input.
    """
    if tier == "session":
        raise ValueError("session tokens are minted from a user or app key, not issued here")
    if tier not in ISSUABLE_TIERS:
        raise ValueError(f"tier must be one of {', '.join(ISSUABLE_TIERS)}, got {tier!r}")
    owner = None if owner is None else _owner(owner)
    role_t, model_t = _names(roles, "role"), _names(models, "model")
    label_d, cidr_t = _labels(labels), parse_cidrs(allowed_cidrs)
    expires_at = _expiry(expires_in_s, now, tier)
    # Only what is given is stored: unset limits follow the tier's defaults in config. A device
    # key needs no bound by its parent here: the parent's limits bind its requests anyway.
    limit_d = parse_limits(limits)

    if tier != "device":
        if parent_id is not None:
            raise ValueError(f"{tier} keys have no parent (only device keys do)")
    else:
        if not parent_id:
            raise ValueError("a device key needs a parent app key (parent_id)")
        parent = await _live_parent(store, parent_id, now)
        owner = parent.owner if owner is None else owner
        role_t, model_t, label_d, cidr_t = _bound_by_parent(parent, role_t, model_t, label_d,
                                                             cidr_t)
        if expires_in_s == TIER_DEFAULT:
            expires_at = parent.expires_at if parent.expires_at is not None \
                else now + DEFAULT_EXPIRY_S["app"]
        elif parent.expires_at is not None:
            # Never outlive the parent: "never" or too long becomes the parent's expiry.
            expires_at = parent.expires_at if expires_at is None \
                else min(expires_at, parent.expires_at)

    key_id, token = generate_key()
    prefix, last4 = key_prefix_and_last4(token)
    rec = KeyRecord(key_id=key_id, secret_hash=hash_secret(pepper, token), tier=tier,
                    pepper_version=pepper_version(pepper),
                    owner=key_id if owner is None else owner, roles=role_t, labels=label_d, models=model_t,
                    allowed_cidrs=cidr_t, limits=limit_d, parent_id=parent_id if tier == "device" else None,
                    prefix=prefix, last4=last4, created_at=now, expires_at=expires_at)
    return rec, token


def _bound_by_parent(parent: KeyRecord, roles: tuple[str, ...], models: tuple[str, ...],
                     labels: dict[str, str], cidrs: tuple[str, ...]
                     ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str], tuple[str, ...]]:
    """A device never reaches past its app key: inherit what is unset, refuse what is wider."""
    pid = parent.key_id
    if not roles:
        roles = parent.roles
    elif extra := [r for r in roles if r not in parent.roles]:
        raise ValueError(f"roles {extra} are not held by parent key {pid}")
    if not models:
        models = parent.models
    elif parent.models and (extra := [m for m in models if m not in parent.models]):
        raise ValueError(f"models {extra} are outside parent key {pid}'s models")
    if not cidrs:
        cidrs = parent.allowed_cidrs
    elif parent.allowed_cidrs and (extra := [c for c in cidrs
                                             if not _within(c, parent.allowed_cidrs)]):
        raise ValueError(f"CIDRs {extra} are outside parent key {pid}'s allowed CIDRs")
    # Labels feed policy conditions, so a device may add labels but not change one.
    clash = [k for k, v in labels.items() if k in parent.labels and parent.labels[k] != v]
    if clash:
        raise ValueError(f"labels {clash} conflict with parent key {pid}'s labels")
    return roles, models, {**parent.labels, **labels}, cidrs
