"""The /admin/v1 API: keys (create, list, show, rotate, revoke) and session revocation, for an authorised caller.

Every call is audited by the pipeline's record for it: `admin.action` and `admin.target` say what
was done to which key or session, and for changes `admin.before` / `admin.after` map each key id it
changed to the key's public view (as listings show it; never a secret or its hash) before and after.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from ..audit.pg_index import pool_of
from ..audit.search import minted_sessions
from ..keys.issue import TIER_DEFAULT, ExpiresIn, audited_views, is_key_id, issue_key, parse_duration, public_view
from ..keys.lifecycle import LifecycleError, compromise_key, key_and_children, records_of, rotate_key, subtree_records
from ..keys.sessions import is_jti
from ..quotas import parse_limits
from ..steps.app_state import CTX, STATE
from ..store import StoreConflict
from ..store.backend import open_secret_rows
from .paging import decode_cursor, next_link, parse_size

PREFIX = ("admin", "v1")
RESOURCES = ("keys", "sessions")
# The only query parameters GET /admin/v1/keys takes: any other (owner=, status=) would filter nothing, and
# a client would take every key for the ones it asked for. Refused, as the audit search refuses its own.
_LIST_PARAMS = frozenset({"size", "offset", "expiring"})
# Everything POST /admin/v1/keys accepts; anything else is a typo and refused, not ignored.
_CREATE_FIELDS = frozenset({"tier", "name", "owner", "roles", "labels", "models",
                            "allowed_cidrs", "parent_id", "expires", "limits"})


class Reply(Exception):
    """An error reply in Triton's format, raised from deep inside a handler."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _segments(request: web.Request) -> tuple[str, tuple[str, ...]]:
    """("keys" | "sessions", the path segments after /admin/v1/<that>), base path and "" segments dropped."""
    path = request.path
    base = request.app[STATE].settings.server.base_path
    if base and (path == base or path.startswith(base + "/")):
        path = path[len(base):]
    parts = tuple(p for p in path.split("/") if p)
    if parts[:2] != PREFIX or len(parts) < 3 or parts[2] not in RESOURCES:
        raise Reply(404, "not found")
    return parts[2], parts[3:]


def note(request: web.Request, action: str, target: str | None = None, detail: str | dict[str, Any] | None = None, *,
          before: dict[str, Any] | None = None, after: dict[str, Any] | None = None) -> None:
    """What the audit record says this admin call did: ids and public views only, never a key."""
    ctx = request.get(CTX)
    if ctx is not None:
        ctx.extra["admin_action"] = action
        for name, value in (("target", target), ("detail", detail), ("before", before), ("after", after)):
            if value is not None:
                ctx.extra[f"admin_{name}"] = value


async def handle_admin(request: web.Request, body: bytes | None = None) -> web.Response:
    """Route one /admin/v1 request. `body`: the request body if the caller already read it."""
    try:
        kind, rest = _segments(request)
        method = request.method
        if kind == "sessions":
            return await _sessions(request, rest, body)
        if not rest:
            if method == "POST":
                return await _create(request, body)
            if method == "GET":
                return await _list(request)
            raise Reply(405, f"method {method} not allowed", {"Allow": "GET, POST"})
        key_id = rest[0]
        if len(rest) == 1:
            if method == "GET":
                return await _show(request, key_id)
            if method == "DELETE":
                return await _revoke(request, key_id)
            raise Reply(405, f"method {method} not allowed", {"Allow": "GET, DELETE"})
        if len(rest) == 2 and rest[1] == "sessions":
            if method != "GET":
                raise Reply(405, f"method {method} not allowed", {"Allow": "GET"})
            return await _live_sessions(request, key_id)
        if len(rest) == 2 and rest[1] in ("revoke", "rotate"):
            if method != "POST":
                raise Reply(405, f"method {method} not allowed", {"Allow": "POST"})
            doc = optional_json(await request.read() if body is None else body)
            if rest[1] == "rotate":
                return await _rotate(request, key_id, doc)
            if doc.get("compromised") is True:
                return await _compromised(request, key_id)
            if set(doc) - {"compromised"} or doc.get("compromised") not in (None, False):
                raise Reply(400, 'revoke takes {} or {"compromised": true}')
            return await _revoke(request, key_id)
        raise Reply(404, "not found")
    except Reply as r:
        return error_reply(r.status, r.message, r.headers)


