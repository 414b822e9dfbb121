"""seekgate-probe: a health check run inside the seekgate container, over TLS, with a client certificate when one is mounted.

    python /usr/local/bin/seekgate-probe URL [--client-cert FILE --client-key FILE] [--timeout S]

Exits 0 on a 2xx answer and 1 otherwise (an error status such as readiness's 503, a refused
handshake, nothing listening), the reason on stderr, where `kubectl describe pod` shows it.

It serves the checks Docker runs in the container (the image's HEALTHCHECK, Compose's healthchecks),
where there is no kubelet. Under mTLS (`server.tls_client_ca_file`) every TLS listener, the metrics
port included, refuses a client without a certificate, so it presents the pair at
--client-cert/--client-key (Compose's secrets seekgate_probe_cert/_key, deploy/README.md "mTLS"),
when those files exist: without mTLS nothing asks for one. Kubernetes needs none of this: its probes
are the kubelet's httpGet on the plain-HTTP status listener (`server.status_listen`).

The server's certificate is not verified: the probe asks, over loopback inside the container,
whether this process answers, not who it is (the certificate names the Service, not 127.0.0.1).
Standard library only, for the image's Python.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request


def client_context(cert: str, key: str) -> tuple[ssl.SSLContext, bool]:
    """An unverifying client context, holding the client pair if it is mounted; and whether it is."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    present = bool(cert) and os.path.isfile(cert)
    if present:
        ctx.load_cert_chain(cert, key or None)
    return ctx, present


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seekgate-probe", description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--client-cert", default="", help="client certificate (PEM), used if the file exists")
    parser.add_argument("--client-key", default="", help="its private key (PEM)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole request")
    args = parser.parse_args(argv)
    try:
        ctx, with_cert = client_context(args.client_cert, args.client_key)
    except (OSError, ssl.SSLError) as err:
        print(f"seekgate-probe: cannot load the client certificate {args.client_cert}: {err}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout, context=ctx) as answer:
            status = int(answer.status)
    except urllib.error.HTTPError as err:
        print(f"seekgate-probe: {args.url}: HTTP {err.code}", file=sys.stderr)
        return 1
    except OSError as err:   # URLError, ssl.SSLError, resets and timeouts are all OSErrors
        cause = err.reason if isinstance(err, urllib.error.URLError) else err
        # A TLS failure or a reset right after the handshake, without a certificate: what a server that
        # requires one does (TLS 1.3 sends its refusal after the client's side of the handshake is done).
        refused = isinstance(cause, (ssl.SSLError, ConnectionResetError)) and not with_cert
        hint = (f" (no client certificate presented: none at {args.client_cert or '--client-cert'}; with "
                "server.tls_client_ca_file set, mount one signed by that CA)") if refused else ""
        print(f"seekgate-probe: {args.url}: {err}{hint}", file=sys.stderr)
        return 1
    if not 200 <= status < 300:
        print(f"seekgate-probe: {args.url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
