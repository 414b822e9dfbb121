"""listener.py and the guarded handler against the real kernel: a shutdown serves what was queued or accepted, refuses what came after."""

from __future__ import annotations

import asyncio
import errno
import select
import socket

import pytest
from aiohttp import web

from proxy.frontend.http_guard import FIRST_REQUEST_GRACE_S, GuardedRunner
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


async def start_guarded(shutdown_timeout: float = 5.0) -> tuple[web.AppRunner, int]:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/", echo)
    runner = GuardedRunner(app, header_timeout_s=30.0, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.mark.parametrize("request_parts", [
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    # The body comes after the headers: aiohttp's shutdown would drop it (the handler then waits forever).
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", b"hello"],
], ids=["get", "post-body-later"])
async def test_a_connection_whose_request_comes_just_after_the_shutdown_began_is_served(
        request_parts: list[bytes]) -> None:
    runner, port = await start_guarded()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.sleep(0.05)   # accepted, nothing sent yet: what quiesce() hands the loop
        cleanup = asyncio.create_task(runner.cleanup())
        for part in request_parts:
            await asyncio.sleep(0.1)    # aiohttp's shutdown has closed its idle connections by now
            writer.write(part)
        answer = await asyncio.wait_for(reader.read(), 5)   # the whole answer, then the close
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello"), answer
        await asyncio.wait_for(cleanup, 5)
    finally:
        writer.close()


async def test_a_connection_that_never_sends_is_closed_after_the_grace_not_the_drain_timeout() -> None:
    runner, port = await start_guarded(shutdown_timeout=20.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(runner.cleanup(), 10)
        assert FIRST_REQUEST_GRACE_S * 0.9 <= loop.time() - started < FIRST_REQUEST_GRACE_S + 2
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