async def _list(request: web.Request) -> web.Response:
    """GET /admin/v1/keys[?expiring=72h][&size=100][&offset=<cursor>]: one page in key id order, and `next`.

    `next` is the path and query of the following page (null on the last), as Kong's admin API pages.
    """
    note(request, "keys.list")
    state = request.app[STATE]
    now = time.time()
    unknown = sorted(set(request.query) - _LIST_PARAMS)
    if unknown:
        raise Reply(400, f"unknown parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(_LIST_PARAMS))})")
    try:
        size = parse_size(request.query.get("size"))
        after = decode_cursor(request.query.get("offset"))
    except ValueError as exc:
        raise Reply(400, str(exc)) from None
    expiring = None
    if (within := request.query.get("expiring")) is not None:
        try:
            within_s = parse_duration(within)
        except ValueError as exc:
            raise Reply(400, f"expiring: {exc}") from None
        if within_s is None:
            raise Reply(400, 'expiring must be a duration such as "72h"')
        expiring = (now, now + within_s)
    # One more than the page: whether a next page exists, without a count or an empty last page.
    recs = await state.store.page_keys(size + 1, after, expiring)
    more = len(recs) > size
    recs = recs[:size]
    return web.json_response({"keys": [public_view(r, now) for r in recs],
                              "next": next_link(request.rel_url, recs[-1].key_id) if more else None})


async def _show(request: web.Request, key_id: str) -> web.Response:
    note(request, "keys.show", key_id)
    rec = await request.app[STATE].store.get_key(key_id) if is_key_id(key_id) else None
    if rec is None:
        raise Reply(404, f"key {key_id!r} not found")
    return web.json_response(public_view(rec))


async def _live_sessions(request: web.Request, key_id: str) -> web.Response:
    """GET /admin/v1/keys/<id>/sessions: the sessions this key minted that still work, newest first.

    Minted within the session TTL (from the audit index), not revoked (the denylist), and under a
    key that is itself still active: revoking a key ends its sessions.
    """
    note(request, "keys.sessions", key_id)
    state = request.app[STATE]
    rec = await state.store.get_key(key_id) if is_key_id(key_id) else None
    if rec is None:
        raise Reply(404, f"key {key_id!r} not found")
    now = time.time()
    if state.sessions is None or public_view(rec, now)["status"] != "active":
        return web.json_response({"key_id": key_id, "sessions": []})
    ttl = state.sessions.ttl_s
    rows = await open_secret_rows(state.store)
    live = []
    for s in await minted_sessions(state.data_dir, key_id, now - ttl, pool_of(state.store)):
        if not await rows.session_revoked(s["jti"]):
            live.append({**s, "expires_at": s["minted_at"] + ttl})
    return web.json_response({"key_id": key_id, "sessions": live})


async def _revoke(request: web.Request, key_id: str) -> web.Response:
    note(request, "keys.revoke", key_id)
    store = request.app[STATE].store
    if not is_key_id(key_id) or await store.get_key(key_id) is None:
        raise Reply(404, f"key {key_id!r} not found")
    before = await subtree_records(store, key_id)
    now = time.time()
    # Revoking an already revoked key is not an error: it reports 0 newly revoked.
    count = await store.revoke_key(key_id, now)
    note(request, "keys.revoke", key_id, f"{count} newly revoked of {len(before)} key(s)",
          before=audited_views(before, now),
          after=audited_views(await records_of(store, (r.key_id for r in before)), now))
    return web.json_response({"revoked": count})


