"""The OpenAI-compatible door on the HTTP port: /v1/models, /v1/chat/completions, /v1/completions.

The same request path as Triton's routes, in the same order: authenticate, classify as
`model:<name>`/`infer` with `api=openai` (policies may test it), authorize it and the model's decoupled
twin that runs it, then the body checks on the Triton generate body this door builds (parsed back by
body_view exactly as any client's generate body: the parameter allowlist and the role's max_tokens cap
see what the model will get), the limits (the twin's rule's too), and the forward over the same
upstream pool: generate_stream on the twin, streamed or not. The audit record says `protocol: openai`
and `openai: {endpoint, user, runs_on}`; metrics are labelled protocol="openai". Refusals come in
OpenAI's error shape (openai_shapes.py, openai_errors.py), a /v1 path this door does not serve
(but /v1/sessions, seekgate's own) included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from ..context import RequestContext, Resource
from ..errors import AuditUnavailable, Forbidden, NotFound, SeekgateError, UpstreamTimeout, UpstreamUnavailable
from ..settings import parse_aliases
from ..steps.app_state import AppState
from ..steps.body_view import decode, parse_json, view_http
from ..steps.pipeline import (
    TOKEN_BOUND,
    admit,
    audit_ready,
    authorize,
    check_body,
    commit_audit,
    limit,
    refuse,
    role_cap,
)
from ..upstream import pool as upstream_http
from ..upstream.forward import cancel_on_leave, client_left, left_client
from ..upstream.models import model_names, repository_index
from ..upstream.pool import UpstreamResponse
from .http_guard import durable_refusal, read_body
from .openai_errors import as_asked, context_room, message_of, model_error, refusal, without_default
from .openai_request import CHAT, COMPLETIONS, OpenAIRequest, parse_request
from .openai_shapes import (
    ChunkWriter,
    MethodNotAllowed,
    ModelNotFound,
    StopFilter,
    completion,
    error_body,
    finish_reason,
    model_object,
)

MODELS = "/v1/models"
SESSIONS = "/v1/sessions"   # seekgate's own (a key exchanged for a session token), not the OpenAI API
_JSON = (("Content-Type", "application/json"),)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def is_openai(path: str) -> bool:
    """The paths this door answers: every /v1 path but /v1/sessions; those it does not serve are
    refused in OpenAI's shape, which an OpenAI client can read."""
    return path.startswith("/v1/") and path != SESSIONS and not path.startswith(SESSIONS + "/")


