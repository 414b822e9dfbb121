"""The /admin/v1 audit reads: search (JSON pages or a JSONL export), one record, usage per key/owner/model, overview.

Read-only and thin over audit/search.py; each call is audited like every other admin call
(`admin.action` audit.search, audit.show, usage, overview).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web
from aiohttp.payload import AsyncIterablePayload

from ..audit.pg_index import pool_of
from ..audit.search import (
    EQUALITY_FILTERS,
    GROUPS,
    MAX_PAGE,
    PERIODS,
    AuditQuery,
    count,
    export,
    overview,
    record,
    search,
    usage,
)
from ..steps.app_state import CTX, STATE
from .keys import Reply, error_reply, note

_SEARCH_PARAMS = frozenset({*EQUALITY_FILTERS, "reason", "since", "until", "limit", "offset", "format"})
_STATUSES = frozenset({"allowed", "denied", "error"})
MAX_EXPORT = 100_000

log = logging.getLogger("seekgate.admin")


def _epoch(name: str, value: str) -> float:
    """An ISO 8601 time (naive means UTC) or epoch seconds."""
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # "nan", "inf" and "1e400" are floats to Python but no time: a nan bound matched nothing, so the
        # search quietly came back empty as if the log had no such records.
        if not math.isfinite(seconds):
            raise Reply(400, f"{name}: {value!r} is not a time")
        return seconds
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Reply(400, f"{name}: {value!r} is neither an ISO 8601 time nor epoch seconds") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _count(name: str, value: str | None, default: int, high: int) -> int:
    if value is None:
        return default
    # ASCII digits only, and no more of them than `high` has: str.isdigit() also passes "²", which
    # int() refuses, and int() refuses a string past 4300 digits; either was a 500, not this 400.
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(high)) or int(value) > high:
        raise Reply(400, f"{name} must be a whole number from 0 to {high}")
    return int(value)


def parse_query(params: Any, export: bool = False) -> AuditQuery:
    """The query string of GET /admin/v1/audit as an AuditQuery; 400 on an unknown or malformed filter."""
    unknown = sorted(set(params) - _SEARCH_PARAMS)
    if unknown:
        raise Reply(400, f"unknown filter(s): {', '.join(unknown)} (known: {', '.join(sorted(_SEARCH_PARAMS))})")
    for name, value in params.items():
        if "\x00" in value:
            # No record holds a NUL, and PostgreSQL's text refuses one: asked of the shared index, a 500.
            raise Reply(400, f"{name} must not contain a NUL character")
    equals = tuple((k, params[k]) for k in sorted(EQUALITY_FILTERS) if params.get(k))
    status = params.get("status")
    if status and status not in _STATUSES:
        raise Reply(400, "status must be allowed, denied or error")
    if params.get("client_ip"):
        try:
            ipaddress.ip_address(params["client_ip"])
        except ValueError:
            raise Reply(400, f"client_ip: {params['client_ip']!r} is not an IP address") from None
    since = _epoch("since", params["since"]) if params.get("since") else None
    until = _epoch("until", params["until"]) if params.get("until") else None
    if since is not None and until is not None and until <= since:
        raise Reply(400, "until must be after since")
    top = MAX_EXPORT if export else MAX_PAGE
    return AuditQuery(equals, params.get("reason") or None, since, until,
                      _count("limit", params.get("limit"), top if export else 50, top),
                      _count("offset", params.get("offset"), 0, 10**9))


async def handle_audit(request: web.Request, rest: tuple[str, ...]) -> web.Response:
    """GET /admin/v1/audit[?filters][&format=jsonl] and GET /admin/v1/audit/<event_id>."""
    try:
        data_dir = request.app[STATE].data_dir
        if rest:
            note(request, "audit.show", rest[0])
            if len(rest) != 1:
                raise Reply(404, "not found")
            found = await record(data_dir, rest[0], pool_of(request.app[STATE].store))
            if found is None:
                raise Reply(404, f"audit record {rest[0]!r} not found")
            return web.json_response(found)
        export = request.query.get("format") == "jsonl"
        if request.query.get("format") not in (None, "json", "jsonl"):
            raise Reply(400, "format must be json or jsonl")
        query = parse_query(request.query, export)
        note(request, "audit.export" if export else "audit.search",
             detail={k: v for k, v in request.query.items() if k != "format"} or None)
        if export:
            return await _export(request, query)
        rows, total = await search(data_dir, query, pool_of(request.app[STATE].store))
        return web.json_response({"records": rows, "total": total, "limit": query.limit, "offset": query.offset})
    except Reply as r:
        return error_reply(r.status, r.message, r.headers)


async def _export(request: web.Request, query: AuditQuery) -> web.Response:
    """GET /admin/v1/audit?format=jsonl: every match as JSON lines, streamed from the index in batches.

    Everything that can refuse is decided before the answer starts, so a 400 is still a 400. The body
    is an async iterable: the request path commits the audit record (strict audit) before aiohttp sends
    a byte, as for any answer, then aiohttp writes it chunked, a batch a chunk.
    """
    state = request.app[STATE]
    pool = pool_of(state.store)
    total = await count(state.data_dir, query, pool)
    if "limit" not in request.query and total - query.offset > MAX_EXPORT:
        # Cut at MAX_EXPORT, an export came back short of the oldest matches with nothing to say so:
        # a compliance extract missing records looks whole. Asked-for pages (limit) are the way past it.
        raise Reply(400, f"{total} records match; an export carries at most {MAX_EXPORT}: "
                         "narrow since/until, or page with limit and offset")
    lines = _jsonl(request, export(state.data_dir, query, pool))
    return web.Response(body=AsyncIterablePayload(lines, content_type="application/x-ndjson"), headers={
        "Content-Disposition": 'attachment; filename="seekgate-audit.jsonl"'})


async def _jsonl(request: web.Request, batches: AsyncGenerator[list[dict[str, Any]], None]
                 ) -> AsyncIterator[bytes]:
    """The export's body, one batch of lines a chunk. An index failure mid-way ends it visibly broken."""
    sent = 0
    async with aclosing(batches):   # the index reader ends with this body, however it ends
        try:
            async for rows in batches:
                yield b"".join(orjson.dumps(r) + b"\n" for r in rows)
                sent += len(rows)
        except Exception as exc:
            # The status line went out long ago. Ending the body normally (the last, empty chunk) would
            # pass a truncated file off as the whole export: the connection is aborted instead, so
            # every client sees an incomplete transfer; the record and the log say why.
            log.error("audit export aborted after %d record(s): the index failed: %r", sent, exc)
            if (ctx := request.get(CTX)) is not None:
                ctx.status, ctx.reason = "error", f"export_broke_mid_response: {type(exc).__name__}"
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("audit export aborted: the index failed") from exc