async def _sessions(request: web.Request, rest: tuple[str, ...], body: bytes | None) -> web.Response:
    """POST /admin/v1/sessions/<jti>/revoke: that session token is refused from the next request on.

    Session tokens are not stored, so a well-formed jti can't be told apart from one never issued:
    it is revoked either way (ahead of its use, if need be) and the answer says whether it was new,
    {"jti": ..., "revoked": 1 | 0}, as `seekgate sessions revoke` does. A malformed jti was never
    issued: 404.
    """
    if len(rest) != 2 or rest[1] != "revoke":
        raise Reply(404, "not found")
    jti = rest[0]
    note(request, "sessions.revoke", jti if is_jti(jti) else None)
    if request.method != "POST":
        raise Reply(405, f"method {request.method} not allowed", {"Allow": "POST"})
    if not is_jti(jti):
        raise Reply(404, "session not found: a session id (jti) is 32 hex digits")
    if optional_json(await request.read() if body is None else body):
        raise Reply(400, "revoking a session takes no body (or {})")
    rows = await open_secret_rows(request.app[STATE].store)
    was = await rows.session_revoked(jti)
    added = await rows.revoke_session(jti, time.time())
    note(request, "sessions.revoke", jti, None if added else "already revoked",
          before={jti: {"revoked": was}}, after={jti: {"revoked": True}})
    return web.json_response({"jti": jti, "revoked": int(added)})


async def _create(request: web.Request, body: bytes | None) -> web.Response:
    note(request, "keys.create")
    state = request.app[STATE]
    spec = _parse_create(await request.read() if body is None else body)
    try:
        rec, token = await issue_key(state.store, state.pepper, now=time.time(), **spec)
    except (ValueError, StoreConflict) as exc:   # StoreConflict is a ValueError; named for clarity
        raise Reply(400, str(exc)) from None
    note(request, "keys.create", rec.key_id, before={}, after=audited_views([rec], rec.created_at))
    return web.json_response({"key_id": rec.key_id, "key": token, **public_view(rec)}, status=201,
                             headers={"Cache-Control": "no-store"})   # the only time the key is shown


async def _rotate(request: web.Request, key_id: str, doc: dict[str, Any]) -> web.Response:
    """POST /admin/v1/keys/<id>/rotate {"grace": "24h"}: a successor now, the old key until the grace ends.

    A key already rotated (in its grace, its successor named in `successor_id`) is refused with 409
    naming the successor: rotate that one instead (keys/lifecycle.rotate_key).
    """
    note(request, "keys.rotate", key_id)
    if set(doc) - {"grace"} or not isinstance(doc.get("grace"), str):
        raise Reply(400, 'rotate takes {"grace": "24h"} (a duration: d, h, m or s)')
    try:
        grace = parse_duration(doc["grace"])
    except ValueError as exc:
        raise Reply(400, f"grace: {exc}") from None
    if grace is None:
        raise Reply(400, "grace must be a duration, not never")
    state = request.app[STATE]
    key_id = key_id if is_key_id(key_id) else ""
    # The key and its children: the devices of an app key move to the successor.
    before = await key_and_children(state.store, key_id)
    now = time.time()
    try:
        rot = await rotate_key(state.store, state.pepper, key_id, grace, now=now)
    except LifecycleError as exc:
        raise Reply(refusal_status(exc), str(exc)) from None
    note(request, "keys.rotate", key_id, f"successor {rot.new.key_id}"
          + (f"; devices moved to it: {','.join(rot.moved)}" if rot.moved else ""),
          before=audited_views(before, now),
          after=audited_views([rot.old, rot.new, *await records_of(state.store, rot.moved)], now))
    return web.json_response({"old": public_view(rot.old), "key_id": rot.new.key_id, "key": rot.token,
                              **public_view(rot.new), "moved": list(rot.moved)},
                             status=201, headers={"Cache-Control": "no-store"})