async def openai_answer(request: web.Request, state: AppState, ctx: RequestContext, path: str) -> web.StreamResponse:
    """The answer to one OpenAI API request, or its refusal in OpenAI's shape; ctx says what the audit says."""
    ctx.protocol = "openai"
    info: dict[str, Any] = {"endpoint": path}
    ctx.extra["openai"] = info
    parsed: list[OpenAIRequest] = []
    try:
        # A wrong method or path is refused once the caller is authenticated (admit's order): an anonymous
        # caller gets the same 401 everywhere and learns nothing of which routes exist.
        if path == MODELS or path.startswith(MODELS + "/"):
            if request.method != "GET":
                await admit(state, ctx, request.headers.get("Authorization"), lambda: _wrong_method(request, "GET"))
            return await _models(request, state, ctx, path)
        if path not in (CHAT, COMPLETIONS):
            await admit(state, ctx, request.headers.get("Authorization"), lambda: _unknown(request.method, path))
        if request.method != "POST":
            await admit(state, ctx, request.headers.get("Authorization"), lambda: _wrong_method(request, "POST"))
        settings = state.settings
        body = await read_body(request, settings.server.max_body_bytes, settings.server.read_timeout_s)
        # OpenAI bodies are plain JSON: any Content-Encoding but identity is refused (415), as on generate.
        body = decode(body, request.headers.getall("Content-Encoding", []), "generate", settings.server.max_body_bytes)

        def classify() -> Resource:
            # After authentication (admit's order): an anonymous caller learns nothing from a body's errors.
            req = parse_request(path, parse_json(body))
            parsed.append(req)
            model = _triton_model(settings.openai.aliases, req.model)
            return Resource(f"model:{model}", "infer", model=model, stream=req.stream, api="openai")

        await admit(state, ctx, request.headers.get("Authorization"), classify)
        req = parsed[0]
        info["user"] = req.user
        assert ctx.resource is not None and ctx.resource.model is not None
        model = ctx.resource.model
        # Every answer runs on the decoupled twin (below): the twin is authorised too, or a rule
        # on it (a deny, its limits, a key's model list) would hold on /v2 and not here.
        twin = model + settings.openai.stream_suffix
        info["runs_on"] = twin
        twin_rule = _authorize_twin(state, ctx, model, twin, req.stream)
        asked = req.max_tokens if req.max_tokens is not None else await _default_max_tokens(state, ctx, req, twin)
        generate = req.generate_body(asked)
        raw = json.dumps(generate, ensure_ascii=False).encode()
        # The body checks on the request Triton will get, parsed as every generate body is: never a weaker path.
        view = view_http("generate", raw, [])
        await check_body(state, ctx, view)
        await audit_ready(state)
        # A default is the door's, not the client's: a token budget with less left grants what it has.
        granted = await limit(state, ctx, view.asked_tokens(), (twin_rule,), fit=req.max_tokens is None)
        if granted is not None and granted < generate["max_tokens"]:
            raw = _fewer_tokens(ctx, generate, granted)   # less than was checked: every check still holds
        if req.max_tokens is None:   # the record says what seekgate chose (fitted above; a context retry below sets it again)
            info["default_max_tokens"] = generate["max_tokens"]
        # Whole answers too go through the twin's token events: a plain generate answers only at the
        # end, so neither a client leaving mid-way could be noticed in time nor its tokens counted.
        target = f"/v2/models/{quote(twin, safe='')}/generate_stream"
        started = time.perf_counter()
        # Watched from the send on: a request queued in Triton, or waiting for its first token,
        # is dropped when its client goes, not prefilled for nobody (forward.py: cancel_on_leave).
        with cancel_on_leave(request) as gone:
            while True:
                try:
                    upstream = await _send(state, ctx, target, raw)
                except asyncio.CancelledError:
                    if not left_client(gone):
                        raise   # not ours: the drain timeout's
                    return client_left(ctx)
                # At the headers too (finish() charges nothing for a refusal Triton answered); set again at
                # the last event read.
                _upstream_done(ctx, started)
                try:
                    if req.stream:
                        return await _stream(request, state, ctx, req, upstream, generate["max_tokens"], model,
                                             gone, started)
                    return await _whole(state, ctx, req, upstream, generate["max_tokens"], model, gone, started)
                except SeekgateError as err:
                    # A default that does not fit beside the prompt: OpenAI and vLLM generate until the
                    # context ends, so it is asked again for what fits (the room is the model's own count of the
                    # prompt, so it fits; each retry asks for less, so this ends).
                    room = context_room(err) if req.max_tokens is None and ctx.output_tokens is None else None
                    if room is None or room >= generate["max_tokens"]:
                        raise
                finally:
                    upstream.release()   # mid-answer (a client gone): closes the connection, Triton cancels
                raw = _fewer_tokens(ctx, generate, room)
                info["default_max_tokens"] = room
    except SeekgateError as err:
        if parsed:   # a refusal about max_tokens names the field the client sent it by, or none it did not send
            err = as_asked(err, parsed[0].max_tokens_param) if parsed[0].max_tokens is not None \
                else without_default(err)
        return await refused(state, ctx, err)


async def refused(state: AppState, ctx: RequestContext, err: SeekgateError) -> web.Response:
    """The refusal in OpenAI's shape; under strict audit only once its record is durable, else a 503."""
    return await durable_refusal(state, ctx, err, error_response)


def error_response(ctx: RequestContext, err: SeekgateError) -> web.Response:
    refuse(ctx, err)
    headers = {"X-Request-Id": ctx.request_id, **err.headers()}
    return web.json_response(error_body(err), status=err.http_status, headers=headers)


def _unknown(method: str, path: str) -> Resource:
    """A /v1 path this door does not serve (embeddings, images...): 404, once the caller is authenticated
    (admit's order: an anonymous caller gets the same 401 everywhere)."""
    shown = path[:128]
    raise NotFound(f"no route: {method} {shown}",
                   public_message=f"Invalid URL ({method} {shown}): this server serves /v1/models, "
                                  f"/v1/chat/completions and /v1/completions.")


