"""TLS for the listeners: one server context per process, replaced whole when its files change.

HTTP and metrics share one listener context; gRPC has its own (ALPN h2, see grpc_tls.py) from the same files.
A renewed certificate (cert-manager rewrites the files in place) or a changed client CA is picked up by
polling: the new files are read once and built into fresh contexts, which every new handshake then switches
to from the listener context's `sni_callback` (called for every ClientHello, with or without SNI); open
connections keep theirs. Loading the new pair into the live context instead would not replace the old
certificate: OpenSSL keeps one per key type, so an EC-to-RSA renewal would serve both, and ECDSA clients
the old one; nor would it drop the old client CA from its verify store. A broken new file keeps the old
contexts in force, is logged and counted, like a broken policy file.

A refused handshake (a TLS 1.2 client, mTLS without a certificate or with one of another CA) ends in
asyncio's TLS code, which reports it nowhere outside debug mode. The fatal alert OpenSSL writes for it
names the reason, so every context watches the alerts it sends through CPython's message callback (meant
for debugging, so private: checked when ServerTls is made; without it refusals go uncounted, with a warning).
It runs for every TLS record, so it is set on the C slot under ssl.py's `_msg_callback` property, whose
wrapper builds three enums a call: about 0.5 us a record instead of 4.

Under mTLS no session is resumed, since a resumed session is not verified again and would outlive a client-CA
change: TLS 1.3 gets no tickets, and TLS 1.2 (`tls_min_version: "1.2"`) no server session cache either. With
tickets off, OpenSSL resumes TLS 1.2 sessions by id from the listener context's cache (the context a
connection was made with keeps it, whatever context the handshake switched to), and Python's ssl cannot turn
that cache off: `disable_session_cache` calls OpenSSL for it, on the SSL_CTX pointer that leads
CPython's context object (the mode it reads first checks that pointer; without the call mTLS refuses to start on 1.2).
The alert reaches the client (it reads "alert certificate required", not a closed connection): asyncio and
uvloop close a connection whose handshake raised without sending what OpenSSL left for the peer (CPython
gh-98078), so the server side of a listener context reports a refusal with an alert pending as "want read"
once (AlertFirst): the loop sends the alert and waits; the client, told, hangs up, and the refusal is raised
then. On the listeners (tls_accept.py, which makes each connection's TLS protocol and so knows its
transport) the refused connection is closed as soon as the alert is handed to it: close() sends what the
transport holds, then ends the connection, so a client that stays silent holds no socket or task after its
refusal. A context used elsewhere (no transport known) waits for the client, up to the handshake deadline.
A refusal with nothing to send (plaintext on the TLS port: OpenSSL sends no alert for it) closes at once.
"""

from __future__ import annotations

import _ssl
import asyncio
import ctypes
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..context import PeerCert
from ..settings import ServerSettings

log = logging.getLogger("seekgate.tls")

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_ALERT_RECORD, _FATAL = 21, b"\x02"   # TLS content type of an alert record; the level that ends a handshake
_MSG_CALLBACK_SLOT = getattr(_ssl._SSLContext, "_msg_callback", None)   # what ssl.SSLContext._msg_callback wraps
CAN_WATCH_ALERTS = hasattr(_MSG_CALLBACK_SLOT, "__set__")
Stamp = tuple[tuple[int, int, int], ...]
# SSL_CTX_set_session_cache_mode is a macro over SSL_CTX_ctrl (ssl.h): the commands and the modes it sets.
_SET_SESS_CACHE_MODE, _GET_SESS_CACHE_MODE, _SESS_CACHE_OFF, _SESS_CACHE_SERVER = 44, 45, 0, 2


def tls_enabled(s: ServerSettings) -> bool:
    return bool(s.tls_cert_file)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name: it may resolve to anything


def plaintext_refusal(s: ServerSettings) -> str | None:
    """Why `serve` must not start (secure by default): keys would cross a network in clear."""
    if tls_enabled(s) or s.insecure_plaintext or is_loopback(s.host):
        return None
    return (f"server.host {s.host!r} is not a loopback address and no TLS certificate is set: set "
            "server.tls_cert_file and server.tls_key_file (seekgate tls dev-cert makes a test pair), or "
            "accept plaintext explicitly with --insecure-plaintext (server.insecure_plaintext)")


@dataclass
class Connection:
    """The connection a listener's TLS state is made for: its transport, once the loop has given it (tls_accept.py)."""

    transport: asyncio.BaseTransport | None = None


# Set by tls_accept.py around the calls that make a connection's TLS state (asyncio wraps the BIOs when its TLS
# protocol is made, uvloop when it is connected): wrap_bio hands it to the AlertFirst it makes.
OPENING: ContextVar[Connection | None] = ContextVar("seekgate_tls_opening", default=None)


