"""Runs a real seekgate (proxy.http_server.run) in a background thread for integration tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.frontend.http import run
from proxy.keys.format import generate_key, key_prefix_and_last4
from proxy.keys.hashing import hash_secret, pepper_version
from proxy.keys.secrets_setup import open_pepper
from proxy.local.triton import free_ports
from proxy.settings import Settings, load_settings
from proxy.store import KeyRecord
from proxy.store.backend import open_store
from tests.relay import TcpRelay

REPO = Path(__file__).resolve().parent.parent


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    """Polls `check` until it holds or `timeout` passes; for effects that land asynchronously."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """The sum of a metric's samples matching `labels`, as scraped from the gateway now."""
    # getattr: test_workers passes its own stand-in, plaintext, with the same URL attribute.
    text = urllib.request.urlopen(gw.metrics_url, context=getattr(gw, "client_tls", None)).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def audit_records(gw: Gateway) -> list[dict[str, Any]]:
    path = gw.data_dir / "audit" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Gateway:
    def __init__(self, root: Path, upstream_http: str, ports: list[int], triton_data_dir: Path | None = None,
                 freeze_heap: bool = False, **overrides: Any) -> None:
        self.root = root
        self.freeze_heap = freeze_heap   # as `serve` runs it; off here, where the process is pytest's
        self.data_dir = root / "data"
        if triton_data_dir is not None:
            # As under `seekgate up`, where both share one data dir: the header value
            # that unlocks Triton's shared-memory API for admins.
            secret = triton_data_dir / "secrets" / "triton-internal-key"
            (self.data_dir / "secrets").mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy2(secret, self.data_dir / "secrets" / secret.name)
        self.policy_dir = root / "policies"
        if not self.policy_dir.exists():
            shutil.copytree(REPO / "policies", self.policy_dir)
        http, grpc_, metrics = ports
        self.settings: Settings = load_settings(None, env={}, overrides={
            "data_dir": str(self.data_dir),
            "server.http_port": http, "server.grpc_port": grpc_, "server.metrics_port": metrics,
            "upstream.http_url": upstream_http,
            "policy.directory": str(self.policy_dir), "policy.reload_interval_s": 0.2,
            **overrides,
        })
        self.url = f"http://127.0.0.1:{http}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.client_tls: ssl.SSLContext | None = None   # a test serving TLS sets both URLs to https and this
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> Gateway:
        ready = threading.Event()

        def main() -> None:
            async def go() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                started = asyncio.Event()
                task = asyncio.create_task(run(self.settings, started, self._stop, freeze_heap=self.freeze_heap))
                await asyncio.wait([task, asyncio.create_task(started.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)
                if task.done():   # it failed to start: raised here, .error is set before start() reads it
                    await task
                ready.set()
                await task
            try:
                asyncio.run(go())
            except BaseException as exc:  # surfaced to the test through .error
                self.error = exc
                ready.set()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        ready.wait(30)
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(30)

    def key(self, tier: str = "user", owner: str = "alice", roles: tuple[str, ...] = ("user",),
            expires_in_s: float | None = 3600, **kw: Any) -> tuple[str, str]:
        """Issues a key straight into the store (as `seekgate keys create` would); returns (key_id, token)."""
        async def go() -> tuple[str, str]:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            key_id, token = generate_key()
            prefix, last4 = key_prefix_and_last4(token)
            now = time.time()
            store = await open_store(self.settings.store, self.data_dir)
            try:
                pepper = await open_pepper(self.settings, store)   # the envelope's, as the server uses
                rec = KeyRecord(key_id=key_id, secret_hash=hash_secret(pepper, token),
                                pepper_version=pepper_version(pepper),
                                tier=tier, owner=owner, roles=roles, prefix=prefix, last4=last4, created_at=now,
                                expires_at=None if expires_in_s is None else now + expires_in_s, **kw)
                await store.create_key(rec)
            finally:
                await store.close()
            return key_id, token
        return asyncio.run(go())

    def end_grace(self, key_id: str) -> None:
        """A rotated key's grace ends now: its expiry brought to the present, instead of waiting for it."""
        async def go() -> None:
            async with await open_store(self.settings.store, self.data_dir) as store:
                assert await store.shorten_expiry(key_id, time.time())
        asyncio.run(go())

    def revoke(self, key_id: str) -> None:
        async def go() -> None:
            store = await open_store(self.settings.store, self.data_dir)
            try:
                await store.revoke_key(key_id, time.time())
            finally:
                await store.close()
        asyncio.run(go())


@contextmanager
def gateway_via(root: Path, http: TcpRelay, grpc: TcpRelay | None = None, **overrides: Any) -> Iterator[Gateway]:
    """A started Gateway whose upstream is the relay `http` (and `grpc`), so a test sees what reached Triton."""
    if grpc is not None:
        overrides["upstream.grpc_target"] = f"127.0.0.1:{grpc.port}"
    gw = Gateway(root, f"http://127.0.0.1:{http.port}", free_ports(3), **overrides).start()
    try:
        yield gw
    finally:
        gw.stop()