def _wrong_method(request: web.Request, allow: str) -> Resource:
    raise MethodNotAllowed(request.method, allow)


@lru_cache(maxsize=8)
def _aliases(text: str) -> Mapping[str, str]:
    """openai.aliases parsed once per setting's text (settings validated it at start), not per request."""
    return MappingProxyType(parse_aliases(text) if text else {})


def _triton_model(aliases: str, model_id: str) -> str:
    """The Triton model an OpenAI model id names: an alias's target, or the id itself. An id with a "/"
    that is no alias names none (a Triton model's name is a directory's): 404, never forwarded."""
    model = _aliases(aliases).get(model_id, model_id)
    if "/" in model:
        raise ModelNotFound(model_id)
    return model


async def _default_max_tokens(state: AppState, ctx: RequestContext, req: OpenAIRequest, model: str) -> int:
    """max_tokens for a request that names none, always explicit in what is forwarded (the charge and the
    role cap read what the model gets). Chat: the most this caller may have, as OpenAI and vLLM generate
    until the model stops: the model's own cap (config.pbtxt `max_tokens_cap`, or
    `openai.chat_default_max_tokens` when set; `openai.default_max_tokens` when the model states none).
    Completions: OpenAI's 16 (`openai.default_max_tokens`). Either is held to the model's cap and the
    role's: the client asked for no more than it may have, so it is clipped, never refused. `model`: the
    one that runs it (the twin)."""
    settings = state.settings.openai
    known = await state.max_tokens_defaults.get(model) if state.max_tokens_defaults is not None else None
    model_cap = known.cap if known is not None else None
    wanted = settings.default_max_tokens
    if req.endpoint == CHAT:
        wanted = settings.chat_default_max_tokens or model_cap or settings.default_max_tokens
    assert ctx.principal is not None
    return min(c for c in (wanted, model_cap, role_cap(state, ctx.principal)) if c is not None)


def _fewer_tokens(ctx: RequestContext, generate: dict[str, Any], max_tokens: int) -> bytes:
    """The generate body again with a smaller default max_tokens (the budget left, the room in the context);
    the bound the charge settles at when no count is read (check_body's) shrinks with it."""
    ctx.extra[TOKEN_BOUND] = ctx.extra.get(TOKEN_BOUND, 0) - (generate["max_tokens"] - max_tokens)
    generate["max_tokens"] = max_tokens
    return json.dumps(generate, ensure_ascii=False).encode()


def _authorize_twin(state: AppState, ctx: RequestContext, model: str, twin: str, stream: bool) -> str:
    """The policy decision on the model that runs, after the one on the model the client named: both
    must allow (fail closed). Returns the twin's allow rule, for its limits; on a deny, ctx.rule
    names the twin's deciding rule, as the audit record shows."""
    named = ctx.rule
    if twin == model:   # no suffix configured: one model, decided already
        return named
    authorize(state, ctx, Resource(f"model:{twin}", "infer", model=twin, stream=stream, api="openai"))
    twin_rule, ctx.rule = ctx.rule, named
    return twin_rule


# ------------------------------------------------------------------ models

async def _models(request: web.Request, state: AppState, ctx: RequestContext, path: str) -> web.Response:
    """The models this key may use: each Triton model (twins hidden) and alias the policy allows to `read`,
    whose twin it may run (_usable)."""
    # The id as the client meant it: the SDKs percent-encode a path parameter ("org%2Fname").
    wanted = unquote(path[len(MODELS) + 1:]) if path != MODELS else None

    aliases = _aliases(state.settings.openai.aliases)

    def classify() -> Resource:
        # The listing itself needs only a valid credential; each entry is then the policy's own decision,
        # on the Triton model an alias names (as the listing decides it).
        if not wanted:
            return Resource("server", "read", api="openai")
        model = _triton_model(state.settings.openai.aliases, wanted)
        return Resource(f"model:{model}", "read", model=model, api="openai")

    await _authenticated(state, ctx, request, classify, wanted)
    try:
        index = await repository_index(state.upstream)
    except upstream_http.UpstreamError as exc:
        raise UpstreamUnavailable(f"upstream_unreachable: {exc}") from exc
    names, ready = model_names(index), model_names(index, ready_only=True)
    suffix = state.settings.openai.stream_suffix
    served = [n for n in names if not (suffix and n.endswith(suffix) and n[:-len(suffix)] in names)]
    ids = served + [a for a, target in sorted(aliases.items()) if target in served]
    now = int(time.time())
    visible = [m for m in ids if _usable(state, ctx, aliases.get(m, m), suffix, ready)]
    ctx.http_status = 200
    if wanted is not None:
        if wanted not in visible:
            raise ModelNotFound(wanted)
        await commit_audit(state, ctx)
        return web.json_response(model_object(wanted, now), headers={"X-Request-Id": ctx.request_id})
    await commit_audit(state, ctx)
    return web.json_response({"object": "list", "data": [model_object(m, now) for m in visible]},
                             headers={"X-Request-Id": ctx.request_id})


