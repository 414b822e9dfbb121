"""LiteLLM's proxy in front of the same Triton, for bench/openai_stream.py's third path.

LiteLLM is never installed into the project's .venv (its pins would move ours): point --litellm at
the `litellm` command of a venv of its own, e.g.
    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
It runs its `triton` provider on Triton's generate (generate_stream for streams) of the decoupled
twin, with a master key and no database, which is as far as LiteLLM's proxy goes without one.
Read its figures knowing that (LiteLLM 1.108) the provider sends max_tokens and temperature under
`parameters`, Triton's request parameters, not the model's inputs (this model, like Triton's vLLM
and TensorRT-LLM backends, reads inputs), so its streams run at the model's default length; and its
usage counts are LiteLLM's own re-tokenisation of the text, not the model's counts.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bench.stack import Service, Unavailable, live
from proxy.local.triton import free_ports

MASTER_KEY = "sk-bench-litellm"


def start_litellm(executable: Path, triton_http_url: str, root: Path, model: str = "deepseek",
                  twin: str = "deepseek_stream") -> Service:
    """`litellm --config` serving `model` from Triton's twin; Unavailable if it does not come up."""
    (port,) = free_ports(1)
    config = root / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"triton/{twin}", "api_base": f"{triton_http_url}/v2/models/{twin}/generate"}}],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }))
    log = root / "litellm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(executable), "--config", str(config), "--host", "127.0.0.1",
                                 "--port", str(port), "--num_workers", "1"],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={"PATH": str(executable.parent) + ":/usr/bin:/bin", "LITELLM_LOG": "ERROR",
                                     "HOME": str(root)})
    service = Service("litellm", f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 120   # LiteLLM imports a lot before it listens
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"litellm exited with {proc.returncode}: see {log}")
        try:
            with urllib.request.urlopen(service.url + "/health/liveliness", timeout=1) as r:
                if r.status == 200:
                    return service
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    service.stop()
    raise Unavailable("litellm not live after 120s")


__all__ = ["MASTER_KEY", "live", "start_litellm"]