async def handle_usage(request: web.Request) -> web.Response:
    """GET /admin/v1/usage?group=key|owner|model&period=day|month&days=N: served tokens, with budgets per key."""
    note(request, "usage")
    try:
        unknown = sorted(set(request.query) - {"group", "period", "days"})
        if unknown:
            raise Reply(400, f"unknown parameter(s): {', '.join(unknown)} (known: days, group, period)")
        group, period = request.query.get("group", "key"), request.query.get("period", "day")
        if group not in GROUPS:
            raise Reply(400, "group must be key, owner or model")
        if period not in PERIODS:
            raise Reply(400, "period must be day or month")
        days = _count("days", request.query.get("days"), 31 if period == "day" else 366, 3660)
        state = request.app[STATE]
        # Every replica's served requests where they share a store; this node's own otherwise.
        rows = await usage(state.data_dir, group, period, time.time() - days * 86400, pool_of(state.store))
        budgets: dict[str, dict[str, int]] = {}
        if group == "key":
            field = "daily_tokens" if period == "day" else "monthly_tokens"
            for key_id in {r["key"] for r in rows}:
                rec = await state.store.get_key(key_id)
                if rec is not None and rec.limits.get(field):
                    budgets[key_id] = {field: rec.limits[field]}
        return web.json_response({"group": group, "period": period, "rows": rows, "budgets": budgets})
    except Reply as r:
        return error_reply(r.status, r.message, r.headers)


async def handle_overview(request: web.Request) -> web.Response:
    """GET /admin/v1/overview: the console's first page, from seekgate's own audit index and health watch."""
    note(request, "overview")
    state = request.app[STATE]
    doc = await overview(state.data_dir, pool=pool_of(state.store))
    doc["triton_up"] = getattr(state.metrics, "upstream_seen_up", None)   # None: not probed yet
    return web.json_response(doc)