async def _authenticated(state: AppState, ctx: RequestContext, request: web.Request, classify: Any,
                         wanted: str | None) -> None:
    """admit() without its policy refusal: a model the key may not read is reported as not found (404),
    under the id the client asked for."""
    try:
        await admit(state, ctx, request.headers.get("Authorization"), classify)
    except Forbidden:
        if wanted is None or ctx.resource is None or ctx.resource.resource == "server":
            raise
        raise ModelNotFound(wanted, "model_not_readable") from None


def _usable(state: AppState, ctx: RequestContext, model: str, suffix: str, ready: list[str]) -> bool:
    """Listed: the key may read the model and run its twin (streamed or not), and the twin is ready: every
    /v1 answer runs there, so a model whose twin refuses the key could only ever answer 403, and one
    without a twin (a model that is no generator) or whose twin is unloaded 404. (The named model's
    own version need not be loaded: it only names the twin.)"""
    if not _may(state, ctx, Resource(f"model:{model}", "read", model=model, api="openai")):
        return False
    twin = model + suffix
    return (not suffix and model in ready) or (bool(suffix) and twin in ready and any(
        _may(state, ctx, Resource(f"model:{twin}", "infer", model=twin, stream=stream, api="openai"))
        for stream in (False, True)))


def _may(state: AppState, ctx: RequestContext, resource: Resource) -> bool:
    try:
        authorize(state, ctx, resource)
    except Forbidden:
        return False
    finally:
        ctx.rule = ""
    return True


# ------------------------------------------------------------------ upstream

async def _send(state: AppState, ctx: RequestContext, target: str, raw: bytes) -> UpstreamResponse:
    try:
        return await state.upstream.request("POST", target, _JSON, raw)
    except upstream_http.UpstreamTimeout as exc:
        ctx.never_sent = not exc.sent
        raise UpstreamTimeout(str(exc)) from exc
    except upstream_http.UpstreamError as exc:
        ctx.never_sent = not exc.sent
        raise UpstreamUnavailable(f"upstream_unreachable: {exc}") from exc


async def _whole(state: AppState, ctx: RequestContext, req: OpenAIRequest, upstream: UpstreamResponse,
                 max_tokens: int, model: str, gone: asyncio.Future[None] | None, started: float) -> web.StreamResponse:
    """Triton's token events gathered into one answer; a client that leaves first stops the generation
    (`gone`: the caller's cancel_on_leave)."""
    stops = StopFilter(req.stop)
    pieces: list[str] = []
    events: _Events | None = None
    batch: list[dict[str, Any]] = []
    wait_s = state.settings.openai.count_wait_s
    try:
        events, batch = await _opening(upstream, model, req.endpoint)
        more = upstream.iter_any()
        while True:
            text, failed = _take(batch, ctx, stops, req.endpoint)
            pieces.append(text)
            if failed is not None:
                raise failed   # nothing sent yet: the client gets a clean error
            if stops.stopped:
                break
            try:
                chunk = await more.__anext__()
            except StopAsyncIteration:
                break
            batch = events.feed(chunk)
    except upstream_http.UpstreamError as exc:
        raise UpstreamUnavailable(f"upstream_broke_mid_response: {exc}") from exc
    except asyncio.CancelledError:
        if not left_client(gone):
            raise   # not ours: the drain timeout's
        await _final_count(upstream, events, batch, ctx, wait_s)   # nothing to read before the opening
        _upstream_done(ctx, started)
        return client_left(ctx)
    pieces.append(stops.flush())
    prompt_tokens, completion_tokens = ctx.input_tokens or 0, ctx.output_tokens or 0   # usage: up to the stop
    if stops.stopped:
        await _final_count(upstream, events, batch, ctx, wait_s, ctx.extra["openai"])
    _upstream_done(ctx, started)
    # The record keeps ctx's counts (all generated), None where the model told none: a count never read is
    # charged the bound (pipeline._used_tokens), not the 0 that usage has to show.
    ctx.http_status = 200
    reason = "stop" if stops.stopped else finish_reason(req, max_tokens, completion_tokens)
    answer = completion(req, _response_id(req, ctx), int(ctx.started_wall), "".join(pieces), reason,
                        prompt_tokens, completion_tokens)
    await commit_audit(state, ctx)   # strict audit: durable, with the counts, before the answer leaves
    return web.json_response(answer, headers={"X-Request-Id": ctx.request_id})


