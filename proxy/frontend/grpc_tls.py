"""TLS for the gRPC door, terminated here so that TLS 1.2 can be refused.

grpcio offers no minimum TLS version, and its one knob, GRPC_SSL_CIPHER_SUITES, cannot stand in: BoringSSL
rejects a list of TLS 1.3 suites alone (the server fails to bind), and any TLS 1.2 suite left in lets 1.2
through. So the gRPC listener takes TLS with Python's ssl, the same machinery as the HTTP door (minimum
version, mTLS, the certificate and client CA reloaded), and pipes the decrypted HTTP/2 bytes to the grpc.aio
server on a private loopback port. What grpc can no longer see itself, the client's address and
certificate, travels in a side table keyed by the source port of the inner connection; a call on a
connection missing from it (someone dialling the inner port directly) is refused: fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

from ..context import PeerCert, client_ip_text
from .listener import closed_unless_served, listen_on
from .tls import http_peer_cert
from .tls_accept import tls_protocol_factory

log = logging.getLogger("seekgate.grpc_tls")

INNER_HOST = "127.0.0.1"
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class TlsPeer:
    """Who is at the far end of one TLS connection, as the handshake and the socket told it."""

    client_ip: str
    cert: PeerCert | None


class GrpcTlsTerminator:
    """The gRPC TLS listener: one asyncio task per connection, piping it to the inner grpc port."""

    def __init__(self, context: ssl.SSLContext, handshake_timeout_s: float) -> None:
        self.context = context   # the listener context: each handshake switches to the one in force (tls.py)
        self.handshake_timeout_s = handshake_timeout_s
        self.peers: dict[int, TlsPeer] = {}   # inner connection's source port -> the outer peer
        self.inner_port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, inner_port: int, reuse_port: bool = False) -> int:
        """Listens on host:port (TLS), relaying to INNER_HOST:inner_port; returns the bound port."""
        self.inner_port = inner_port
        where = listen_on(host, port, reuse_port)   # "::": dual-stack, as grpc's own plaintext port
        loop = asyncio.get_running_loop()

        def streams() -> asyncio.BaseProtocol:   # what asyncio.start_server makes for each connection
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=_CHUNK, loop=loop), self._connection,
                                                loop=loop)
        with closed_unless_served(where):
            # TLS by the protocol tls_accept makes, which closes a refused connection once its alert is sent.
            self._server = await loop.create_server(
                tls_protocol_factory(streams, self.context, self.handshake_timeout_s), **where)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("gRPC TLS on %s:%d, relayed to grpc on %s:%d", host, bound, INNER_HOST, inner_port)
        return bound

    def peer_of(self, grpc_peer: str) -> TlsPeer | None:
        """The outer peer of the call grpc reports as `grpc_peer` ("ipv4:127.0.0.1:PORT"); None if unknown."""
        kind, _, rest = grpc_peer.partition(":")
        address, _, port = rest.rpartition(":")
        if kind != "ipv4" or address != INNER_HOST or not port.isdigit():
            return None
        return self.peers.get(int(port))

    def close(self) -> None:
        """Stops taking connections; open ones keep flowing until grpc ends them (drain)."""
        if self._server is not None:
            self._server.close()

    async def abort_all(self) -> None:
        """Ends what grpc's drain left open."""
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        inner_port = 0
        inner_writer: asyncio.StreamWriter | None = None
        try:
            peername = writer.get_extra_info("peername")
            peer = TlsPeer(client_ip=client_ip_text(str(peername[0])) if peername else "",
                           cert=http_peer_cert(writer.transport))
            inner_reader, inner_writer = await asyncio.open_connection(INNER_HOST, self.inner_port, limit=_CHUNK)
            inner_port = inner_writer.get_extra_info("sockname")[1]
            # Registered before a byte is relayed: grpc runs no handler before the first request arrives.
            self.peers[inner_port] = peer
            relays = {asyncio.create_task(_relay(reader, inner_writer)),
                      asyncio.create_task(_relay(inner_reader, writer))}
            try:
                # Either side ending ends the connection: HTTP/2 has no use for a half-closed one, and
                # asyncio's TLS transport cannot half-close.
                await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for relay in relays:
                    relay.cancel()
                await asyncio.gather(*relays, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("gRPC TLS connection ended: %s", exc)
        finally:
            self.peers.pop(inner_port, None)
            for w in (inner_writer, writer):
                if w is not None:
                    w.close()   # graceful: what grpc last wrote (a GOAWAY, trailers) is still flushed
            self._connections.discard(task)


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
