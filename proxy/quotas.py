"""What a limit is: the fields a key, a tier or a policy rule may set, their values and their parsing.

Below every layer (settings, policies, keys and the limiter all read it); the counting is state/limits.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens")


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's limits; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    daily_tokens: int = 0
    monthly_tokens: int = 0

    def with_overrides(self, overrides: Mapping[str, int]) -> Limits:
        """These limits (a tier's defaults) with the fields a key sets itself."""
        if not overrides:   # most keys: no copy on the request path
            return self
        return replace(self, **{k: v for k, v in overrides.items() if k in LIMIT_FIELDS})

    def unlimited(self) -> bool:
        # Spelled out, not a loop over LIMIT_FIELDS: this runs for every scope of every request.
        return not (self.rpm or self.tpm or self.concurrency or self.daily_tokens or self.monthly_tokens)

    def counts_tokens(self) -> bool:
        return bool(self.tpm or self.daily_tokens or self.monthly_tokens)


# The largest limit: exact as a double (Redis's Lua numbers, JSON readers) and a PostgreSQL bigint.
LIMIT_MAX = 2**53 - 1


def parse_limits(raw: Mapping[str, Any] | None) -> dict[str, int]:
    """Validate the limits a key sets (a subset of LIMIT_FIELDS, each an int >= 0); ValueError otherwise."""
    out: dict[str, int] = {}
    for name, value in (raw or {}).items():
        if name not in LIMIT_FIELDS:
            raise ValueError(f"unknown limit {name!r}: use {', '.join(LIMIT_FIELDS)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= LIMIT_MAX:
            # (int's repr refuses more than 4300 digits)
            shown = "a number past that" if isinstance(value, int) and value > LIMIT_MAX else repr(value)[:64]
            raise ValueError(f"limit {name} must be an integer 0 or more, at most {LIMIT_MAX} (0 = unlimited), "
                             f"got {shown}")
        out[name] = value
    return out


def parse_role_caps(text: str) -> dict[str, int]:
    """"user=512,guest=64" -> {"user": 512, "guest": 64}; 0 means no cap. ValueError on bad text."""
    caps: dict[str, int] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        role, sep, value = item.partition("=")
        if not sep or not role.strip() or not value.strip().isdigit():
            raise ValueError(f"bad entry {item!r}: use role=N, comma separated")
        caps[role.strip()] = int(value)
    return caps
