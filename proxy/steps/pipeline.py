"""The protocol-free request path: authenticate -> classify -> authorize, and the audit+metrics finish.

The HTTP handler and the gRPC servicer are thin adapters over these calls, so
the two front ends can never disagree about who may do what.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from ..audit.writer import build_record
from ..context import Principal, RequestContext, Resource
from ..errors import AuditUnavailable, BadRequest, Forbidden, SeekgateError, Unauthenticated
from ..keys.sessions import MINTING_TIERS
from ..quotas import LIMIT_FIELDS, Limits, parse_role_caps
from ..settings import BodySettings, LimitsSettings
from ..state.limits import Grant, OverLimit, Scope, max_tokens_cap
from ..upstream.models import MaxTokensDefault
from .app_state import AppState
from .authn import authenticate, parse_bearer
from .body_view import BodyView


async def admit(state: AppState, ctx: RequestContext, authorization: str | None,
                classify: Callable[[], Resource]) -> None:
    """Fills ctx.principal, ctx.resource and ctx.rule, or raises the refusal.

    Authentication comes before classification on purpose: an anonymous caller gets
    the same 401 for every route and learns nothing about which routes exist.
    """
    ctx.principal = await identify(state, ctx, authorization)
    ctx.resource = classify()
    if ctx.resource.resource == "sessions" and ctx.principal.tier not in MINTING_TIERS:
        # Whatever the policy says: only a user or app key is exchanged for a session, so a
        # stolen session token cannot renew itself. An authentication refusal: 401.
        raise Unauthenticated("session_from_wrong_tier")
    authorize(state, ctx, ctx.resource)


async def identify(state: AppState, ctx: RequestContext, authorization: str | None) -> Principal:
    """Who presents `authorization` (admit's first step; a gRPC stream's, before its first message)."""
    return await authenticate(parse_bearer(authorization), state.store, state.pepper, ctx.client_ip, time.time(),
                              state.sessions, state.key_cache, state.sign_in_guard)


def authorize(state: AppState, ctx: RequestContext, resource: Resource) -> None:
    """The policy decision for one resource; also used per message on gRPC streams."""
    assert ctx.principal is not None
    certs = ctx.peer_cert.identities() if ctx.peer_cert is not None else ()
    decision = state.authorizer.authorize(ctx.principal, resource, ctx.client_ip, datetime.now(timezone.utc), certs)
    ctx.rule = decision.rule
    if not decision.allowed:
        raise Forbidden("policy_denied")


async def check_body(state: AppState, ctx: RequestContext, view: BodyView, model: str | None = None) -> None:
    """Body-level policy on the parsed view (every message of a gRPC stream has its own):

    - the role's max_tokens cap (`limits.max_tokens_by_role`), 400 over it or when max_tokens is left out;
    - a key without the admin role sets only the parameters `body.*` allows: a reserved one (shared
      memory names another tenant's tensors) is 403, any other 400.
    """
    p = ctx.principal
    if p is None or ctx.resource is None or ctx.resource.action != "infer":
        return
    asked = view.asked_tokens()   # a batch asks for the sum of its rows
    # What the model generates when the request names no max_tokens: its own default, and which of its
    # outputs may be classified (its config, cached).
    model = model or ctx.resource.model
    classified = {q.tensor for q in view.parameters if q.where == "output" and q.key == "classification"}
    default = (await state.max_tokens_defaults.get(model)
               if (view.max_tokens is None or classified) and state.max_tokens_defaults is not None and model
               else None)
    cap = role_cap(state, p)
    if cap is not None and asked is not None and asked > cap:
        raise BadRequest("max_tokens_over_role_cap", public_message=f"max_tokens is over this key's cap of {cap}")
    if view.parameters and "admin" not in p.roles:
        _check_parameters(ctx, view, state.settings.body)
    if classified:
        _check_classified(classified, default)
    if cap is not None and not view.max_tokens:
        # After the parameters: a reserved one is 403 still. The OpenAI door always names max_tokens.
        _cap_model_default(view, default, cap)
    # Last: only a message that is forwarded adds to the bound a stream may be settled at.
    _add_bound(state, ctx, view, asked, default)


def role_cap(state: AppState, p: Principal) -> int | None:
    """The key's max_tokens cap (`limits.max_tokens_by_role`, its most generous capped role); None: uncapped."""
    return max_tokens_cap(p.roles, _role_caps(state.settings.limits.max_tokens_by_role))


def _cap_model_default(view: BodyView, known: MaxTokensDefault | None, cap: int) -> None:
    """A capped role that names no max_tokens gets the model's own default (config.pbtxt
    `default_max_tokens`), which may be over the cap: that default is held to the cap. Fail closed:
    an empty max_tokens tensor, or a model whose default Triton does not tell, is refused."""
    if view.max_tokens is None and known is not None and not known.takes_max_tokens:
        return   # the model has no max_tokens to cap: it is not a generator governed by one
    if view.max_tokens is not None or known is None or known.default is None:
        raise BadRequest("max_tokens_required_under_role_cap",
                         public_message=f"max_tokens is required under this key's cap of {cap}")
    if known.default * max(1, view.prompts) > cap:
        raise BadRequest("max_tokens_default_over_role_cap",
                         public_message=f"max_tokens is required under this key's cap of {cap} "
                                        f"(the model's default is {known.default})")


def _check_classified(outputs: set[str], known: MaxTokensDefault | None) -> None:
    """Only outputs the model's config declares numeric may be classified, for every key: classifying a
    string output (text_output) kills tritonserver 2.51, every model with it. Fail closed: refused
    when Triton does not say what the outputs are."""
    refused = sorted(outputs - known.classifiable) if known is not None else sorted(outputs)
    if refused:
        raise BadRequest(f"classification_of_non_numeric_output: {refused[0][:64]}",
                         public_message=f"output {refused[0][:64]!r} cannot be classified: only numeric "
                                        f"outputs can")


def _check_parameters(ctx: RequestContext, view: BodyView, body: BodySettings) -> None:
    allowed, reserved = _body_rules(body)
    for p in view.parameters:
        if p.key in allowed[p.where]:
            continue
        where = f"{p.where} {p.tensor!r}" if p.tensor else p.where
        if p.key in reserved:
            ctx.rule = "parameter_reserved"
            raise Forbidden(f"parameter_reserved: {p.key} ({where})",
                            public_message=f"parameter {p.key!r} is reserved for admins")
        raise BadRequest(f"parameter_not_allowed: {p.key[:64]} ({where[:80]})",
                         public_message=f"parameter {p.key[:64]!r} is not allowed ({p.where})")


@lru_cache(maxsize=4)   # settings are frozen: the sets are built once
def _body_rules(body: BodySettings) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    def names(text: str) -> frozenset[str]:
        return frozenset(n.strip() for n in text.split(",") if n.strip())
    allowed = {"request": names(body.request_parameters), "input": names(body.input_parameters),
               "output": names(body.output_parameters), "generate": names(body.generate_fields)}
    return allowed, names(body.admin_parameters)


@lru_cache(maxsize=16)   # settings are frozen and tiers few: built once, not per request
def tier_limits(settings: LimitsSettings, tier: str) -> Limits:
    """A tier's default limits from config; tiers without defaults (session) are unlimited on their own."""
    if tier not in ("app", "device", "user"):
        return Limits()
    return Limits(**{f: getattr(settings, f"{tier}_{f}") for f in LIMIT_FIELDS})


async def limit(state: AppState, ctx: RequestContext, asked_tokens: int | None,
                also_rules: tuple[str, ...] = (), fit: bool = False) -> int | None:
    """The limit step: the key's and every ancestor's rates and budgets (the role cap is check_body's).

    `asked_tokens`: what the request asks for in all (BodyView.asked_tokens; None: it names no
    max_tokens). `also_rules`: the allow rules of other resources the request runs on (the OpenAI
    door's decoupled twin), whose `limits:` hold too. An admitted request holds a grant until
    finish() settles it with the real count.

    `fit`: `asked_tokens` is a default the door chose, not what the client asked for (an OpenAI request
    without max_tokens). A token budget (tpm, daily, monthly) with less left than that does not refuse
    it while any is left: it is granted what is left. Returns the tokens granted, which the door then
    sends as max_tokens (`asked_tokens` unless fitted).
    """
    p, resource = ctx.principal, ctx.resource
    if p is None or resource is None or resource.public:
        return asked_tokens
    settings = state.settings.limits
    infer = resource.action == "infer"
    imposed = [(rule, lim) for rule in dict.fromkeys((ctx.rule, *also_rules))
               if (lim := state.authorizer.rule_limits(rule)) is not None]
    if not imposed and _no_limits(settings, p.limits):
        return asked_tokens   # the common case, decided without building a scope per key
    scopes = [Scope(key_id, tier_limits(settings, tier).with_overrides(own), inherited=i > 0)
              for i, (key_id, tier, own) in enumerate(p.limits)]
    # Counted per API key (a session counts against its parent's), like the key's own limits.
    owner = next((key_id for key_id, tier, _ in p.limits if tier != "session"), p.key_id)
    scopes += [Scope(f"rule:{rule}:{owner}", lim, inherited=True) for rule, lim in imposed]
    if all(s.limits.unlimited() for s in scopes):
        return asked_tokens
    # Inferences are charged their estimate up front (at least one token) where tokens are counted;
    # other calls, and scopes that count only requests, are charged nothing.
    tokens = 0
    if infer and any(s.limits.counts_tokens() for s in scopes):
        tokens = max(1, settings.default_estimate_tokens if asked_tokens is None else asked_tokens)
    ctx.limit_grant = await _acquire(state, scopes, tokens, fit and asked_tokens is not None)
    return ctx.limit_grant.tokens if tokens and asked_tokens is not None else asked_tokens


TOKEN_LIMITS = frozenset({"tpm", "daily_tokens", "monthly_tokens"})


async def _acquire(state: AppState, scopes: list[Scope], tokens: int, fit: bool) -> Grant:
    """The limiter's grant; with `fit`, a token budget that has less left than `tokens` (but some) grants
    what it has: asked again for that much (a refusal charges nothing, in every limiter). Another scope
    may then refuse the smaller amount with less left still; each retry asks for less, so this ends."""
    while True:
        try:
            return await state.limiter.acquire(scopes, tokens)
        except OverLimit as over:
            if not fit or over.kind not in TOKEN_LIMITS or not 0 < over.remaining < tokens:
                raise
            tokens = over.remaining


def _no_limits(settings: LimitsSettings, chain: tuple[tuple[str, str, dict[str, int]], ...]) -> bool:
    """True when no key in the chain sets limits of its own and no tier in it has defaults."""
    for _, tier, own in chain:
        if own or not tier_limits(settings, tier).unlimited():
            return False
    return True


@lru_cache(maxsize=4)
def _role_caps(text: str) -> dict[str, int]:
    return parse_role_caps(text)   # settings validated it at start


# ctx.extra keys: the token bound of every message admitted (a gRPC stream has many), of those
# whose response will not carry their counts (BodyView.counts_hidden), and whether a message was
# forwarded that Triton's answers never finished (a stream cut short: Triton runs on with what it
# was sent, and the counts read leave it out).
TOKEN_BOUND, HIDDEN_BOUND, UNANSWERED = "token_bound", "hidden_token_bound", "unanswered_messages"


def _add_bound(state: AppState, ctx: RequestContext, view: BodyView, asked: int | None,
               default: MaxTokensDefault | None) -> None:
    """The most a message can use: its prompt bound plus what it may generate (where it names no
    max_tokens, the model's default per prompt, limits.default_estimate_tokens when Triton does not
    tell it); what the meter settles at when no count is read."""
    per_prompt = state.settings.limits.default_estimate_tokens
    if default is not None and default.default is not None:
        per_prompt = max(per_prompt, default.default)
    output = asked if asked is not None else per_prompt * max(1, view.prompts)
    bound = view.prompt_bound() + output
    ctx.extra[TOKEN_BOUND] = ctx.extra.get(TOKEN_BOUND, 0) + bound
    if view.counts_hidden:
        ctx.extra[HIDDEN_BOUND] = ctx.extra.get(HIDDEN_BOUND, 0) + bound


def _used_tokens(ctx: RequestContext, charged: int) -> int:
    """The real count when the response said both; none when Triton refused or never got the request;
    else the upper bound.

    Fail closed: a client decides what Triton's answer carries (Accept-Encoding, `outputs`, a
    classification), so an answer without readable counts is charged the most the request could
    have used (check_body's bound: prompt bytes + max_tokens), never only its max_tokens. The same
    for a client gone mid-response (499): Triton may have generated it all. On a stream, the
    messages that hid their counts add their bound to the counts the others reported; one cut short
    (the client cancelled, or a later message was refused) while a message it sent was unanswered
    is charged the bound of all it sent: Triton runs those to the end, cancelled call or not.
    """
    if ctx.never_sent:
        return 0   # no connection to Triton was made: the request ran nowhere
    i, o = ctx.input_tokens, ctx.output_tokens
    if i is not None and o is not None and not ctx.extra.get(UNANSWERED):
        return i + o + ctx.extra.get(HIDDEN_BOUND, 0)
    if (i is None and o is None and ctx.upstream_ms is not None and ctx.http_status not in (0, 499)
            and not 200 <= ctx.http_status < 300):
        return 0
    # The bound, not the reservation: check_body's bound holds the charge everywhere (prompt + max_tokens),
    # but a door that asked Triton again for less than it reserved (the OpenAI door's context retry) lowered
    # it, and the reservation it never spent is no use the request could have made.
    bound = ctx.extra.get(TOKEN_BOUND)
    return charged if bound is None else bound


def refuse(ctx: RequestContext, err: SeekgateError) -> None:
    """Records a refusal on the context; the front end renders it in its own protocol."""
    ctx.status, ctx.reason, ctx.http_status = err.audit_status, err.reason, err.http_status


_COMMITTED = "audit_committed"   # ctx.extra key: the record is durable already, finish() must not add another
# ctx.extra key: commit_audit's write, whose caller was cancelled while it ran: finish() adds a record only if it fails
_COMMITTING = "audit_committing"


def _audit_can_take(state: AppState) -> None:
    """Nothing is forwarded that the audit log could not take: strict mode while the log is known to be
    unwritable, either mode while the writer is more than audit.queue_max records behind."""
    if state.audit.strict and not state.audit.healthy:
        raise AuditUnavailable("audit_unwritable")
    if state.audit.backlogged():
        raise AuditUnavailable("audit_backlog")


async def audit_ready(state: AppState) -> None:
    """The audit step before anything is spent or forwarded: refused as `_audit_can_take` says, and
    over audit.queue_soft_max held until the writer catches up (AuditWriter.room)."""
    _audit_can_take(state)
    if state.audit.behind():   # checked here: most requests then cost no coroutine for it
        await state.audit.room()


async def commit_audit(state: AppState, ctx: RequestContext) -> None:
    """Strict audit: ctx's record made durable now, before the response leaves. No-op in batched mode.

    The front ends call this once the response is known and before its last byte is sent; the
    record then says what the client is about to get. Raises AuditUnavailable when the write fails:
    the caller answers 503 instead and `finish` audits that refusal (best effort: the log is failing).
    """
    if not state.audit.strict or ctx.extra.get(_COMMITTED):
        return
    _audit_can_take(state)   # known unwritable: refuse now rather than wait out the writer's retries
    if ctx.http_status >= 500 and ctx.status == "allowed":
        ctx.status = "error"
    durable = state.audit.submit_durable(build_record(ctx))
    try:
        # Shielded: a caller cancelled meanwhile (its client left, the drain timeout) leaves the record queued,
        # and it is written all the same; finish() then must not write a second one for the request.
        await asyncio.shield(durable)
    except asyncio.CancelledError:
        ctx.extra[_COMMITTING] = durable
        raise
    ctx.extra[_COMMITTED] = True


def finish(state: AppState, ctx: RequestContext) -> None:
    """One audit record and one metrics observation per request, whatever happened."""
    if ctx.limit_grant is not None:
        # Every path ends here (errors, disconnects, streams): the slot is freed, the charge corrected.
        # Settling is idempotent; the grant stays on ctx for the response's X-RateLimit-* headers.
        state.limiter.settle(ctx.limit_grant, _used_tokens(ctx, ctx.limit_grant.tokens))
    if ctx.http_status >= 500 and ctx.status == "allowed":
        ctx.status = "error"
    duration_ms = ctx.elapsed_ms()
    if not ctx.extra.get(_COMMITTED):
        record = build_record(ctx, duration_ms=duration_ms)
        committing: asyncio.Future[None] | None = ctx.extra.get(_COMMITTING)
        if committing is None:
            state.audit.submit(record)
        else:   # one record either way: commit_audit's if its write succeeds, else this one
            committing.add_done_callback(lambda done: _unless_written(state, done, record))
    state.metrics.observe_request(ctx, duration_s=duration_ms / 1000.0)


def _unless_written(state: AppState, durable: asyncio.Future[None], record: dict[str, Any]) -> None:
    """finish()'s record for a request whose cancelled commit_audit write failed (or never ran), else nothing."""
    if durable.cancelled() or durable.exception() is not None:
        state.audit.submit(record)
