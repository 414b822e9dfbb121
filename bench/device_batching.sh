#!/usr/bin/env bash
# The batching bench on a GPU machine lent through the `device` tool, in one call.
#
# That machine has torch (CUDA) and an older transformers, and no tritonserver (its wheel is
# far over the 64 MiB a call carries), so this runs the bench's in-process engine path only
# (`bench/batching.py --engine-only`, configs/gpu.pbtxt: bf16 on the GPU), static against
# in-flight, tiny and large checkpoints.
#
#   here, once:   bench/device_batching.sh --fetch-wheels
#                 (the engine's tested transformers and what it needs, as Python 3.12 wheels, into
#                 .whl/, which .git/info/exclude ignores)
#   the device:   run(command="bench/device_batching.sh", carry=[".whl"], timeout_s=540)
#                 the table and the JSON come back in $OUT (batching-engine.log / .json)
#
# ROUNDS, LARGE_ROUNDS and DEVICE (gpu; cpu to try the script on a machine without one) override
# the defaults; PYTHON picks the interpreter (the device's python3 holds its torch).
set -euo pipefail
cd "$(dirname "$0")/.."

# transformers and the packages whose versions it checks at import, at the versions this repo's
# venv runs (pyproject.toml pins transformers to the range engine.py is tested on).
PACKAGES=(transformers huggingface-hub kernels tokenizers regex safetensors)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    pins=()
    for name in "${PACKAGES[@]}"; do
        pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    platforms=()
    for n in 17 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
    du -sh .whl
    exit 0
fi

PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
out="${OUT:-/tmp}"
set -o pipefail
PYTHONUNBUFFERED=1 "$PYTHON" bench/batching.py --engine-only --device "${DEVICE:-gpu}" --large \
    --rounds "${ROUNDS:-9}" --large-rounds "${LARGE_ROUNDS:-5}" --json "$out/batching-engine.json" 2>&1 \
    | tee "$out/batching-engine.log"
