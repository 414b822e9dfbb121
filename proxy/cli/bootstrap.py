"""First start of `seekgate up`: the Triton launch from settings and the one-time admin key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..keys.issue import issue_key, parse_duration
from ..keys.secrets_setup import load_pepper_sync
from ..local.triton import TritonLaunch, TritonLaunchError
from ..paths import tiny_checkpoint_path
from ..settings import Settings
from ..store.backend import open_store

BOOTSTRAP_OWNER = "bootstrap-admin"


def triton_launch(settings: Settings) -> TritonLaunch:
    """The TritonLaunch for settings.triton; builds the tiny checkpoint when none is configured."""
    data_dir, t = Path(settings.data_dir), settings.triton
    if t.checkpoint:
        checkpoint = Path(t.checkpoint)
    else:
        try:
            from ..local.tinymodel import ensure_tiny_checkpoint  # imports torch: only when needed
            checkpoint = ensure_tiny_checkpoint(tiny_checkpoint_path(data_dir))
        except ImportError as exc:
            raise TritonLaunchError(f"cannot build the tiny checkpoint ({exc}): run "
                                    f"`pip install -e '.[model]'` or set triton.checkpoint") from exc
    # Loopback only: nothing but seekgate may reach Triton.
    return TritonLaunch(Path(t.model_repository), data_dir, checkpoint, host="127.0.0.1",
                        http_port=t.http_port, grpc_port=t.grpc_port, metrics_port=t.metrics_port,
                        startup_timeout_s=t.startup_timeout_s)


def upstream_mismatch(settings: Settings) -> str | None:
    """Why the proxy would not reach the Triton `seekgate up` starts, or None if it would."""
    t, up = settings.triton, settings.upstream
    if urlsplit(up.http_url).port != t.http_port:
        return f"upstream.http_url ({up.http_url}) does not point at triton.http_port ({t.http_port})"
    if up.grpc_target.rsplit(":", 1)[-1] != str(t.grpc_port):
        return f"upstream.grpc_target ({up.grpc_target}) does not point at triton.grpc_port ({t.grpc_port})"
    return None


def bootstrap_admin(settings: Settings, now: float | None = None) -> str | None:
    """On first start (no live admin key in the store) issue one admin key and return its token.

    Returns None when an admin key exists already, so the secret is printed only once.
    """
    data_dir = Path(settings.data_dir)
    pepper = load_pepper_sync(settings)

    async def go() -> str | None:
        store = await open_store(settings.store, data_dir)
        try:
            if await store.has_any_admin():
                return None
            _, token = await issue_key(store, pepper, tier="user", owner=BOOTSTRAP_OWNER, roles=("admin",),
                                       expires_in_s=parse_duration("90d"),
                                       now=time.time() if now is None else now)
            return token
        finally:
            await store.close()
    return asyncio.run(go())


def _client_host(host: str) -> str:
    """Where a local client reaches a listener bound to `host` (wildcards mean loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return f"[{host}]" if ":" in host else host


def bootstrap_message(settings: Settings, key: str) -> str:
    """The one-time banner: the admin key, a curl call and a tritonclient call that work as printed."""
    s = settings.server
    host = _client_host(s.host)
    url = f"http://{host}:{s.http_port}{s.base_path}"
    return f"""
First start: created an admin key (role admin, expires in 90 days). It is shown ONCE:

    {key}

Try it:
    export KEY={key}
    curl -H "Authorization: Bearer $KEY" {url}/v2/models/deepseek/generate \\
         -d '{{"text_input":"Hello","max_tokens":16}}'

tritonclient (gRPC), with KEY exported as above:
    import os, numpy as np, tritonclient.grpc as grpcclient
    c = grpcclient.InferenceServerClient("{host}:{s.grpc_port}")
    t = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"Hello"]], dtype=object))
    r = c.infer("deepseek", [t], headers={{"authorization": "Bearer " + os.environ["KEY"]}})
    print(r.as_numpy("text_output"))

Make per-user keys with: seekgate keys create --tier user --name NAME --role user --expires 90d
"""
