"""The listening sockets: "::" bound dual-stack, and closed without resetting the connections queued on them.

`server.host: "::"` means every address, IPv4 included, as it does for grpc (dual-stack) and for nginx or
Envoy with ipv6only off. asyncio's create_server (uvloop's too) sets IPV6_V6ONLY on every IPv6 socket, so
bound by it "::" took IPv6 clients only. `listen_on` binds it here instead, one IPv6 socket with
IPV6_V6ONLY off, which the HTTP sites and the gRPC TLS listener hand to create_server. An IPv4 client then
arrives as ::ffff:a.b.c.d; context.client_ip_text records it as a.b.c.d.

Closing: the kernel completes TCP handshakes on its own and queues the connections until the server
accepts them. Closing the listener resets every connection still in that queue: a client that
connected in the last moments before a shutdown sends its request and gets ECONNRESET, not
knowing whether it was served. So before the listener closes:

1. `stop_taking`: new handshakes are dropped at the socket (a one-instruction BPF filter,
   Linux). Such a client retries its SYN about a second later and, the listener gone by then,
   is refused before it sends anything: a clean, retryable failure.
2. The event loop accepts what was queued already, until the queue is empty: those connections
   are served (told `Connection: close` while draining) instead of reset. A client may not have
   sent its request yet: http_guard's handler waits for it (FIRST_REQUEST_GRACE_S) where aiohttp's
   shutdown would close the connection as idle.

Where the kernel cannot filter (not Linux), the listener closes as it always did.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_EVERY_PACKET = struct.pack("HBBI", 0x06, 0, 0, 0)   # BPF_RET|BPF_K 0: keep no byte of any packet
_TCP_INFO_SIZE = 104
_TCPI_UNACKED = 24   # struct tcp_info's tcpi_unacked: on a listening socket, connections awaiting accept()


class ListeningSocket(Protocol):
    """What asyncio's and uvloop's Server.sockets hand out (TransportSocket, PseudoSocket)."""

    def setsockopt(self, level: int, option: int, value: Any) -> None: ...
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def dual_stack(host: str | None) -> bool:
    """`host` is IPv6's any address ("::", however spelt): bound as one socket taking IPv4 clients too."""
    if host is None:   # asyncio's every interface: a socket of each family already
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:   # a name: asyncio resolves it and binds each address it gets, as asked
        return False
    return ip.version == 6 and ip.is_unspecified


def listen_on(host: str | None, port: int, reuse_port: bool = False) -> dict[str, Any]:
    """create_server's where-to-listen arguments: `host` and `port`, or for "::" a dual-stack socket of ours.

    `reuse_port`: SO_REUSEPORT, for the workers of `serve --workers` sharing one port.
    """
    if not dual_stack(host):
        return {"host": host, "port": port, "reuse_port": reuse_port or None}
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        # What create_server sets on a socket it makes (a restart binds while old connections sit in
        # TIME_WAIT), except IPV6_V6ONLY, off here whatever net.ipv6.bindv6only says.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return {"sock": sock}


@contextmanager
def closed_unless_served(where: dict[str, Any]) -> Iterator[None]:
    """Around create_server(**where): a socket listen_on made ("::") is closed if no server takes it."""
    try:
        yield
    except BaseException:
        if "sock" in where:
            where["sock"].close()
        raise


def stop_taking(sock: ListeningSocket) -> bool:
    """Drops every new handshake at `sock`; False where this kernel cannot (nothing changed then)."""
    code = ctypes.create_string_buffer(_DROP_EVERY_PACKET)   # the kernel copies it during the call
    program = struct.pack("HL", 1, ctypes.addressof(code))    # struct sock_fprog {len, *filter}
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except (OSError, AttributeError):
        return False
    return True


def queued(sock: ListeningSocket) -> int:
    """Connections the kernel has completed on `sock` that nobody has accepted yet (Linux)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    return int(struct.unpack_from("I", info, _TCPI_UNACKED)[0])


async def quiesce(sockets: Iterable[ListeningSocket], timeout_s: float = 1.0) -> int:
    """Stop new handshakes, then wait (at most `timeout_s`) until the loop has accepted the queued ones.

    Returns how many were still queued when the wait ended (0: closing now resets nobody).
    """
    taking = [s for s in sockets if stop_taking(s)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            waiting = sum(queued(s) for s in taking)
        except OSError:
            return 0   # no TCP_INFO here: nothing to wait for that we could see
        if waiting == 0 or loop.time() >= deadline:
            return waiting
        await asyncio.sleep(0.005)   # the loop accepts them meanwhile: the sockets are still open