class AlertFirst(ssl.SSLObject):
    """The TLS state of one server connection, whose refused handshake sends its alert before it ends (module doc)."""

    to_peer: ssl.MemoryBIO | None = None   # what the loop sends the peer (set by ListenerContext.wrap_bio)
    connection: Connection | None = None   # set by wrap_bio on the listeners: a refusal closes it, alert sent
    _refusal: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self._refusal is not None:   # the peer has had the alert, and answered or hung up: now it ends
            raise self._refusal
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            if self.to_peer is None or not self.to_peer.pending:
                raise   # no alert to send: the loop closes at once, as it always did
            self._refusal = exc
            transport = self.connection.transport if self.connection is not None else None
            if transport is not None:
                # Called back after this call returns, by when the loop has handed the alert to the transport:
                # close() sends it, then ends the connection (a no-op if the client hung up meanwhile).
                asyncio.get_running_loop().call_soon(transport.close)
            # The loop's answer to "want read" during a handshake: send what is pending, wait for the peer.
            raise ssl.SSLWantReadError("handshake refused; the fatal alert goes to the peer first") from exc


class ListenerContext(ssl.SSLContext):
    """An SSLContext whose server connections are AlertFirst (asyncio and uvloop make them with wrap_bio)."""

    sslobject_class = AlertFirst

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        ssl_object = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(ssl_object, AlertFirst) and server_side:
            ssl_object.to_peer = outgoing
            ssl_object.connection = OPENING.get()
        return ssl_object


def build_context(s: ServerSettings, cert_file: str, key_file: str, client_ca_file: str) -> ssl.SSLContext:
    """A server context: TLS 1.3 unless 1.2 is asked for, client certificates required with a client CA."""
    ctx = ListenerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[s.tls_min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if s.tls_min_version == "1.2":
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")   # forward secrecy and AEAD only
    ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    if client_ca_file:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        # No session tickets: a resumed session is not verified again, so a client holding a ticket from
        # before a client-CA change would still be let in with the old CA's certificate, for the ticket's life.
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET
        # ... and no TLS 1.2 session id either (module doc). Without the call, TLS 1.2 must not be served.
        if s.tls_min_version == "1.2" and not disable_session_cache(ctx):
            raise ValueError("this Python's ssl cannot turn off TLS 1.2 session resumption, which mTLS needs "
                             "(a resumed session outlives a client-CA change): set server.tls_min_version \"1.3\"")
    return ctx


def _no_passphrase() -> bytes:
    """load_cert_chain's password callback, called only for an encrypted key. Without one, OpenSSL asks for the
    passphrase on the controlling terminal, if any, and waits: a reload blocked the event loop, every listener."""
    raise ValueError("the TLS private key is encrypted: seekgate takes an unencrypted key (there is no passphrase "
                     "setting)")


def _ssl_ctx_ctrl() -> Callable[[int, int, int], int] | None:
    """OpenSSL's SSL_CTX_ctrl, from the libssl that CPython's _ssl links; None where it cannot be reached."""
    try:
        ctrl = ctypes.CDLL(_ssl.__file__).SSL_CTX_ctrl   # dlsym searches _ssl's own libssl
    except (AttributeError, OSError):   # no shared _ssl (a static build) or no such symbol
        return None
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]

    def call(ssl_ctx: int, command: int, value: int) -> int:
        return int(ctrl(ssl_ctx, command, value, None))
    return call


_CTX_CTRL = _ssl_ctx_ctrl()


def disable_session_cache(ctx: ssl.SSLContext) -> bool:
    """Turns off `ctx`'s server session cache (no TLS 1.2 resumption by id); False where it cannot.

    CPython's context object is PyObject_HEAD then the SSL_CTX pointer (Modules/_ssl.c, PySSLContext), unchanged
    since 2.7. A fresh server context's mode is SSL_SESS_CACHE_SERVER: read first, as a check of that pointer.
    """
    if _CTX_CTRL is None or not isinstance(ctx, _ssl._SSLContext):
        return False
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ssl_ctx or _CTX_CTRL(ssl_ctx, _GET_SESS_CACHE_MODE, 0) != _SESS_CACHE_SERVER:
        return False
    _CTX_CTRL(ssl_ctx, _SET_SESS_CACHE_MODE, _SESS_CACHE_OFF)
    return _CTX_CTRL(ssl_ctx, _GET_SESS_CACHE_MODE, 0) == _SESS_CACHE_OFF


