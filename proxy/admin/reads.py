"""Routes the read-only admin resources the console needs: admin:audit (audit, usage, overview), admin:policies."""

from __future__ import annotations

from aiohttp import web

from ..steps.app_state import STATE
from .audit import handle_audit, handle_overview, handle_usage
from .policies import handle_policies

RESOURCES = frozenset({"admin:audit", "admin:policies"})


async def handle_reads(request: web.Request, body: bytes | None = None) -> web.Response:
    """One request classify sent to admin:audit or admin:policies (route and method checked there)."""
    path = request.path
    base = request.app[STATE].settings.server.base_path
    if base and path.startswith(base + "/"):
        path = path[len(base):]
    parts = tuple(p for p in path.split("/") if p)[2:]   # after admin, v1
    if parts[0] == "audit":
        return await handle_audit(request, parts[1:])
    if parts[0] == "usage":
        return await handle_usage(request)
    if parts[0] == "overview":
        return await handle_overview(request)
    return await handle_policies(request, parts[1:], body)
