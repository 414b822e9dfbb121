"""listener.py against the real kernel: queued connections are served at a shutdown, later ones refused."""

from __future__ import annotations

import asyncio
import errno
import select
import socket

from proxy.frontend.listener import queued, quiesce


async def test_a_listener_closes_serving_what_was_queued_and_refusing_what_came_after() -> None:
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # Connected while the loop is busy (these connects block it): complete, queued, not accepted.
    early = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
    late = socket.socket()
    try:
        assert queued(server.sockets[0]) == 5
        assert await quiesce(server.sockets) == 0   # the loop has accepted all five
        late.setblocking(False)
        late.connect_ex(("127.0.0.1", port))
        # Its handshake is dropped at the listener: not connected, though the listener is still open.
        assert select.select([], [late], [], 0.3)[1] == []
        server.close()
        await server.wait_closed()
        for client in early:   # served, not reset by the close
            assert client.recv(5) == b"hello"
        # Its SYN, retried once the listener is gone, is refused: it never sent a byte.
        assert select.select([], [late], [], 5)[1] == [late]
        assert late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
    finally:
        for client in (*early, late):
            client.close()
