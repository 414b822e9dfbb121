"""Plain data passed along the request path: Principal, Resource, RequestContext."""

from __future__ import annotations

import ipaddress
import itertools
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Request and event ids: unique, not secret. A random per-process prefix and a counter cost
# nothing per request, where uuid4's getrandom call took ~9 us on a loaded VM.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


@lru_cache(maxsize=4096)   # clients repeat; ipaddress parsing is ~10 us a call
def client_address(client_ip: str) -> IPAddress | None:
    """A request's client address as an address (None: not one), an IPv4 client of a dual-stack socket
    (::ffff:a.b.c.d) as the IPv4 address it is: key CIDRs, policy rules and limits are written in IPv4."""
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@lru_cache(maxsize=4096)   # on every request's path: one lookup, not a parse check and a str() each time
def client_ip_text(peer_host: str) -> str:
    """The client address a door records (audit, logs): an IPv4 client of a dual-stack ("::") listener,
    which the socket reports as ::ffff:a.b.c.d, as a.b.c.d, so that an audit search for it finds it."""
    addr = client_address(peer_host)
    return str(addr) if isinstance(addr, ipaddress.IPv4Address) else peer_host


def new_id() -> str:
    """32 hex digits like uuid4().hex, unique across processes (64 random bits + a 64-bit counter)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as established by `authn`. Policies read these attributes."""

    key_id: str
    tier: str                      # app | device | user | session
    owner: str
    roles: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()   # models the key may use; () means any
    parents: tuple[str, ...] = ()  # ancestor key ids, nearest first
    # (key id, tier, limits the key sets itself) for the key, then each ancestor: the limit
    # step fills in the tier defaults, and every entry binds the request.
    limits: tuple[tuple[str, str, dict[str, int]], ...] = ()


@dataclass(frozen=True, slots=True)
class Resource:
    """What a route touches, as decided by `classify`."""

    resource: str                  # model:<name> | server | repository | sharedmemory | ...
    action: str                    # infer | read | admin | health
    model: str | None = None
    public: bool = False           # health probes: no credential required
    stream: bool = False           # generate_stream / ModelStreamInfer
    api: str = "kserve"            # kserve (Triton's own protocol) | openai (/v1); policies may test it


@dataclass(frozen=True, slots=True)
class PeerCert:
    """The client certificate of an mTLS connection: policies read its identities, audit its fingerprint."""

    fingerprint: str               # SHA-256 of the DER certificate, hex
    subject: str                   # RFC 4514, e.g. "CN=billing,O=example"
    sans: tuple[str, ...] = ()     # subject alternative names: URIs (SPIFFE ids), DNS names, IPs, emails

    def identities(self) -> tuple[str, ...]:
        """What a policy's environment.client_certs may name: the subject or any SAN."""
        return (self.subject, *self.sans)


@dataclass(slots=True)
class RequestContext:
    """One per request; every step fills in its part, audit reads all of it."""

    request_id: str
    client_ip: str
    protocol: str = "http"         # http | grpc | openai (the OpenAI API on the HTTP port)
    method: str = ""
    path: str = ""
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    principal: Principal | None = None
    resource: Resource | None = None
    status: str = "allowed"        # allowed | denied | error
    http_status: int = 0
    reason: str = ""
    rule: str = ""
    upstream_ms: float | None = None
    never_sent: bool = False       # no connection to Triton was made: the request ran nowhere, nothing is charged
    input_tokens: int | None = None
    output_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    peer_cert: PeerCert | None = None   # mTLS: the verified client certificate
    limit_grant: Any = None        # the limits.Grant of an admitted request; finish settles it

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0
