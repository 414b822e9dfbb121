#!/bin/sh
# Starts tritonserver as `seekgate triton` does (proxy/local/triton.py build_command), with the
# inference ports bound to TRITON_BIND_ADDRESS only (the network seekgate shares with Triton)
# and every API category but health locked behind the header only seekgate knows (it sends it on
# every request it forwards, once its checks passed): another process in the pod or on the network
# gets nothing (TRITON_RESTRICTED_API; see deploy/README.md, "Triton's restricted APIs"). Ports default to
# 8000/8001/8002 (compose); in a Kubernetes pod, where seekgate holds those, 18000/18001/18002.
# The header value is read from a mounted secret file, never from the command line of compose.
set -eu

key_file="${TRITON_INTERNAL_KEY_FILE:-/run/secrets/triton_internal_key}"
if [ ! -s "$key_file" ]; then
  echo "triton-entrypoint: $key_file is missing or empty (the shared secret seekgate sends to unlock Triton's restricted APIs)" >&2
  exit 1
fi
key="$(cat "$key_file")"
# Everything but health: seekgate sends the header with every request it forwards (after its own
# authentication, policy and body checks), so only seekgate reaches these; health stays open for
# the kubelet's and compose's probes.
restricted="${TRITON_RESTRICTED_API:-shared-memory,model-repository,trace,logging,inference,metadata,model-config,statistics}"
bind="${TRITON_BIND_ADDRESS:?set TRITON_BIND_ADDRESS: the address Triton's HTTP and gRPC ports listen on}"

exec tritonserver \
  --model-repository="${TRITON_MODEL_REPOSITORY:-/models}" \
  --http-address="$bind" --http-port="${TRITON_HTTP_PORT:-8000}" \
  --grpc-address="$bind" --grpc-port="${TRITON_GRPC_PORT:-8001}" \
  --metrics-address="${TRITON_METRICS_ADDRESS:-0.0.0.0}" --metrics-port="${TRITON_METRICS_PORT:-8002}" \
  --model-control-mode=none \
  --strict-readiness=true \
  --exit-on-error=true \
  --allow-sagemaker=false --allow-vertex-ai=false \
  --http-restricted-api="$restricted:seekgate-internal=$key" \
  --grpc-restricted-protocol="$restricted:seekgate-internal=$key" \
  --model-config-name="${TRITON_MODEL_CONFIG_NAME:-gpu}" \
  --log-info=true \
  "$@"
