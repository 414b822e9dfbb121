"""The HTTP front end: the request path as the handler of its one route, the resources in cleanup_ctx, and serve()."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from ..admin.crypto import handle_crypto
from ..admin.keys import handle_admin
from ..admin.reads import RESOURCES as READ_RESOURCES
from ..admin.reads import handle_reads
from ..admin.sessions import handle_sessions
from ..audit.jsonl import active_name
from ..audit.pg_index import pool_of, replica_name
from ..audit.writer import AuditWriter
from ..context import RequestContext, client_ip_text, new_id
from ..errors import BadRequest, Draining, NotFound, SeekgateError, StoreUnavailable, Unauthenticated
from ..keys.cache import KeyCache
from ..keys.expiry_events import watch_expiry_events
from ..keys.issue import ISSUABLE_TIERS
from ..keys.secrets_setup import open_keyring
from ..local.triton import INTERNAL_HEADER
from ..metrics import Metrics
from ..settings import Settings, SettingsError, status_address, strict_transport_security
from ..state.limits import Limiter, LocalLimiter
from ..state.redis_limiter import RedisLimiter
from ..state.shared_limiter import SocketLimiter
from ..state.sign_in_guard import SignInGuard
from ..steps.app_state import CTX, STATE, AppState
from ..steps.authn import rehashes_settled
from ..steps.authz import Authorizer, PolicyWatcher
from ..steps.body_view import EMPTY, BodyView, decode, route_kind, view_http
from ..steps.classify import classify_http
from ..steps.pipeline import admit, audit_ready, check_body, commit_audit, finish, limit, refuse
from ..store.backend import open_store
from ..store.budgets import BudgetStore, budget_store_path
from ..upstream.forward import forward
from ..upstream.models import MaxTokensDefaults, refresh_models, watch_models
from ..upstream.pool import UpstreamError, UpstreamPool
from .console.door import answer_console, is_console
from .console.pages import SECURITY_HEADERS as CONSOLE_HEADERS
from .grpc import GrpcFrontEnd
from .http_guard import (
    SERVER_NAME,
    GuardedRunner,
    check_framing,
    closes_connection,
    decoded_size_within,
    durable_refusal,
    name_the_server,
    read_body,
)
from .listener import ListeningSocket, quiesce
from .openai import is_openai, openai_answer
from .tls import ServerTls, http_peer_cert, plaintext_refusal, tls_enabled
from .tls_site import listener_site
from .worker_role import WorkerRole

log = logging.getLogger("seekgate.http")

PUBLIC_PROBES = frozenset({"/v2/health/live", "/v2/health/ready"})
# Credentials in a URL end up in access logs and browser history: refused outright.
KEY_PARAMS = frozenset({"key", "api_key", "apikey", "token", "access_token", "authorization"})
# Resources seekgate answers itself (the key, crypto and session APIs); everything else goes to Triton.
_LOCAL_RESOURCES = frozenset({"admin:keys", "admin:crypto", "sessions", *READ_RESOURCES})
# How long a shutdown waits for pepper re-hashes still being written (SQLite: never long; PostgreSQL: its timeouts).
_REHASH_DRAIN_S = 5.0


# ------------------------------------------------------------------ the request path

Answer = Callable[[web.Request, AppState, RequestContext], Awaitable[web.StreamResponse]]
# What an app's one route answers with: `answer` on the API listener, `status_answer` on the status listener.
# Read from the app, not passed down by a wrapper: a wrapper coroutine would cost every request another frame.
ANSWER: web.AppKey[Answer] = web.AppKey("ANSWER")


async def request_path(request: web.Request) -> web.StreamResponse:
    """context -> authenticate -> classify -> authorize -> limit -> forward -> audit + metrics.

    The handler of each app's one route, which matches every method and path: no request reaches
    anything else, and no middleware layer costs every request a coroutine of its own. The app's
    ANSWER gives the answer; around it, the request's context, audit record and metrics.
    """
    state = request.app[STATE]
    ctx = new_context(request)
    if state.settings.server.tls_client_ca_file:   # mTLS: the handshake verified it; policy and audit read it
        ctx.peer_cert = http_peer_cert(request.transport)
    request[CTX] = ctx
    try:
        response = await request.app[ANSWER](request, state, ctx)
        await send_now(request, ctx, response)
        return response
    except asyncio.CancelledError:
        # With handler_cancellation off, aiohttp cancels a handler when the drain timeout ends it;
        # 499 either way: the client got no complete answer.
        reason = "drain_timeout" if state.draining else "client_disconnected"
        ctx.status, ctx.reason, ctx.http_status = "error", reason, 499
        raise
    finally:
        finish(state, ctx)


async def answer(request: web.Request, state: AppState, ctx: RequestContext,
                 base_path: str | None = None) -> web.StreamResponse:
    """The checks and the forward, or the refusal; what the client gets, on ctx what the audit says.

    `base_path`: the prefix stripped from the path, `server.base_path` unless given (the status listener has none).
    """
    console = False
    try:
        # First: framing aiohttp's parser let through but a proxy must not (http_guard's doc).
        check_framing(request)
        path = route_path(request.raw_path, state.settings.server.base_path if base_path is None else base_path)
        if is_console(path):   # the web console: its pages, and its data calls re-entering this path
            console = True
            return await answer_console(request, state, ctx, path, answer)
        if request.method == "GET" and path in PUBLIC_PROBES:
            # Load balancers probe health without a key; nothing else is public.
            ctx.resource = classify_http(request.method, path)
            if state.draining and path == "/v2/health/ready":
                raise Draining()   # else readiness is Triton's own, forwarded below
            if path == "/v2/health/ready" and (why := state.unready_because()):
                raise StoreUnavailable(f"{why}_unavailable: readiness")
        else:
            if "?" in request.raw_path and not KEY_PARAMS.isdisjoint(k.lower() for k in request.url.query):
                raise Unauthenticated("key_in_query_string")
            if is_openai(path):   # the OpenAI API: the same steps, its own shapes (frontend/openai.py)
                return await openai_answer(request, state, ctx, path)
            await admit(state, ctx, request.headers.get("Authorization"),
                        lambda: classify_http(request.method, path))
        assert ctx.resource is not None
        body = await read_body(request, state.settings.server.max_body_bytes, state.settings.server.read_timeout_s)
        # Every body-level check decides on the body as Triton will read it (body_view.py); the bytes
        # received are what is forwarded. The decoded size counts against the cap too (gzip bombs).
        view = body_view(request, ctx, path, body, state.settings.server.max_body_bytes)
        await check_body(state, ctx, view)
        await audit_ready(state)   # strict audit fails closed before anything is spent or forwarded
        # After every check that may refuse for free: a request refused above costs no quota.
        await limit(state, ctx, view.asked_tokens())
        if ctx.resource.resource in _LOCAL_RESOURCES:   # answered here, never forwarded
            kind = ctx.resource.resource
            response = (await handle_admin(request, body) if kind == "admin:keys"
                        else await handle_crypto(request, body) if kind == "admin:crypto"
                        else await handle_reads(request, body) if kind in READ_RESOURCES
                        else handle_sessions(ctx, state.sessions))
            ctx.http_status = response.status
            await commit_audit(state, ctx)   # strict audit: durable before aiohttp sends it
            return response
        # The query as the client sent it (still encoded), like the path: Triton sees what was authorized.
        raw_query = request.raw_path.partition("?")[2]
        path_qs = path + ("?" + raw_query if raw_query else "")
        return await forward(request, ctx, state.upstream, path_qs, body, server_timing(ctx),
                             (lambda: commit_audit(state, ctx)) if state.audit.strict else None,
                             redact_errors=state.settings.upstream.redact_errors)
    except SeekgateError as err:
        response = await refused(state, ctx, err)
        if console:   # a console refusal reaches a browser: not cached, sniffed or framed, like its pages
            response.headers.update(CONSOLE_HEADERS)
        if closes_connection(err):
            response.force_close()
        return response
    except Exception as exc:
        # A bug, not a refusal: still an answer in Triton's format carrying the request id, and an
        # audited error, never aiohttp's bare 500 with an "allowed" record behind it.
        log.exception("request %s failed", ctx.request_id)
        return await refused(state, ctx, SeekgateError(f"internal_error: {type(exc).__name__}"))


async def status_answer(request: web.Request, state: AppState, ctx: RequestContext) -> web.StreamResponse:
    """Readiness answered as on the API listener (Triton's, 503 while draining or the store is down); liveness
    by this process itself; 404 for anything else: this listener takes no credential, so it must reach nothing
    a credential guards."""
    path = request.raw_path.partition("?")[0]
    if request.method == "GET" and path == "/v2/health/live":
        return own_liveness(ctx, path)
    if request.method == "GET" and path in PUBLIC_PROBES:
        return await answer(request, state, ctx, base_path="")
    return await refused(state, ctx, NotFound("status_listener_serves_probes_only"))


def own_liveness(ctx: RequestContext, path: str) -> web.Response:
    """200 from this process's event loop, asking nothing else (audited by finish() like any answer).

    Not Triton's liveness, which the API listener forwards: a liveness probe that failed with Triton would
    restart seekgate whenever Triton restarts or reloads its checkpoint (minutes), into a crash-loop back-off
    that outlasts Triton's return. Nor gated on the audit backlog or the store: a load spike or a slow disk
    must not kill the proxy mid-stream; readiness is where those take the pod out of service.
    """
    ctx.resource = classify_http("GET", path)
    ctx.http_status = 200
    return web.Response(status=200, headers={"X-Request-Id": ctx.request_id})


async def send_now(request: web.Request, ctx: RequestContext, response: web.StreamResponse) -> None:
    """The answer on the wire before finish(): the audit record and metrics then cost the client no time.

    aiohttp would send it only after the handler returns, that is after finish(). A streamed
    answer is out already; sending again later is a no-op for aiohttp.
    """
    if response.prepared:
        return
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        if ctx.status == "allowed":
            ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499


def new_context(request: web.Request) -> RequestContext:
    # The peer address only: X-Forwarded-For is client-controlled and never trusted.
    return RequestContext(request_id=new_id(), client_ip=client_ip_text(request.remote or ""),
                          protocol="http", method=request.method, path=request.raw_path.split("?", 1)[0])


def route_path(raw_path: str, base_path: str) -> str:
    """The raw (still percent-encoded) path after any configured base path, as Triton will see it."""
    path = raw_path.split("?", 1)[0]
    if base_path:
        if path != base_path and not path.startswith(base_path + "/"):
            raise NotFound("outside_base_path")
        path = path[len(base_path):] or "/"
    return path


def body_view(request: web.Request, ctx: RequestContext, path: str, body: bytes, limit: int) -> BodyView:
    """The parsed view of an inference body; other bodies only have their decoded size capped."""
    encodings = request.headers.getall("Content-Encoding", [])
    if ctx.resource is None or ctx.resource.action != "infer":
        decoded_size_within(body, encodings[0] if encodings else None, limit)
        return EMPTY
    kind = route_kind(path)
    if not kind:   # an inference route body_view cannot read: refused, never forwarded unchecked
        raise BadRequest(f"body: no view for inference route {path[:80]}")
    return view_http(kind, decode(body, encodings, kind, limit),
                     request.headers.getall("Inference-Header-Content-Length", []))


def server_timing(ctx: RequestContext) -> str:
    return f"seekgate;dur={ctx.elapsed_ms():.3f};desc=\"seekgate checks before forwarding\""


def error_response(ctx: RequestContext, err: SeekgateError) -> web.Response:
    """Triton's error format; the reason stays in the audit record, never in the body."""
    refuse(ctx, err)
    headers = {"X-Request-Id": ctx.request_id, "Server-Timing": server_timing(ctx), **err.headers()}
    return web.json_response({"error": err.public_message}, status=err.http_status, headers=headers)


async def refused(state: AppState, ctx: RequestContext, err: SeekgateError) -> web.Response:
    """The refusal; under strict audit sent only once its record is durable, else a 503 instead."""
    return await durable_refusal(state, ctx, err, error_response)


# ------------------------------------------------------------------ resources

def resources(settings: Settings, worker: WorkerRole | None = None) -> Callable[[web.Application], AsyncIterator[None]]:
    """The process's long-lived resources; a `worker` of `serve --workers N` shares its limiter with the others."""
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        data_dir = Path(settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)   # noqa: ASYNC240  (start-up: no request waits yet)
        metrics = Metrics()   # model label values: Triton's repository index, read below
        authorizer = Authorizer.from_dir(Path(settings.policy.directory))  # a broken policy stops the start
        metrics.policy_reloaded(authorizer.version)
        metrics.set_known_rules(r.id for r in authorizer.policy.rules)

        def reloaded() -> None:
            metrics.policy_reloaded(authorizer.version)
            metrics.set_known_rules(r.id for r in authorizer.policy.rules)

        def reload_failed(message: str) -> None:
            log.error("policy reload failed, keeping the last good policy: %s", message)
            metrics.policy_reload_failed()

        watcher = PolicyWatcher(authorizer, Path(settings.policy.directory),
                                interval=settings.policy.reload_interval_s,
                                on_reload=reloaded, on_error=reload_failed)
        audit = AuditWriter(data_dir, max_bytes=settings.audit.max_bytes,
                            retention_days=settings.audit.retention_days, on_error=metrics.audit_write_failed,
                            durability=settings.audit.durability,
                            fsync_interval_s=settings.audit.fsync_interval_s,
                            batch_linger_s=settings.audit.batch_linger_ms / 1000.0,
                            file_name=active_name(worker.index if worker else 0),
                            queue_max=settings.audit.queue_max, queue_soft_max=settings.audit.queue_soft_max)
        metrics.set_audit_depth_fn(audit.queue_depth)
        store = await open_store(settings.store, data_dir)
        if (shared_pool := pool_of(store)) is not None:   # one audit trail: index into the shared store too
            audit.share(shared_pool, replica_name(data_dir))
        # A missing, unsafe or wrong root stops the start here (KekError/EnvelopeError says why).
        try:
            keyring = await open_keyring(settings, data_dir, store)
            # Day/month token budgets survive a restart; with workers the supervisor's limiter keeps them.
            # With Redis the budgets live there, shared by every replica and worker.
            budgets = None if worker or settings.redis.url else await BudgetStore.open(budget_store_path(data_dir))
        except BaseException:
            await store.close()
            raise
        up = settings.upstream
        key_file = data_dir / "secrets" / "triton-internal-key"
        internal_key = key_file.read_text().strip() if key_file.exists() else None
        # Every request seekgate forwards carries the key to Triton's restricted APIs: seekgate has
        # authorised it, so a deployment can restrict every category but health to seekgate alone.
        pool = UpstreamPool(up.http_url, up.pool_size, up.connect_timeout_s, up.idle_timeout_s,
                            up.request_timeout_s, ((INTERNAL_HEADER, internal_key),) if internal_key else (),
                            ca_file=up.ca_file)
        models_known = await refresh_models(pool, metrics.set_known_models)
        state = AppState(settings, data_dir, store, keyring.pepper, authorizer, watcher,
                         audit, metrics, pool, internal_key,
                         limiter=choose_limiter(settings, worker, budgets, metrics),
                         sessions=keyring.sessions, key_cache=KeyCache.from_settings(settings.auth),
                         sign_in_guard=SignInGuard.from_settings(settings.auth),
                         keyring=keyring, max_tokens_defaults=MaxTokensDefaults(pool))
        app[STATE] = state
        keyring.on_pepper = lambda pepper: setattr(state, "pepper", pepper)   # a rotated pepper, reloaded
        keyring.on_scheduled = audit.submit
        await state.limiter.start()   # loads today's and this month's budgets before the first request
        await audit.start()
        await watcher.start()
        health = asyncio.create_task(watch_upstream(state))
        models = asyncio.create_task(watch_models(pool, metrics.set_known_models, models_known))
        crypto = asyncio.create_task(keyring.run())   # scheduled rotations; others' rotations picked up
        expiry = asyncio.create_task(watch_expiring(state, window_s=settings.auth.expiry_warning_s))
        expiry_events = asyncio.create_task(watch_expiry_events(
            store, audit.submit, settings.auth.expiry_warning_s, settings.auth.expiry_check_interval_s))
        gauges = asyncio.create_task(refresh_gauges(metrics)) if worker else None
        try:
            yield
        finally:
            health.cancel()
            models.cancel()
            crypto.cancel()
            expiry.cancel()
            expiry_events.cancel()
            if gauges is not None:
                gauges.cancel()
            await watcher.stop()
            await pool.close()
            if state.grpc_stopped is not None:   # its last requests audit into the writer closed below
                await state.grpc_stopped.wait()
            if state.close_status is not None:   # so do the status listener's probes, answered until now
                await state.close_status()
            await state.limiter.close()   # after the last request settled: its charges are written
            metrics.flush()   # workers: the last second's batched updates into the shared files
            # Last: requests still finishing above submit their records before the final flush.
            await audit.close()
            try:   # a pepper re-hash started by a last request lands before the store closes ...
                async with asyncio.timeout(_REHASH_DRAIN_S):
                    await rehashes_settled()
            except TimeoutError:   # ... unless PostgreSQL is away: the key's next use re-hashes it
                log.warning("pepper re-hashes still running at shutdown left to the keys' next use")
            await store.close()
            keyring.close()
    return lifecycle


def choose_limiter(settings: Settings, worker: WorkerRole | None, budgets: BudgetStore | None,
                   metrics: Metrics) -> Limiter:
    """Redis when configured (every replica and worker counts there), else this node's counters."""
    r = settings.redis
    if r.url:
        return RedisLimiter(r.url, prefix=r.key_prefix, lease_s=r.lease_s, timeout_s=r.timeout_s,
                            pool_size=r.pool_size,
                            on_backend_down=settings.limits.on_backend_down, on_backend=metrics.set_limits_backend,
                            on_settlement_dropped=metrics.limits_settlement_dropped)
    return SocketLimiter(worker.limiter_socket) if worker else LocalLimiter(budgets=budgets)


async def watch_upstream(state: AppState, interval: float = 2.0) -> None:
    async def ready() -> bool:
        answer = await state.upstream.request("GET", "/v2/health/ready", ())
        try:
            await answer.read()
        finally:
            answer.release()
        return answer.status == 200

    while True:
        try:
            state.metrics.set_upstream_up(await asyncio.wait_for(ready(), 2))
        except (UpstreamError, asyncio.TimeoutError):
            state.metrics.set_upstream_up(False)
        await asyncio.sleep(interval)


async def watch_expiring(state: AppState, interval: float = 60.0, window_s: float = 72 * 3600.0) -> None:
    """Refresh seekgate_keys_expiring{tier} from the store, so an alert fires days before a key dies."""
    while True:
        try:
            now = time.time()
            # Counted in SQL: a pass that loaded every key of a large fleet each minute left RSS higher each time.
            state.metrics.set_keys_expiring(
                {tier: 0 for tier in ISSUABLE_TIERS} | await state.store.count_expiring(window_s, now))
        except Exception:   # a store hiccup must not end the loop; the next pass retries
            log.exception("refreshing the expiring-keys gauge failed")
        await asyncio.sleep(interval)


async def refresh_gauges(metrics: Metrics, interval: float = 1.0) -> None:
    """Workers only: batched updates and scrape-time gauges copied into the shared files the supervisor serves."""
    while True:
        metrics.refresh()
        await asyncio.sleep(interval)


# The Strict-Transport-Security value of the API listener's app (server.hsts_max_age_s), '' when off. Only
# build_app sets it: the status listener (plain HTTP by design) never sends HSTS, nor does a plain-HTTP answer.
HSTS = web.AppKey("HSTS", str)


def build_app(settings: Settings, worker: WorkerRole | None = None) -> web.Application:
    # client_max_size is irrelevant: bodies are read by read_body() with the configured cap.
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[HSTS] = strict_transport_security(settings.server)
    app[ANSWER] = answer
    app.cleanup_ctx.append(resources(settings, worker))
    app.on_response_prepare.append(last_headers)
    app.router.add_route("*", "/{tail:.*}", request_path)
    return app


async def last_headers(request: web.Request, response: web.StreamResponse) -> None:
    """What every answer carries that is known only as it leaves (one hook: each costs a coroutine an answer).

    - X-RateLimit-* of the key's rpm window on admitted requests (refusals carry their own).
    - While draining, every answer ends its connection and says so (`Connection: close`). Else a
      keep-alive client would send its next request on a connection the shutdown closes under it
      (a reset or an empty answer to a request already sent); told to close, it connects afresh,
      and once the listener is gone is refused before sending anything.
    - An HTTP/1.0 answer of unknown length (an SSE stream, a large chunked answer of Triton's) ends
      with its connection: HTTP/1.0 has no chunked framing, so the client reads to the close.
      aiohttp 3.14 leaves Connection out accordingly but still keeps the connection open (its
      `_prepare_headers` stores keep-alive before clearing it): the client would wait for the end
      of the body until the keep-alive timeout.
    - Strict-Transport-Security (server.hsts_max_age_s) on an answer over TLS that ends here: a browser
      ignores it over plain HTTP (RFC 6797 8.1), and there it could only be a lie; the API and the console
      both answer from this app.
    """
    ctx = request.get(CTX)
    # HSTS first: it is off by default, so most answers look up nothing more.
    if (hsts := request.app.get(HSTS)) and request.secure:
        response.headers["Strict-Transport-Security"] = hsts
    if ctx is not None and ctx.limit_grant is not None:
        response.headers.update(ctx.limit_grant.headers())
    response.headers["Server"] = SERVER_NAME   # not aiohttp's name and version (http_guard.SERVER_NAME)
    if request.version < HttpVersion11 and hdrs.CONTENT_LENGTH not in response.headers:
        response.force_close()
    if request.app[STATE].draining:
        response.force_close()
        response.headers["Connection"] = "close"   # the headers were built before this hook runs


def build_status_app(state: AppState) -> web.Application:
    """The status listener's app: the health probes of the process whose `state` it shares (see status_answer)."""
    app = web.Application()
    app[STATE] = state
    app.on_response_prepare.append(last_headers)
    app[ANSWER] = status_answer
    app.router.add_route("*", "/{tail:.*}", request_path)
    return app


def build_metrics_app(main: web.Application) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        body, content_type = main[STATE].metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.on_response_prepare.append(name_the_server)   # its 404s too
    app.router.add_get("/metrics", metrics_handler)
    return app


async def run(settings: Settings, ready: asyncio.Event | None = None,
              stop: asyncio.Event | None = None, worker: WorkerRole | None = None,
              freeze_heap: bool = False) -> None:
    """Runs the proxy (and, unless a `worker`, its metrics endpoint) until `stop` is set or SIGINT/SIGTERM.

    `freeze_heap`: the process is seekgate's own (`serve`, a worker), see `freeze_startup_heap`.

    Shutdown: readiness fails at once, requests are still taken for `shutdown_delay_s` (load
    balancers move away; each answer closes its connection), then the listeners close and
    in-flight requests and streams get `drain_timeout_s` to finish before the audit log is
    flushed and fsynced.
    """
    s = settings.server
    refusal = plaintext_refusal(s)
    if refusal is not None:   # secure by default: checked before anything binds
        raise SettingsError([refusal])
    if not tls_enabled(s) and s.insecure_plaintext:
        log.warning("server.insecure_plaintext: serving plaintext on %s; API keys cross the network in clear", s.host)
    app = build_app(settings, worker)
    # Bodies and binary tensors pass through untouched: no server-side decompression.
    # GuardedRunner: a header-read deadline aiohttp lacks, and parser errors in Triton's format.
    runner = GuardedRunner(app, header_timeout_s=s.read_timeout_s, auto_decompress=False, access_log=None,
                           shutdown_timeout=s.drain_timeout_s)
    await runner.setup()
    state = runner.app[STATE]   # the cleanup_ctx has built the state by now
    try:
        tls = (ServerTls(s, state.metrics.tls_reloaded, state.metrics.tls_reload_failed, state.metrics.tls_refused)
               if tls_enabled(s) else None)
    except BaseException:
        await runner.cleanup()
        raise
    ssl_context = tls.context if tls else None
    # Over TLS, a client gets read_timeout_s to finish its handshake, as on the gRPC port (tls_site.py).
    sites = [listener_site(runner, s.host, s.http_port, ssl_context, s.read_timeout_s, reuse_port=worker is not None)]
    metrics_runner = None
    if worker is None:   # under --workers the supervisor serves the metrics of all of them
        metrics_runner = web.AppRunner(build_metrics_app(app), access_log=None)
        await metrics_runner.setup()
        sites.append(listener_site(metrics_runner, s.host, s.metrics_port, ssl_context, s.read_timeout_s))
    status_runner = None
    if (status := status_address(s)) is not None:
        # Plaintext whatever server.host and TLS say: it serves readiness and liveness only, so kubelet's
        # httpGet probes work when the API listener demands a client certificate. Every worker binds it too.
        status_runner = GuardedRunner(build_status_app(state), header_timeout_s=s.read_timeout_s,
                                      auto_decompress=False, access_log=None, shutdown_timeout=s.drain_timeout_s)
        await status_runner.setup()
        sites.append(listener_site(status_runner, *status, None, s.read_timeout_s, reuse_port=worker is not None))

    async def close_status() -> None:
        """The status listener closed, its last probes answered and audited (once, whoever asks first)."""
        nonlocal status_runner
        closing, status_runner = status_runner, None
        if closing is not None:
            await closing.cleanup()
    state.close_status = close_status
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    state.grpc_stopped = asyncio.Event()
    grpc_front = GrpcFrontEnd(state)
    reload_tls = asyncio.create_task(tls.watch()) if tls else None
    try:
        await grpc_front.start(s.host, s.grpc_port, reuse_port=worker is not None,
                               tls=tls.grpc_context if tls else None)
        for site in sites:
            await site.start()
        log.info("seekgate%s listening on %s://%s:%d, grpc :%d%s%s", f" worker {worker.index}" if worker else "",
                 "https" if tls else "http", s.host, s.http_port, s.grpc_port,
                 "" if worker else f", metrics :{s.metrics_port}",
                 f" (TLS {s.tls_min_version}+{', client certificates required' if s.tls_client_ca_file else ''})"
                 if tls else " (plaintext)")
        if status is not None:
            log.info("status listener (liveness and readiness only, plaintext) on http://%s:%d", *status)
        if freeze_heap:
            freeze_startup_heap()
        if ready is not None:
            ready.set()
        await stop.wait()
        state.draining = True
        log.info("draining: readiness fails now; in-flight requests get %.0f s", s.drain_timeout_s)
        if s.shutdown_delay_s:
            await asyncio.sleep(s.shutdown_delay_s)
    finally:
        if reload_tls is not None:
            reload_tls.cancel()

        async def stop_grpc() -> None:
            try:
                await grpc_front.stop(grace=s.drain_timeout_s)
            finally:
                assert state.grpc_stopped is not None
                state.grpc_stopped.set()
        # The HTTP listener closes without resetting the connections queued on it (listener.py).
        left = await quiesce(_listening_sockets(sites[0]))
        if left:
            log.warning("%d connections still queued when the HTTP listener closed: the kernel resets them", left)
        # Both front ends drain at once; the cleanup_ctx closes the audit writer after both.
        await asyncio.gather(stop_grpc(), runner.cleanup())
        # The status listener closed in the app's cleanup, before the audit writer (its probes answer 503,
        # draining, until both front ends have drained); here only if that cleanup never ran.
        await close_status()
        if metrics_runner is not None:
            await metrics_runner.cleanup()


def _listening_sockets(site: web.BaseSite) -> list[ListeningSocket]:
    server = getattr(site, "_server", None)   # aiohttp's own; None before start() or if it failed
    return list(getattr(server, "sockets", None) or ())


def freeze_startup_heap() -> None:
    """What start-up built lives as long as the process: moved out of the cyclic collector's reach.

    A full collection then walks only what requests allocated. It walked start-up's 70k objects
    too, a 20-25 ms pause of the event loop every few seconds under load: p99 at trivial c32
    fell from 10.8 to 9.7 ms (median of 8 rounds, bench/README.md).
    """
    gc.collect()   # start-up's garbage goes first: frozen, it would never be freed
    gc.freeze()


def install_uvloop() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:   # an optional speed-up; asyncio's own loop works the same
        pass

