"""Each TLS listener connection's protocol: the loop's own TLS protocol, made here so a refusal can close it.

create_server(ssl=...) makes the loop's TLS protocol out of sight, so nothing of ours learns the transport of a
connection: a refused handshake (tls.AlertFirst) could send its alert and then only wait for the client to hang
up, or for the handshake deadline, a socket and a task held by every silent refused client. The listeners call
create_server without `ssl` and this factory makes the same protocol (asyncio's or uvloop's SSLProtocol, with
the same arguments create_server gives it), telling the AlertFirst it wraps which connection it belongs to
(tls.OPENING, set around the calls that wrap the BIOs). The loops' SSLProtocol classes are internal: both are
looked up when a listener starts, and a loop without one fails the start in one line.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from collections.abc import Callable
from functools import cache
from typing import Any

from .tls import OPENING, Connection


def tls_protocol_factory(app_factory: Callable[[], asyncio.BaseProtocol], context: ssl.SSLContext,
                         handshake_timeout_s: float) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory for create_server: `app_factory`'s protocol behind TLS over `context`, as `ssl=` does."""
    loop = asyncio.get_running_loop()
    protocol_class = _listener_protocol(_loop_ssl_protocol(loop))

    def factory() -> asyncio.BaseProtocol:
        waiter = loop.create_future()
        connection = Connection()
        token = OPENING.set(connection)
        try:
            protocol = protocol_class(loop, app_factory(), context, waiter, server_side=True,
                                      ssl_handshake_timeout=handshake_timeout_s)
        finally:
            OPENING.reset(token)
        protocol.connection = connection
        # What the loops do with it behind ssl=: a failed handshake closes the transport, its error consumed.
        waiter.add_done_callback(lambda done: _handshake_done(done, connection))
        return protocol
    return factory


def _handshake_done(waiter: asyncio.Future[None], connection: Connection) -> None:
    if not waiter.cancelled() and waiter.exception() is not None and connection.transport is not None:
        connection.transport.close()


def _loop_ssl_protocol(loop: asyncio.AbstractEventLoop) -> type:
    """The TLS protocol class `loop` itself makes for create_server(ssl=...)."""
    try:
        from uvloop import Loop as UvLoop
        from uvloop.loop import SSLProtocol as UvSSLProtocol  # type: ignore[attr-defined]  # internal: no stub
    except ImportError:   # an optional speed-up (http.install_uvloop)
        pass
    else:
        if isinstance(loop, UvLoop):
            return UvSSLProtocol
    if isinstance(loop, asyncio.BaseEventLoop):
        return asyncio.sslproto.SSLProtocol
    raise RuntimeError(f"TLS listeners run on asyncio's own loop or uvloop, not on {type(loop).__name__}")


@cache
def _listener_protocol(base: type) -> type:
    """`base` (a loop's SSLProtocol) told which transport it serves, around the call that may wrap the BIOs."""
    loop_protocol: Any = base

    def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
        self.connection.transport = transport
        token = OPENING.set(self.connection)   # uvloop wraps the BIOs here, asyncio when the protocol is made
        try:
            loop_protocol.connection_made(self, transport)
        finally:
            OPENING.reset(token)
    return type(f"Listener{base.__name__}", (base,), {"connection_made": connection_made, "connection": None})
