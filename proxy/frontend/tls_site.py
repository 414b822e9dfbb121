"""The aiohttp site of every HTTP listener: "::" dual-stack (listener.py), TLS handshakes held to a deadline.

aiohttp's TCPSite takes no handshake deadline, so asyncio's default (60 s) held a connection that never
started one twice as long as every other read deadline (`server.read_timeout_s`, 30 s by default); the
header deadline of http_guard starts only after the handshake. Nor can it bind "::" for IPv4 clients too:
create_server sets IPV6_V6ONLY on the socket it makes. `start` is TCPSite's own plus the handshake deadline
and the socket of `listen_on`, with TLS by tls_accept's protocol (a refused connection closes once told why);
the private attributes it reads are in http_guard's AIOHTTP_INTERNALS, checked when a site is made.
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from .http_guard import check_aiohttp_internals
from .listener import closed_unless_served, listen_on
from .tls_accept import tls_protocol_factory


class ListenerSite(web.TCPSite):
    """A TCPSite, over `ssl_context` if given, whose handshakes end at `handshake_timeout_s`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 handshake_timeout_s: float, reuse_port: bool | None = None) -> None:
        check_aiohttp_internals()   # fail at start, in one line, rather than on the first connection
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        self.handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with its runner, as TCPSite.start does first
        server = self._runner.server
        assert server is not None
        where = listen_on(self._host, self._port, bool(self._reuse_port))
        if "sock" not in where:
            where["reuse_address"] = self._reuse_address
        # TLS by the protocol tls_accept makes, which closes a refused connection once its alert is sent.
        factory = server if self._ssl_context is None else tls_protocol_factory(server, self._ssl_context,
                                                                                self.handshake_timeout_s)
        with closed_unless_served(where):
            self._server = await asyncio.get_running_loop().create_server(factory, backlog=self._backlog, **where)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def listener_site(runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None, handshake_timeout_s: float,
                  reuse_port: bool | None = None) -> web.TCPSite:
    """The site of one HTTP listener (the API, metrics): TLS over `ssl_context`, plaintext without one."""
    return ListenerSite(runner, host, port, ssl_context=ssl_context, handshake_timeout_s=handshake_timeout_s,
                        reuse_port=reuse_port)
