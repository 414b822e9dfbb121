"""The long-lived resources one seekgate process holds, shared by the HTTP and gRPC front ends."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from .audit import AuditWriter
from .authz import Authorizer, PolicyWatcher
from .context import RequestContext
from .metrics import Metrics
from .settings import Settings
from .store.sqlite import SqliteStore


@dataclass
class AppState:
    settings: Settings
    data_dir: Path
    store: SqliteStore
    pepper: bytes
    authorizer: Authorizer
    watcher: PolicyWatcher
    audit: AuditWriter
    metrics: Metrics
    upstream: aiohttp.ClientSession
    internal_key: str | None = None   # unlocks Triton's shared-memory API; None if Triton runs elsewhere


STATE: web.AppKey[AppState] = web.AppKey("seekgate_state", AppState)
CTX: web.RequestKey[RequestContext] = web.RequestKey("seekgate_ctx", RequestContext)
