"""An aiohttp TCPSite that gives a TLS client `handshake_timeout_s` to finish its handshake, as gRPC's door does.

aiohttp's TCPSite takes no handshake deadline, so asyncio's default (60 s) held a connection that never
started one twice as long as every other read deadline (`server.read_timeout_s`, 30 s by default); the
header deadline of http_guard starts only after the handshake. `start` is TCPSite's own plus
`ssl_handshake_timeout`; the private attributes it reads are in http_guard's AIOHTTP_INTERNALS, checked
when a site is made.
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from .http_guard import check_aiohttp_internals


class TlsSite(web.TCPSite):
    """A TCPSite over `ssl_context` whose handshakes end at `handshake_timeout_s`."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *, ssl_context: ssl.SSLContext,
                 handshake_timeout_s: float, reuse_port: bool | None = None) -> None:
        check_aiohttp_internals()   # fail at start, in one line, rather than on the first connection
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        self.handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with its runner, as TCPSite.start does first
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self.handshake_timeout_s)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def listener_site(runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None, handshake_timeout_s: float,
         reuse_port: bool | None = None) -> web.TCPSite:
    """A TlsSite over `ssl_context`, else aiohttp's plain TCPSite."""
    if ssl_context is None:
        return web.TCPSite(runner, host, port, reuse_port=reuse_port)
    return TlsSite(runner, host, port, ssl_context=ssl_context, handshake_timeout_s=handshake_timeout_s,
                   reuse_port=reuse_port)
