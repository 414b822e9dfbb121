"""Failed sign-ins per client address: a source that keeps presenting bad credentials is turned away early.

Keys are 256-bit secrets, so guessing one is hopeless; what a flood of bad credentials does cost is
a store read and an HMAC each (only verified credentials are cached: keys/cache.py), on the one
database every replica shares. So each client address gets a token bucket of `burst` failures,
refilled at `per_minute`. Once it is empty, a credential this process has not seen succeed is
refused with 429 and a Retry-After, before any store read, until the bucket refills.

A credential seen to succeed before (its keyed digest is remembered, the least recently used
forgotten past `max_verified`) is checked as usual, store read included, whatever its address's
bucket says: an address a bad client shares with good ones (a NAT, or a load balancer in front of
seekgate, which counts the peer address and never X-Forwarded-For) keeps serving the keys the good
ones already use, though the key cache empties on every key change and after its short TTL. One
that then fails (revoked, expired) is forgotten.

Addresses in `unlimited` (auth.sign_in_unlimited: loopback by default) are not counted: behind a
proxy or TLS terminator every client has the proxy's address, and a guesser would lock every new
client out. Name such a proxy there, or better, let it reach seekgate from where clients' own
addresses are seen.

IPv6 sources are counted per /64, the smallest block one host is usually given: counting single
addresses would let one host spread its tries over 2^64 of them.

Per process: each worker and each replica counts its own (a shared counter would put a Redis
round trip on every failure for a limit that only has to be coarse). Memory is bounded: at most
`max_sources` addresses are tracked, the one whose last failure is oldest dropped first.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..context import client_address
from ..errors import RateLimited
from ..settings import AuthSettings, parse_networks

# At most ~25 MB and ~15 MB (tracemalloc, CPython 3.11, both full).
MAX_SOURCES = 100_000
MAX_VERIFIED = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float   # failures this source may still make
    at: float       # when `tokens` was last brought up to date


def source_of(client_ip: str) -> str:
    """The key a client address is counted under: itself, its /64 for IPv6, the text as given if unparsable."""
    addr = client_address(client_ip)
    if addr is None:
        return client_ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class SignInGuard:
    """Token buckets of failed sign-ins by source (see the module docstring)."""

    def __init__(self, per_minute: float, burst: int, unlimited: str = "", max_sources: int = MAX_SOURCES,
                 max_verified: int = MAX_VERIFIED, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0 or burst < 1 or max_sources < 1 or max_verified < 1:
            raise ValueError("sign-in guard: per_minute > 0, burst >= 1, max_sources and max_verified >= 1")
        self.rate_s, self.burst = per_minute / 60.0, burst
        self.max_sources, self.max_verified = max_sources, max_verified
        self._clock = clock
        self._unlimited = parse_networks(unlimited)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()   # least recently failed first
        # Keyed digests of credentials seen to succeed (never the tokens): a memory dump yields nothing to replay.
        self._mac_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()   # least recently used first

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> SignInGuard | None:
        """None when auth.sign_in_failures_per_min is 0 (no limit)."""
        if auth.sign_in_failures_per_min <= 0:
            return None
        return cls(auth.sign_in_failures_per_min, auth.sign_in_failure_burst, auth.sign_in_unlimited)

    def check(self, client_ip: str, token: str) -> None:
        """Raises RateLimited while `client_ip`'s failures are spent, unless `token` succeeded before."""
        bucket = self._buckets.get(source_of(client_ip))
        if bucket is None or self._digest(token) in self._verified:
            return
        tokens = self._refilled(bucket)
        if tokens < 1:
            wait = math.ceil((1 - tokens) / self.rate_s)
            raise RateLimited("sign_in_failures", public_message="too many failed sign-ins from this address",
                              retry_after=max(1, wait))

    def succeeded(self, token: str) -> None:
        """`token` was verified: remembered, so its address's failures never hold it up."""
        digest = self._digest(token)
        self._verified[digest] = None
        self._verified.move_to_end(digest)
        while len(self._verified) > self.max_verified:
            self._verified.popitem(last=False)

    def failed(self, client_ip: str, token: str) -> None:
        """Counts one failed sign-in from `client_ip`; `token` is no longer one that succeeded."""
        self._verified.pop(self._digest(token), None)
        if self._is_unlimited(client_ip):
            return
        source = source_of(client_ip)
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), self._clock())
            while len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
        bucket.tokens, bucket.at = self._refilled(bucket) - 1, self._clock()
        self._buckets[source] = bucket   # now the most recent

    def tracked(self) -> tuple[int, int]:
        """(sources with failures, credentials remembered as verified)."""
        return len(self._buckets), len(self._verified)

    def _is_unlimited(self, client_ip: str) -> bool:
        addr = client_address(client_ip)
        return addr is not None and any(addr in net for net in self._unlimited)

    def _digest(self, token: str) -> bytes:
        # 16 bytes: collisions among 100,000 remembered credentials are out of reach (and one would only
        # spare a guess the refusal, not let it in: the store still decides).
        return hashlib.blake2b(token.encode(), key=self._mac_key, digest_size=16).digest()

    def _refilled(self, bucket: _Bucket) -> float:
        return min(float(self.burst), bucket.tokens + (self._clock() - bucket.at) * self.rate_s)
