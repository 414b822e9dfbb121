"""The long-lived resources one seekgate process holds, shared by the HTTP and gRPC front ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..audit.writer import AuditWriter
from ..context import RequestContext
from ..keys.cache import KeyCache
from ..keys.rotation import Keyring
from ..keys.sessions import SessionAuthority
from ..metrics import Metrics
from ..settings import Settings
from ..state.limits import Limiter, LocalLimiter
from ..state.sign_in_guard import SignInGuard
from ..store.backend import Store
from ..store.postgres import PostgresStore
from ..upstream.models import MaxTokensDefaults
from ..upstream.pool import UpstreamPool
from .authz import Authorizer, PolicyWatcher


@dataclass
class AppState:
    settings: Settings
    data_dir: Path
    store: Store
    pepper: bytes
    authorizer: Authorizer
    watcher: PolicyWatcher
    audit: AuditWriter
    metrics: Metrics
    upstream: UpstreamPool
    internal_key: str | None = None   # unlocks Triton's shared-memory API; None if Triton runs elsewhere
    limiter: Limiter = field(default_factory=LocalLimiter)   # per-key rates and budgets (state/limits.py)
    sessions: SessionAuthority | None = None   # session JWTs (keys/sessions.py); None: API keys only
    key_cache: KeyCache | None = None   # verified keys and sessions (keys/cache.py); None: every request reads the store
    # Failed sign-ins per client address (state/sign_in_guard.py); None: not limited
    sign_in_guard: SignInGuard | None = None
    keyring: Keyring | None = None   # this process's envelope, signing keys and pepper: the crypto admin API
    # Models' own max_tokens defaults, for the role cap when a request names none (None: refused then),
    # and caps, the OpenAI door's chat default (None: openai.default_max_tokens then).
    max_tokens_defaults: MaxTokensDefaults | None = None
    # Set on SIGTERM: readiness answers 503 at once so load balancers move away while in-flight
    # requests finish. `grpc_stopped` is set once the gRPC front end has drained, so the
    # audit writer closes only after its last records.
    draining: bool = False
    grpc_stopped: asyncio.Event | None = None
    # Closes the status listener (server.status_listen), once both front ends have drained and before the
    # audit writer closes: a probe it answered later would be served with no record. None: no such listener.
    close_status: Callable[[], Awaitable[None]] | None = None

    def store_down(self) -> bool:
        """A shared store this process cannot reach (its listener pings every 0.25 s): readiness fails meanwhile.

        Uncached keys are refused then, so a load balancer should send traffic to replicas that can
        check them. SQLite is a file of this host: never "down" in this sense.
        """
        return isinstance(self.store, PostgresStore) and not self.store.listener.connected

    def unready_because(self) -> str | None:
        """Why readiness fails besides draining: "store" (above), "limiter" (Redis unreachable under
        limits.on_backend_down=closed: every limited request would get 503), or None."""
        if self.store_down():
            return "store"
        if self.limiter.refusing():
            return "limiter"
        return None


STATE: web.AppKey[AppState] = web.AppKey("seekgate_state", AppState)
CTX: web.RequestKey[RequestContext] = web.RequestKey("seekgate_ctx", RequestContext)
