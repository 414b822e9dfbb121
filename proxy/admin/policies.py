"""The /admin/v1/policies API: the rules in force (file, line, effect, conditions), the last reload, and an evaluator.

POST /admin/v1/policies/evaluate answers "would this be allowed?" with the same classify and authorize
calls the request path makes, so the answer cannot drift from what a real request would get.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ..context import Principal
from ..errors import SeekgateError
from ..keys.issue import is_key_id
from ..steps.app_state import STATE
from ..steps.authn import check_chain, effective_models
from ..steps.authz import Authorizer
from ..steps.classify import classify_http
from ..steps.policy import TIERS, Rule
from .keys import Reply, error_reply, note, optional_json

_EVAL_FIELDS = frozenset({"key_id", "principal", "method", "path", "client_ip", "time"})
_PRINCIPAL_FIELDS = frozenset({"tier", "owner", "roles", "labels", "models"})
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD"})


def rule_view(rule: Rule) -> dict[str, Any]:
    """One rule as the console lists it: where it is written, what it decides, and on which conditions."""
    file, _, line = rule.source.rpartition(":")
    s, e = rule.subject, rule.environment
    subject = {k: v for k, v in (("roles", list(s.roles)), ("not_roles", list(s.not_roles)),
                                 ("tiers", list(s.tiers)), ("owners", list(s.owners)),
                                 ("labels", dict(s.labels)), ("key_may_use_model", s.key_may_use_model))
               if v not in ([], {}, None)}
    env = {k: v for k, v in (("client_ips", [str(n) for n in e.client_ips]),
                             ("hours", [f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}" for a, b in e.hours]))
           if v}
    return {"id": rule.id, "effect": rule.effect, "file": file, "line": int(line) if line.isdigit() else None,
            "resources": list(rule.resources), "actions": list(rule.actions), "subject": subject,
            "environment": env, "limits": dict(rule.limits), "description": rule.description}


async def handle_policies(request: web.Request, rest: tuple[str, ...], body: bytes | None) -> web.Response:
    """GET /admin/v1/policies and POST /admin/v1/policies/evaluate (classify has checked route and method)."""
    state = request.app[STATE]
    try:
        if not rest:
            note(request, "policies.list")
            policy = state.authorizer.policy
            return web.json_response({"version": state.authorizer.version,
                                      "files": [str(f) for f in policy.files],
                                      "rules": [rule_view(r) for r in policy.rules],
                                      "last_reload": state.watcher.last_reload})
        note(request, "policies.evaluate")
        doc = optional_json(await request.read() if body is None else body)
        answer = await evaluate(request, state.authorizer, doc)
        note(request, "policies.evaluate", detail={"question": doc, "allowed": answer["allowed"],
                                                   "rule": answer["rule"]})
        return web.json_response(answer)
    except Reply as r:
        return error_reply(r.status, r.message, r.headers)


async def evaluate(request: web.Request, authorizer: Authorizer, doc: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(doc) - _EVAL_FIELDS)
    if unknown:
        raise Reply(400, f"unknown field(s): {', '.join(unknown)}")
    method, path = doc.get("method", "POST"), doc.get("path")
    # isinstance first: a JSON list or object is not hashable, and `in` a frozenset raised (a 500).
    if not isinstance(method, str) or method not in _METHODS:
        raise Reply(400, f"method must be one of {', '.join(sorted(_METHODS))}")
    if not isinstance(path, str) or not path.startswith("/"):
        raise Reply(400, "path is required: a request path such as /v2/models/deepseek/generate")
    client_ip = doc.get("client_ip") or "127.0.0.1"
    try:
        if not isinstance(client_ip, str):   # ip_address() takes an int too: 5 is no client's address
            raise ValueError(client_ip)
        ipaddress.ip_address(client_ip)
    except ValueError:
        raise Reply(400, f"client_ip: {client_ip!r} is not an IP address") from None
    when = datetime.now(timezone.utc)
    if doc.get("time"):
        try:
            when = datetime.fromisoformat(str(doc["time"]).replace("Z", "+00:00"))
        except ValueError:
            raise Reply(400, f"time: {doc['time']!r} is not an ISO 8601 time") from None
        try:
            # In UTC now, as the hours of a rule are: an offset that carries a time past year 1 or 9999
            # overflowed there, inside the authorizer (a 500), only when some rule had hours.
            when = when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)
        except OverflowError:
            raise Reply(400, f"time: {doc['time']!r} is out of range") from None
    principal, refused = await _principal(request, doc, client_ip, when.timestamp())
    try:
        resource = classify_http(method, path.split("?", 1)[0])
    except SeekgateError as err:
        return {"allowed": False, "rule": None, "stage": "classify", "reason": err.reason,
                "http_status": err.http_status, "resource": None, "action": None}
    base = {"resource": resource.resource, "action": resource.action, "model": resource.model}
    if refused is not None:   # the key itself would be turned away before any rule is read
        return {"allowed": False, "rule": None, "stage": "authenticate", "reason": refused, "http_status": 401, **base}
    decision = authorizer.authorize(principal, resource, client_ip, when)
    return {"allowed": decision.allowed, "rule": decision.rule, "stage": "authorize",
            "reason": None if decision.allowed else "policy_denied",
            "http_status": None if decision.allowed else 403, **base}


async def _principal(request: web.Request, doc: dict[str, Any], client_ip: str,
                     now: float) -> tuple[Principal, str | None]:
    """The principal a stored key (its chain, as authentication builds it) or given attributes describe."""
    if doc.get("key_id") is not None:
        key_id = doc["key_id"]
        chain = await request.app[STATE].store.get_chain(key_id) if isinstance(key_id, str) and is_key_id(key_id) \
            else []
        if not chain or chain[0].key_id != key_id:
            raise Reply(404, f"key {key_id!r} not found")
        key = chain[0]
        refused = None
        try:
            check_chain(chain, client_ip, now)
        except SeekgateError as err:
            refused = err.reason
        return Principal(key_id=key.key_id, tier=key.tier, owner=key.owner, roles=key.roles,
                         labels=dict(key.labels), models=effective_models(chain),
                         parents=tuple(r.key_id for r in chain[1:])), refused
    attrs = doc.get("principal")
    if not isinstance(attrs, dict) or set(attrs) - _PRINCIPAL_FIELDS:
        raise Reply(400, f"give key_id, or principal: an object of {', '.join(sorted(_PRINCIPAL_FIELDS))}")
    tier = attrs.get("tier", "user")
    if not isinstance(tier, str) or tier not in TIERS:
        raise Reply(400, f"principal.tier must be one of {', '.join(sorted(TIERS))}")
    lists = {}
    for name in ("roles", "models"):
        value = attrs.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Reply(400, f"principal.{name} must be a list of strings")
        lists[name] = tuple(value)
    labels = attrs.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise Reply(400, "principal.labels must be an object of string values")
    owner = attrs.get("owner", "")
    if not isinstance(owner, str):   # str() of a list would be an owner no key has, and a wrong answer
        raise Reply(400, "principal.owner must be a string")
    return Principal(key_id="(evaluated)", tier=tier, owner=owner, labels=labels,
                     **lists), None


