# Triton Inference Server with what triton_models/deepseek's Python backend imports.
# Build from the repository root:  docker build -f deploy/docker/triton.Dockerfile -t seekgate-triton:24.12 .
# 24.12: Triton 2.53 on Ubuntu 24.04 with Python 3.12 (transformers 5 needs Python >= 3.11);
# CUDA 12.6.3, NVIDIA driver 560+ (or R535/R545 on data-center GPUs). Pinned by tag here; a
# release pins it by digest (deploy/README.md, Supply chain). A newer release changes the CUDA
# and driver floor: move to it after a run on the target GPU hosts, not blind.
FROM nvcr.io/nvidia/tritonserver:24.12-py3

# The versions seekgate's tests run against (pyproject.toml [model]). torch from PyPI brings
# its own CUDA runtime wheels; set TORCH_INDEX_URL to a CUDA-specific index to pick another build.
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --no-cache-dir --break-system-packages --index-url "${TORCH_INDEX_URL}" \
      --extra-index-url https://pypi.org/simple \
      torch==2.13.0 \
 && pip install --no-cache-dir --break-system-packages \
      transformers==5.24.0 \
      tokenizers==0.23.3 \
      safetensors==0.8.0 \
      accelerate==1.15.0 \
      numpy==1.26.4

# The model repository is baked in for Kubernetes; compose mounts ./triton_models over it.
COPY triton_models /models
COPY deploy/docker/triton-entrypoint.sh /usr/local/bin/triton-entrypoint
# Never reach for a hub at run time: the checkpoint is a mounted directory.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SEEKGATE_CHECKPOINT=/checkpoint
# Writable places at run time are mounts (/tmp, /dev/shm): the root filesystem can be read-only.
ENV HOME=/tmp \
    HF_HOME=/tmp/huggingface
# triton-server (uid 1000), the user NVIDIA's image ships, never root.
USER 1000:1000
EXPOSE 8000 8001 8002
# Liveness only: readiness (model loaded) is what seekgate and the orchestrator ask for.
# The address is TRITON_BIND_ADDRESS, where the HTTP port listens (127.0.0.1 in a pod).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=4 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://%s:%s/v2/health/live' % (os.environ.get('TRITON_BIND_ADDRESS', '127.0.0.1'), os.environ.get('TRITON_HTTP_PORT', '8000')), timeout=3)"]
ENTRYPOINT ["sh", "/usr/local/bin/triton-entrypoint"]
