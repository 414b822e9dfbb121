"""context.py: the client address as every door records it and every step reads it."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.context import client_address, client_ip_text


@pytest.mark.parametrize(("peer", "recorded", "read"), [
    ("::ffff:10.0.0.5", "10.0.0.5", "10.0.0.5"),   # an IPv4 client of a dual-stack ("::") listener
    ("10.0.0.5", "10.0.0.5", "10.0.0.5"),
    ("::1", "::1", "::1"),
    ("2001:db8::1", "2001:db8::1", "2001:db8::1"),
    ("", "", None),                                 # no peer (a Unix socket, a closed transport)
])
def test_an_ipv4_mapped_peer_is_recorded_and_read_as_the_ipv4_address(peer: str, recorded: str,
                                                                       read: str | None) -> None:
    assert client_ip_text(peer) == recorded
    assert client_address(peer) == (ipaddress.ip_address(read) if read else None)