def _upstream_done(ctx: RequestContext, started: float) -> None:
    """Triton's time ends at its last event read, not at its headers: seekgate_overhead_seconds
    (request time minus this) must not count the generation as seekgate's own."""
    ctx.upstream_ms = (time.perf_counter() - started) * 1000.0


async def _final_count(upstream: UpstreamResponse, events: _Events | None, batch: list[dict[str, Any]],
                       ctx: RequestContext, wait_s: float, info: dict[str, Any] | None = None) -> None:
    """After a stop sequence or a client leaving: Triton's events read on to its last one (for at most
    `openai.count_wait_s`), so ctx's counts, which are charged and audited, are what the model
    generated and not only what was sent. Past the wait the caller's release() cancels the rest;
    tokens made after the last event read then go uncounted.

    `usage` keeps the tokens up to the stop, as OpenAI's does (generation ends at a stop there);
    `info` (the record's `openai`) then keeps that figure as `completion_tokens`.
    """
    if info is not None:
        info["completion_tokens"] = ctx.output_tokens or 0
    for doc in batch:   # the batch's events after the stop (counts are running totals: the last holds)
        _count(ctx, doc)
    if events is None or wait_s <= 0:
        return
    try:
        async with asyncio.timeout(wait_s):
            async for chunk in upstream.iter_any():
                for doc in events.feed(chunk):
                    _count(ctx, doc)
    except (TimeoutError, upstream_http.UpstreamError):
        pass


async def _opening(upstream: UpstreamResponse, model: str, endpoint: str) -> tuple[_Events, list[dict[str, Any]]]:
    """The first token events, awaited before anything is answered: a request the model refuses
    (Triton's status, or an error as the first event) becomes a clean OpenAI error (openai_errors.py)."""
    if upstream.status != 200:
        try:
            body = await upstream.read_upto(4096)
        except upstream_http.UpstreamError:
            body = b""
        raise refusal(upstream.status, message_of(body), model, endpoint)
    events = _Events()
    pending: list[dict[str, Any]] = []
    try:
        async for chunk in upstream.iter_any():
            pending = events.feed(chunk)
            if pending:
                break
    except upstream_http.UpstreamError as exc:
        raise UpstreamUnavailable(f"upstream_broke_mid_response: {exc}") from exc
    if pending and "error" in pending[0]:
        raise refusal(400, str(pending[0]["error"]), model, endpoint)
    return events, pending


def _take(batch: list[dict[str, Any]], ctx: RequestContext, stops: StopFilter,
          endpoint: str) -> tuple[str, SeekgateError | None]:
    """The text of some token events that may go out (stop sequences withheld), their counts onto ctx,
    and the model's error if one came instead."""
    out: list[str] = []
    for doc in batch:
        if "error" in doc:
            return "".join(out), model_error(str(doc["error"]), endpoint)
        out.append(stops.feed(str(doc.get("text_output", ""))))
        _count(ctx, doc)
        if stops.stopped:
            break
    return "".join(out), None


def _count(ctx: RequestContext, doc: dict[str, Any]) -> None:
    """A token event's counts onto ctx (each event carries the request's totals so far)."""
    if isinstance(doc.get("input_tokens"), int):
        ctx.input_tokens = doc["input_tokens"]
    if isinstance(doc.get("output_tokens"), int):
        ctx.output_tokens = doc["output_tokens"]


