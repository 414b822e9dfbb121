"""`seekgate tls dev-cert`: a throwaway CA, a server and a client certificate, for tests and first trials."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .common import CliError

DEV_VALIDITY = datetime.timedelta(days=30)   # throwaway: short-lived on purpose
CLIENT_SPIFFE = "spiffe://seekgate.dev/client"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "seekgate dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
           *, ca: bool = False, sans: list[x509.GeneralName] | None = None,
           usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + DEV_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_private(path: Path, data: bytes) -> None:
    """A private key, readable by its owner only from the first byte on."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)


def make_dev_certs(out: Path, server_names: tuple[str, ...] = ("localhost",),
                   server_ips: tuple[str, ...] = ("127.0.0.1", "::1")) -> dict[str, Path]:
    """ca.pem, server.pem + server-key.pem, client.pem + client-key.pem (keys 0600) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("seekgate dev CA", ca_key, _name("seekgate dev CA"), ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _issue("localhost", server_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                    sans=[*(x509.DNSName(n) for n in server_names),
                          *(x509.IPAddress(ipaddress.ip_address(i)) for i in server_ips)])
    client = _issue("seekgate dev client", client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                    sans=[x509.UniformResourceIdentifier(CLIENT_SPIFFE)])
    paths = {"ca": out / "ca.pem", "server_cert": out / "server.pem", "server_key": out / "server-key.pem",
             "client_cert": out / "client.pem", "client_key": out / "client-key.pem"}
    pem = serialization.Encoding.PEM
    for name, cert in (("ca", ca), ("server_cert", server), ("client_cert", client)):
        paths[name].write_bytes(cert.public_bytes(pem))
    for name, key in (("server_key", server_key), ("client_key", client_key)):
        _write_private(paths[name], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return paths


def cmd_dev_cert(args: argparse.Namespace) -> int:
    try:
        paths = make_dev_certs(Path(args.dir))
    except OSError as exc:   # --dir is a file, or not writable: one line, not a traceback
        raise CliError(f"tls dev-cert: cannot write to {args.dir}: {exc.strerror or exc}") from None
    print(f"""test certificates (valid {DEV_VALIDITY.days} days, never for production) in {args.dir}:
  CA:     {paths['ca']}
  server: {paths['server_cert']} {paths['server_key']}  (localhost, 127.0.0.1, ::1)
  client: {paths['client_cert']} {paths['client_key']}  ({CLIENT_SPIFFE})
serve with TLS:  SEEKGATE_SERVER_TLS_CERT_FILE={paths['server_cert']} SEEKGATE_SERVER_TLS_KEY_FILE={paths['server_key']}
require mTLS:    SEEKGATE_SERVER_TLS_CLIENT_CA_FILE={paths['ca']}""")
    return 0


def add_tls_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    tls = sub.add_parser("tls", help="TLS certificates").add_subparsers(
        dest="tls_command", required=True, metavar="ACTION")
    p = cmd(tls, "dev-cert", cmd_dev_cert, "make a throwaway CA, server and client certificate for tests")
    p.add_argument("--dir", default="tls-dev", help="where to write the PEM files (default: ./tls-dev)")
