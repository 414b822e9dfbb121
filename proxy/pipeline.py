"""The protocol-free request path: authenticate -> classify -> authorize, and the audit+metrics finish.

The HTTP middleware and the gRPC servicer are thin adapters over these calls, so
the two front ends can never disagree about who may do what.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone

from .app_state import AppState
from .audit import build_record
from .authn import authenticate, parse_bearer
from .context import RequestContext, Resource
from .errors import Forbidden, SeekgateError


async def admit(state: AppState, ctx: RequestContext, authorization: str | None,
                classify: Callable[[], Resource]) -> None:
    """Fills ctx.principal, ctx.resource and ctx.rule, or raises the refusal.

    Authentication comes before classification on purpose: an anonymous caller gets
    the same 401 for every route and learns nothing about which routes exist.
    """
    token = parse_bearer(authorization)
    ctx.principal = await authenticate(token, state.store, state.pepper, ctx.client_ip, time.time())
    ctx.resource = classify()
    authorize(state, ctx, ctx.resource)


def authorize(state: AppState, ctx: RequestContext, resource: Resource) -> None:
    """The policy decision for one resource; also used per message on gRPC streams."""
    assert ctx.principal is not None
    decision = state.authorizer.authorize(ctx.principal, resource, ctx.client_ip, datetime.now(timezone.utc))
    ctx.rule = decision.rule
    if not decision.allowed:
        raise Forbidden("policy_denied")


def names_shared_memory(body: bytes) -> bool:
    # Naming a region lets a caller read or overwrite memory that someone else registered.
    return b"shared_memory_region" in body


def check_body(ctx: RequestContext, body: bytes) -> None:
    """Body-level policy: only admins may point an inference at shared memory."""
    if ctx.resource is not None and ctx.resource.action == "infer" and names_shared_memory(body) \
            and not (ctx.principal is not None and "admin" in ctx.principal.roles):
        ctx.rule = "shared_memory_in_body"
        raise Forbidden("shared_memory_in_body")


def refuse(ctx: RequestContext, err: SeekgateError) -> None:
    """Records a refusal on the context; the front end renders it in its own protocol."""
    ctx.status, ctx.reason, ctx.http_status = err.audit_status, err.reason, err.http_status


def finish(state: AppState, ctx: RequestContext) -> None:
    """One audit record and one metrics observation per request, whatever happened."""
    if ctx.http_status >= 500 and ctx.status == "allowed":
        ctx.status = "error"
    duration_ms = ctx.elapsed_ms()
    state.audit.submit(build_record(ctx, duration_ms=duration_ms))
    state.metrics.observe_request(ctx, duration_s=duration_ms / 1000.0)