class ServerTls:
    """The listeners' TLS state: the listener contexts (HTTP and metrics, gRPC), the contexts in force, their reload."""

    def __init__(self, s: ServerSettings, on_reload: Callable[[], None] = lambda: None,
                 on_error: Callable[[str], None] = lambda _: None,
                 on_refused: Callable[[str], None] = lambda _: None) -> None:
        self.settings = s
        self.on_reload, self.on_error, self.on_refused = on_reload, on_error, on_refused
        if not CAN_WATCH_ALERTS:
            log.warning("this Python's ssl has no SSLContext._msg_callback: refused TLS handshakes are not counted")
        self._stamp = self._files_stamp()
        # A broken file at start stops the start (fail closed), with the error as the message.
        self.context, self.grpc_context = self._build(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        # What new handshakes get: the listener contexts until the first reload, fresh ones after it.
        self._in_force = {self.context: self.context, self.grpc_context: self.grpc_context}   # listener -> context
        for listener in (self.context, self.grpc_context):
            listener.sni_callback = self._switch

    def _build(self, cert_file: str, key_file: str, client_ca_file: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        http = build_context(self.settings, cert_file, key_file, client_ca_file)
        grpc = build_context(self.settings, cert_file, key_file, client_ca_file)
        # gRPC clients insist that the server selects h2 by ALPN; the HTTP door speaks HTTP/1.1 only, so it
        # must not offer h2, hence two contexts.
        grpc.set_alpn_protocols(["h2"])
        if CAN_WATCH_ALERTS:
            # On every context: after the switch, CPython calls the callback of the context in force.
            for context in (http, grpc):
                _MSG_CALLBACK_SLOT.__set__(context, self._watch_alert)   # type: ignore[union-attr]
        return http, grpc

    def _watch_alert(self, _conn: object, direction: str, _version: int, content_type: int, alert: int,
                     data: bytes) -> None:
        """The message callback: a fatal alert this side sends is a refused handshake (or a broken connection)."""
        if content_type == _ALERT_RECORD and direction == "write" and data[:1] == _FATAL:
            reason = _alert_name(alert)
            log.info("TLS handshake refused: %s", reason)
            self.on_refused(reason)

    def _switch(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None,
                listener: ssl.SSLContext) -> None:
        """sni_callback of the listener contexts: this handshake goes on with the context in force.

        Called before the certificate is chosen and the client's is verified, so both come from the new files.
        """
        current = self._in_force[listener]
        if current is not listener:
            ssl_object.context = current

    def _files_stamp(self) -> Stamp:
        s = self.settings
        stamps = []
        for path in (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file):
            if not path:
                continue
            try:
                st = os.stat(path)   # follows symlinks: Kubernetes swaps a ..data link on renewal
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Builds contexts from the files if they changed since the last look; True if new ones are in force."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        s = self.settings
        names = ", ".join(p for p in (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file) if p)
        try:
            cert, key = _read(s.tls_cert_file), _read(s.tls_key_file)
            ca = _read(s.tls_client_ca_file) if s.tls_client_ca_file else None
            # The bytes read once are what is built: a file rewritten while it is loaded could otherwise put
            # a certificate beside the wrong key.
            with tempfile.TemporaryDirectory(prefix="seekgate-tls-") as tmp:
                cert_path, key_path, ca_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem"), Path(tmp, "ca.pem")
                cert_path.write_bytes(cert)
                key_path.touch(mode=0o600)
                key_path.write_bytes(key)
                if ca is not None:
                    ca_path.write_bytes(ca)
                http, grpc = self._build(str(cert_path), str(key_path), str(ca_path) if ca is not None else "")
        except (OSError, ssl.SSLError, ValueError) as exc:
            message = f"{names}: {exc}"
            log.error("TLS reload failed, keeping the certificate and client CA in force: %s", message)
            self.on_error(message)
            return False
        # Two assignments, no await between them: a handshake sees both old or both new.
        self._in_force[self.context] = http
        self._in_force[self.grpc_context] = grpc
        log.info("TLS reloaded from %s", names)
        self.on_reload()
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tls_reload_interval_s)
            self.reload_if_changed()


def _alert_name(alert: int) -> str:
    """protocol_version, certificate_required, ... (RFC 8446 6.2), as ssl's private enum spells them."""
    try:
        return ssl._TLSAlertType(alert).name.lower()   # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return str(alert)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


# ------------------------------------------------------------------ the client's certificate

@lru_cache(maxsize=1024)   # clients reconnect with the same certificate; parsing costs ~50 us
def peer_cert_from_der(der: bytes) -> PeerCert:
    cert = x509.load_der_x509_certificate(der)
    return PeerCert(fingerprint=hashlib.sha256(der).hexdigest(), subject=cert.subject.rfc4514_string(),
                    sans=_sans(cert))


def peer_cert_from_pem(pem: bytes) -> PeerCert:
    return peer_cert_from_der(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER))


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    """SANs in OpenSSL's spelling (URI:spiffe://..., DNS:..., IP:..., email:...), as policies name them."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = [f"URI:{v}" for v in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [f"DNS:{v}" for v in ext.get_values_for_type(x509.DNSName)]
    out += [f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)]
    out += [f"email:{v}" for v in ext.get_values_for_type(x509.RFC822Name)]
    return tuple(out)


def http_peer_cert(transport: Any) -> PeerCert | None:
    """The verified client certificate of an aiohttp request's connection, if any."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return peer_cert_from_der(der) if der else None
