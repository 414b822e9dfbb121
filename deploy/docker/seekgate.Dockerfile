# seekgate: the auth proxy, as a non-root image meant to run with a read-only root filesystem.
# Build from the repository root:  docker build -f deploy/docker/seekgate.Dockerfile -t seekgate:0.1.0 .
# Base images are pinned by tag here; a release pins them by digest (deploy/README.md, Supply chain).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
# Dependencies first, from the hash-locked list: a source edit reuses this layer, and nothing
# is resolved at build time (pyproject.toml's ranges are checked against the lock by the tests).
COPY deploy/docker/requirements.lock ./
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
# The proxy side only: torch/transformers/tritonserver live in the Triton image.
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl && pip check && rm -rf /wheels \
 && useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin seekgate \
 && mkdir -p /data/audit /data/secrets /etc/seekgate/config \
 && chown 10001:10001 /data /data/audit && chown 10001:10001 /data/secrets && chmod 0700 /data/secrets \
 && ln -s ../seekgate.yaml /etc/seekgate/config/seekgate.yaml
COPY config/seekgate.yaml /etc/seekgate/seekgate.yaml
COPY policies /etc/seekgate/policies
COPY deploy/docker/seekgate_entrypoint.py /usr/local/bin/seekgate-entrypoint
# The health checks that run in the container (HEALTHCHECK below, Compose's), with a client certificate under
# mTLS. Not the Kubernetes probes: those are the kubelet's httpGet on the status listener (deploy/k8s).
COPY deploy/docker/seekgate_probe.py /usr/local/bin/seekgate-probe
# Settings the image fixes; everything else comes from seekgate.yaml or SEEKGATE_* (see .env.example).
# A container listens on every interface, so TLS is on: `serve` refuses a non-loopback host without it.
# The certificate and key are mounted secrets (Compose `secrets:`, the Kubernetes Secret seekgate-tls
# in the projected /run/secrets volume); renewals are picked up without a restart. deploy/README.md, TLS.
ENV SEEKGATE_DATA_DIR=/data \
    SEEKGATE_SERVER_HOST=0.0.0.0 \
    SEEKGATE_SERVER_TLS_CERT_FILE=/run/secrets/seekgate_tls_cert \
    SEEKGATE_SERVER_TLS_KEY_FILE=/run/secrets/seekgate_tls_key \
    SEEKGATE_POLICY_DIRECTORY=/etc/seekgate/policies \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
# The CLI reads config/seekgate.yaml from the working directory when no --config is given: from here
# that is the mounted /etc/seekgate/seekgate.yaml (the link above), so `docker compose exec seekgate
# seekgate keys create ...` and `kubectl exec` use the same settings as the server, not the defaults.
WORKDIR /etc/seekgate
USER 10001:10001
EXPOSE 8000 8001 8002
# seekgate's own health (its metrics endpoint), not Triton's: /v2/health/ready is forwarded.
# Over TLS, like every listener, but without verifying the certificate: the probe asks whether this
# process answers on loopback inside the container, not who it is (nothing crosses a network), and
# the certificate names the service, not 127.0.0.1. With mTLS (server.tls_client_ca_file) it presents
# the client pair mounted at /run/secrets/seekgate_probe_cert and _key (absent: none, as without mTLS).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "/usr/local/bin/seekgate-probe", "https://127.0.0.1:8002/metrics", "--timeout", "2", "--client-cert", "/run/secrets/seekgate_probe_cert", "--client-key", "/run/secrets/seekgate_probe_key"]
ENTRYPOINT ["python", "/usr/local/bin/seekgate-entrypoint"]
CMD ["seekgate", "serve", "--config", "/etc/seekgate/seekgate.yaml"]
