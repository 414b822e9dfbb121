"""Closing a listening socket without resetting the connections the kernel queued on it.

The kernel completes TCP handshakes on its own and queues the connections until the server
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
import socket
import struct
from collections.abc import Iterable
from typing import Any, Protocol

_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_EVERY_PACKET = struct.pack("HBBI", 0x06, 0, 0, 0)   # BPF_RET|BPF_K 0: keep no byte of any packet
_TCP_INFO_SIZE = 104
_TCPI_UNACKED = 24   # struct tcp_info's tcpi_unacked: on a listening socket, connections awaiting accept()


class ListeningSocket(Protocol):
    """What asyncio's and uvloop's Server.sockets hand out (TransportSocket, PseudoSocket)."""

    def setsockopt(self, level: int, option: int, value: Any) -> None: ...
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


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