async def _compromised(request: web.Request, key_id: str) -> web.Response:
    """POST /admin/v1/keys/<id>/revoke {"compromised": true}: revoke the subtree, replace, report."""
    note(request, "keys.revoke_compromised", key_id)
    state = request.app[STATE]
    ctx = request.get(CTX)
    actor = ctx.principal.key_id if ctx is not None and ctx.principal is not None else None
    key_id = key_id if is_key_id(key_id) else ""
    before = await subtree_records(state.store, key_id)
    now = time.time()
    try:
        # The writer is flushed first, so uses up to this moment are in the report.
        done = await compromise_key(state.store, state.pepper, state.data_dir, key_id, now=now, actor=actor,
                                    audit=state.audit)
    except LifecycleError as exc:
        raise Reply(refusal_status(exc), str(exc)) from None
    note(request, "keys.revoke_compromised", key_id,
          f"revoked {','.join(done.revoked)}; replacement {done.new.key_id}",
          before=audited_views(before, now),
          after=audited_views([*await records_of(state.store, done.revoked), done.new], now))
    return web.json_response({"revoked": done.revoked,
                              "replacement": {"key_id": done.new.key_id, "key": done.token,
                                              **public_view(done.new)},
                              "report": done.report, "report_path": str(done.report_path)},
                             headers={"Cache-Control": "no-store"})


def refusal_status(exc: LifecycleError) -> int:
    """404 for an unknown key, 409 for one whose state forbids the operation (rotated already), else 400."""
    return 404 if exc.not_found else 409 if exc.conflict else 400


def optional_json(raw: bytes) -> dict[str, Any]:
    """An optional JSON object body: empty means {}."""
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Reply(400, "request body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise Reply(400, "request body must be a JSON object")
    return doc


def _parse_create(raw: bytes) -> dict[str, Any]:
    """The JSON body of POST /admin/v1/keys as issue_key keyword arguments; 400 on anything odd."""
    if not raw.strip():
        raise Reply(400, "request body is empty: send a JSON object with at least tier and name")
    doc = optional_json(raw)
    unknown = sorted(set(doc) - _CREATE_FIELDS)
    if unknown:
        raise Reply(400, f"unknown field(s): {', '.join(unknown)}")
    name, owner = doc.get("name"), doc.get("owner")
    if name is not None and owner is not None and name != owner:
        raise Reply(400, "give either name or owner (they are the same thing), not both")
    if not isinstance(doc.get("tier"), str):
        raise Reply(400, "tier is required: app, device or user")
    spec: dict[str, Any] = {
        "tier": doc["tier"],
        "owner": _string(owner if owner is not None else name, "name"),
        "roles": _string_list(doc.get("roles"), "roles"),
        "models": _string_list(doc.get("models"), "models"),
        "allowed_cidrs": _string_list(doc.get("allowed_cidrs"), "allowed_cidrs"),
        "labels": _labels(doc.get("labels")),
        "parent_id": None if doc.get("parent_id") is None else _string(doc["parent_id"], "parent_id"),
        "expires_in_s": _expires(doc.get("expires")),
        "limits": _limits(doc.get("limits")),
    }
    return spec


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise Reply(400, f"{field} is required and must be a non-empty string")
    return value


def _string_list(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Reply(400, f"{field} must be a list of strings")
    return value


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise Reply(400, "labels must be an object of string values")
    return value


def _limits(value: Any) -> dict[str, int]:
    """{"rpm": 60, "tpm": 0, ...}: the limits the key sets itself (0 = unlimited, absent = tier default)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Reply(400, "limits must be an object such as {\"rpm\": 60, \"daily_tokens\": 100000}")
    try:
        return parse_limits(value)
    except ValueError as exc:
        raise Reply(400, f"limits: {exc}") from None


def _expires(value: Any) -> ExpiresIn:
    if value is None:
        return TIER_DEFAULT
    if not isinstance(value, str):
        raise Reply(400, 'expires must be a duration string such as "90d", "12h" or "never"')
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise Reply(400, f"expires: {exc}") from None