def _response_id(req: OpenAIRequest, ctx: RequestContext) -> str:
    return ("chatcmpl-" if req.endpoint == CHAT else "cmpl-") + ctx.request_id


class _Events:
    """Splits a generate_stream body into its events' JSON objects (Triton's SSE: `data: {...}` + blank line)."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        events = (self._tail + chunk).split(b"\n\n")
        self._tail = events.pop()
        out = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    try:
                        doc = json.loads(line[5:])
                    except ValueError:
                        doc = {"error": "unreadable event from the inference server"}
                    out.append(doc if isinstance(doc, dict) else {"error": "unreadable event"})
        return out


async def _stream(request: web.Request, state: AppState, ctx: RequestContext, req: OpenAIRequest,
                  upstream: UpstreamResponse, max_tokens: int, model: str,
                  gone: asyncio.Future[None] | None, started: float) -> web.StreamResponse:
    """Triton's token events relayed as OpenAI chunks, each as it comes.

    The first event is awaited before any header goes out, so a request the model refuses still
    gets a clean OpenAI error status. A client that leaves is noticed when it leaves (`gone`: the
    caller's cancel_on_leave, from before the headers go out): the relay stops, the caller's
    release() closes Triton's connection, which cancels the generation there; the record keeps
    the tokens counted up to then.
    """
    writer = ChunkWriter(req, _response_id(req, ctx), int(ctx.started_wall))
    response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, "X-Request-Id": ctx.request_id})
    failed: SeekgateError | None = None
    stops = StopFilter(req.stop)
    events: _Events | None = None
    batch: list[dict[str, Any]] = []
    wait_s = state.settings.openai.count_wait_s
    try:
        events, batch = await _opening(upstream, model, req.endpoint)   # a refusal: the caller's clean error
        try:
            await response.prepare(request)
        except ConnectionError:   # gone before its headers (unwatched: aiohttp's own protocol has no `lost`)
            await _final_count(upstream, events, batch, ctx, wait_s)
            _upstream_done(ctx, started)
            return client_left(ctx)
        ctx.http_status = 200
        out = writer.first()
        more = upstream.iter_any()
        while True:
            text, failed = _take(batch, ctx, stops, req.endpoint)
            out += writer.text(text)
            if out:
                await response.write(out)
                out = b""
            if failed is not None or stops.stopped:
                break
            try:
                chunk = await more.__anext__()
            except StopAsyncIteration:
                break
            batch = events.feed(chunk)
    except ConnectionError:
        ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499
        await _final_count(upstream, events, batch, ctx, wait_s)
        _upstream_done(ctx, started)
        return response
    except upstream_http.UpstreamError as exc:
        failed = UpstreamUnavailable(f"upstream_broke_mid_response: {exc}")
    except asyncio.CancelledError:
        if not left_client(gone):
            raise   # not ours: the drain timeout's
        await _final_count(upstream, events, batch, ctx, wait_s)   # nothing to read before the opening
        _upstream_done(ctx, started)
        if not response.prepared:
            return client_left(ctx)
        ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499
        return response
    if failed is not None:
        _upstream_done(ctx, started)
        ctx.status, ctx.reason = "error", failed.reason
        try:
            await response.write(writer.error(failed))
            await response.write_eof()
        except ConnectionError:   # gone too: the record keeps the failure's reason
            ctx.http_status = 499
        return response
    shown = ctx.output_tokens or 0
    if stops.stopped:
        await _final_count(upstream, events, batch, ctx, wait_s, ctx.extra["openai"])
    _upstream_done(ctx, started)
    reason = "stop" if stops.stopped else finish_reason(req, max_tokens, shown)
    last = writer.text(stops.flush()) + writer.last(reason, ctx.input_tokens or 0, shown)
    try:
        await commit_audit(state, ctx)   # strict audit: the stream's end waits for its record
    except AuditUnavailable as exc:
        ctx.status, ctx.reason = "error", f"stream_cut: {exc.reason}"
        if request.transport is not None:
            request.transport.abort()
        return response
    try:
        await response.write(last)
        await response.write_eof()
    except ConnectionError:
        # Gone after the relay's last await (nothing cancelled it): its finish_reason, usage and [DONE] never
        # reached it. A 499, as a leave anywhere else is, not a bug's 500 (an error escaping the handler).
        ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499
    return response
