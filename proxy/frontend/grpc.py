"""The gRPC front end: every GRPCInferenceService method through the same pipeline as HTTP, plus health."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2

from ..context import RequestContext, new_id
from ..errors import (
    AuditUnavailable,
    BadRequest,
    Draining,
    PayloadTooLarge,
    SeekgateError,
    StoreUnavailable,
    Unauthenticated,
    Unimplemented,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..local.triton import INTERNAL_HEADER
from ..settings import GRPC_LENGTH_MAX
from ..steps.app_state import AppState
from ..steps.body_view import BodyView, view_grpc
from ..steps.classify import GRPC_SERVICE, classify_grpc
from ..steps.pipeline import (
    UNANSWERED,
    admit,
    audit_ready,
    authorize,
    check_body,
    commit_audit,
    finish,
    identify,
    limit,
    refuse,
)
from ..upstream.forward import REDACTED_ERROR, UPSTREAM_ERROR_KEPT
from ..upstream.grpc_forward import (
    GrpcMethod,
    StreamTokenCounter,
    client_ip,
    http_status_of,
    model_name_of,
    service_methods,
    token_counts,
    upstream_channel,
    upstream_metadata,
)
from .grpc_tls import INNER_HOST, GrpcTlsTerminator

log = logging.getLogger("seekgate.grpc")

HEALTH_SERVICE = "grpc.health.v1.Health"
HEALTH_CHECK = f"/{HEALTH_SERVICE}/Check"
SERVING, NOT_SERVING = 1, 2
_HEALTH_TIMEOUT_S = 2.0
GRPC_INTERNAL_HEADER = f"triton-grpc-protocol-{INTERNAL_HEADER}"
_Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# grpc core's own receive limit sits this far above grpc_max_message_bytes (at most the cap again), so a
# message a little over the cap reaches the handler, which refuses it itself: a 413 audited for certain.
# core's refusal is told from a client's cancel only by the order the handler sees them in, which a
# starved CPU can swap. Beyond the slack core still refuses without buffering the message.
_CORE_SLACK_BYTES = 16 * 1024 * 1024
# grpc core refuses a message over its limit itself: the handler sees the request stream end, then
# the call cancelled. A cancellation this soon after an end with no message is that refusal.
_OVER_CAP_GRACE_S = 1.0
_OVER_CAP_REASON = "body_too_large: over server.grpc_max_message_bytes"
_OVER_CAP = "grpc_message_over_cap"   # ctx.extra: refused by core for its size, audited as such
_NEVER_CONNECTED = "failed to connect to all addresses"   # grpc core's UNAVAILABLE when no subchannel connected
# How grpc core's UNAVAILABLE begins when the connection failed or was lost (chttp2), not Triton's answer.
_TRANSPORT_FAILURES = (_NEVER_CONNECTED, "Stream removed", "Socket closed", "Connection reset", "Broken pipe",
                       "GOAWAY", "keepalive watchdog timeout")
_NO_TLS_PEER = "no_tls_peer"   # ctx.extra: TLS is on, but the call's connection is not one the TLS listener made


def _health_messages() -> tuple[type[Message], type[Message]]:
    """grpc.health.v1 request/response, built here: grpcio-health-checking is not a dependency."""
    f = descriptor_pb2.FileDescriptorProto(name="seekgate/grpc_health.proto", package="grpc.health.v1",
                                           syntax="proto3")
    req = f.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    resp = f.message_type.add(name="HealthCheckResponse")
    enum = resp.enum_type.add(name="ServingStatus")
    for i, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        enum.value.add(name=name, number=i)
    resp.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                   type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()   # private: never clashes with grpc_health if installed
    pool.Add(f)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")))


HealthCheckRequest, HealthCheckResponse = _health_messages()


class GrpcFrontEnd:
    """The grpc.aio server and its one shared channel to Triton; start() after the AppState exists."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.methods = {m.path: m for m in service_methods()}
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None
        self._upstream: dict[str, Any] = {}   # method path -> multicallable on the shared channel
        self.port = 0
        self.tls: GrpcTlsTerminator | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False,
                    tls: ssl.SSLContext | None = None) -> int:
        """Listen on host:port (over TLS with `tls`, terminated by grpc_tls.py); `reuse_port` lets the
        workers of `serve --workers N` share it."""
        cap = self.state.settings.server.grpc_max_message_bytes
        caps = [("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap)]
        core_limit = min(GRPC_LENGTH_MAX, cap + min(cap, _CORE_SLACK_BYTES))
        # Triton is on loopback: after a restart, reconnect within seconds, not grpc's default 2 minutes.
        backoff = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
        self.channel = upstream_channel(self.state.settings.upstream, caps + backoff)
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for m in self.methods.values():
            self._upstream[m.path] = (self.channel.stream_stream(m.path) if m.streaming
                                      else self.channel.unary_unary(m.path))
            # No (de)serializers: messages travel as the client's bytes; requests are parsed only to read fields.
            # Unary methods take their one message as a stream (same bytes on the wire): a unary handler
            # never runs for a message core refused over the cap, and that refusal must be audited.
            handlers[m.name] = (grpc.stream_stream_rpc_method_handler(self._stream) if m.streaming
                                else grpc.stream_unary_rpc_method_handler(self._unary_for(m)))
        # grpc sets SO_REUSEPORT by default: off unless asked, so a second seekgate on a taken port fails.
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", core_limit),
                                               ("grpc.max_send_message_length", cap),
                                               ("grpc.so_reuseport", int(reuse_port))])
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers),
            grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
                "Check": grpc.unary_unary_rpc_method_handler(self._health)}),
            _EveryOtherMethod(self._unimplemented),   # last: asked only for a method the two above lack
        ))
        if tls is None:
            # grpc reads host:port as a URI authority: an IPv6 literal ("::", "::1") without its brackets is
            # a malformed name, and the port fails to bind.
            self.port = self.server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            await self.server.start()
        else:
            # The grpc server listens on a private loopback port; the TLS listener in front is the door.
            inner_port = self.server.add_insecure_port(f"{INNER_HOST}:0")
            await self.server.start()
            self.tls = GrpcTlsTerminator(tls, self.state.settings.server.read_timeout_s)
            self.port = await self.tls.start(host, port, inner_port, reuse_port)
        log.info("seekgate gRPC listening on %s:%d -> %s", host, self.port, self.state.settings.upstream.grpc_target)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        """Finishes in-flight calls for `grace` seconds, so their audit records are submitted."""
        if self.tls is not None:
            self.tls.close()   # no new connections; open ones carry grpc's drain to their clients
        if self.server is not None:
            await self.server.stop(grace)
        if self.tls is not None:
            await self.tls.abort_all()
        if self.channel is not None:
            await self.channel.close()

    # ------------------------------------------------------------------ unary calls

    def _unary_for(self, method: GrpcMethod) -> _Handler:
        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            return await self._unary(method, requests, context)
        return handle

    async def _unary(self, method: GrpcMethod, requests: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext) -> bytes:
        """context -> authenticate -> classify -> authorize -> forward -> audit + metrics."""
        state, ctx = self.state, self._context(context, method.path)
        try:
            async with self._refusals(context, ctx):
                self._check_peer(ctx)
                try:
                    # asyncio.timeout, not wait_for: a read in another task never sees core's cancellation.
                    async with asyncio.timeout(state.settings.server.read_timeout_s):
                        raw = await anext(requests.__aiter__(), None)
                except TimeoutError:
                    raise BadRequest("no_message_before_read_timeout") from None
                if raw is None:
                    await _refused_by_core(ctx)
                    raise BadRequest("no_request_message")
                self._check_size(raw)
                if method.name in ("ServerLive", "ServerReady"):
                    # Liveness probes need no key, exactly like /v2/health/* over HTTP.
                    ctx.resource = classify_grpc(method.name, "")
                    if method.name == "ServerReady" and state.draining:
                        raise Draining()
                    if method.name == "ServerReady" and (why := state.unready_because()):
                        raise StoreUnavailable(f"{why}_unavailable: readiness")
                else:
                    request = _parse(method.request_type, raw)
                    await admit(state, ctx, _authorization(context),
                                lambda: classify_grpc(method.name, model_name_of(method.name, request)))
                    view = view_grpc(request)
                    await check_body(state, ctx, view)
                    await limit(state, ctx, view.asked_tokens())
                assert ctx.resource is not None
                await audit_ready(state)   # strict audit fails closed before anything is forwarded
                started = asyncio.get_running_loop().time()
                try:
                    response: bytes = await self._upstream[method.path](
                        raw, metadata=self._metadata(context), timeout=self._timeout(context))
                finally:
                    ctx.upstream_ms = (asyncio.get_running_loop().time() - started) * 1000.0
                ctx.http_status = 200
                if method.name == "ModelInfer":
                    ctx.input_tokens, ctx.output_tokens = token_counts(
                        service_pb2.ModelInferResponse.FromString(response))
                await commit_audit(state, ctx)   # strict audit: durable before grpc sends the response
                return response
        finally:
            finish(state, ctx)
        raise AssertionError("unreachable: abort raises")

    @contextlib.asynccontextmanager
    async def _refusals(self, context: grpc.aio.ServicerContext, ctx: RequestContext) -> AsyncIterator[None]:
        """Turns whatever ends a call early into its gRPC status and audit fields (abort raises)."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            await self._upstream_failed(context, ctx, exc)
        except SeekgateError as err:
            await self._abort(context, ctx, err)
        except asyncio.CancelledError:
            if not ctx.extra.get(_OVER_CAP):
                ctx.status, ctx.reason, ctx.http_status = "error", "client_cancelled", 499
            raise
        except grpc.aio.AbortError:
            raise   # a status already sent (context.abort raises this)
        except Exception as exc:
            # A bug, not a refusal: still an audited INTERNAL carrying the request id, as over HTTP.
            log.exception("call %s failed", ctx.request_id)
            await self._abort(context, ctx, SeekgateError(f"internal_error: {type(exc).__name__}"))

    # ------------------------------------------------------------------ ModelStreamInfer

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """Authenticated when it opens; every message classified and authorised before it is forwarded."""
        state, ctx = self.state, self._context(context, f"/{GRPC_SERVICE}/ModelStreamInfer")
        counter = StreamTokenCounter()
        sent = 0   # messages written to Triton: each should end in a final answer or an error
        call: Any = None
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with self._refusals(context, ctx):
                self._check_peer(ctx)
                # admit() needs the resource, which only the first message names: authenticate now, so a
                # client without a valid key is refused before it sends anything.
                ctx.principal = await identify(state, ctx, _authorization(context))
                incoming = requests.__aiter__()
                first_view: list[BodyView] = []   # the first message's view: the stream's estimate

                async def admitted(timeout: float | None = None) -> bytes | None:
                    async with asyncio.timeout(timeout):   # in this task: see _unary
                        raw = await anext(incoming, None)
                    if raw is not None:
                        self._check_size(raw)
                        request = _parse(service_pb2.ModelInferRequest, raw)
                        resource = classify_grpc("ModelStreamInfer", request.model_name)
                        authorize(state, ctx, resource)
                        ctx.resource = ctx.resource or resource
                        view = view_grpc(request)
                        await check_body(state, ctx, view, resource.model)
                        if not first_view:
                            first_view.append(view)
                    return raw

                try:
                    first = await admitted(state.settings.server.read_timeout_s)
                except asyncio.TimeoutError:
                    raise BadRequest("no_message_before_read_timeout") from None
                if first is None:
                    await _refused_by_core(ctx)   # an over-cap first message also ends the stream here
                    ctx.http_status = 200
                    await commit_audit(state, ctx)
                    return
                await audit_ready(state)
                # One admission per stream, charged the first request's estimate; the slot is held
                # until the stream ends and the charge corrected to the stream's token totals.
                await limit(state, ctx, first_view[0].asked_tokens())
                assert ctx.resource is not None
                call = self._upstream[ctx.path](metadata=self._metadata(context),
                                                timeout=self._timeout(context))
                started = asyncio.get_running_loop().time()

                async def pump() -> None:
                    nonlocal sent
                    raw: bytes | None = first
                    while raw is not None:
                        # Counted before the write: a cancel during it may come after grpc took the
                        # bytes, and Triton then runs a message the meter would not charge (fail closed).
                        sent += 1
                        try:
                            await call.write(raw)
                        except asyncio.InvalidStateError:
                            sent -= 1   # the upstream call was over: this one never left
                            return   # relay() reports how it ended
                        raw = await admitted()
                    await call.done_writing()

                writing = asyncio.Lock()

                async def relay() -> None:
                    while (raw := await call.read()) is not grpc.aio.EOF:
                        # Triton's time ends at its last response, not its first: else the rest of
                        # the generation was counted as seekgate_overhead_seconds, seekgate's own.
                        ctx.upstream_ms = (asyncio.get_running_loop().time() - started) * 1000.0
                        counter.feed(raw)
                        async with writing:
                            await context.write(raw)

                reader = asyncio.create_task(relay())
                tasks = {asyncio.create_task(pump()), reader}
                try:
                    while reader in tasks:
                        done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()   # a refused message or an upstream error ends the stream here
                except Exception:
                    # The refusal goes out as the call's status, which grpc refuses to send beside a
                    # response write still in flight (TOO_MANY_OPERATIONS: the client then hangs to its
                    # deadline). So the write in flight finishes, and the relay stops, first.
                    async with writing:
                        for task in tasks:
                            task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
                ctx.http_status = 200
                # Strict audit: the responses are out, the OK status (the stream's end) waits for the record.
                ctx.input_tokens, ctx.output_tokens = counter.totals()
                await commit_audit(state, ctx)
        finally:
            for task in tasks:
                task.cancel()
            if call is not None:
                call.cancel()   # a client that went away takes its upstream call with it
            ctx.input_tokens, ctx.output_tokens = counter.totals()
            if counter.answered < sent:
                # Cancelling the call does not stop what Triton was sent: the meter settles at the bound.
                ctx.extra[UNANSWERED] = True
            finish(state, ctx)

    async def _unimplemented(self, path: str, requests: AsyncIterator[bytes],
                             context: grpc.aio.ServicerContext) -> None:
        """A method no service here has: Triton's UNIMPLEMENTED with no message, audited like any refusal.

        Answered before any key, as Triton answers it: the method names are the public proto's."""
        ctx = self._context(context, path[:200])
        try:
            await self._abort(context, ctx, Unimplemented(f"no gRPC method: {ctx.path}"))
        finally:
            finish(self.state, ctx)

    # ------------------------------------------------------------------ health

    async def _health(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """SERVING while Triton says it is ready; public, like /v2/health/ready."""
        ctx = self._context(context, HEALTH_CHECK)
        ctx.resource = classify_grpc("ServerReady", "")
        try:
            self._check_peer(ctx)
            self._check_size(raw)
            request = _parse(HealthCheckRequest, raw)
            if request.service not in ("", GRPC_SERVICE):
                ctx.status, ctx.reason, ctx.http_status = "denied", "unknown_service", 404
                await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
            ready = service_pb2.ServerReadyResponse(ready=False)
            if self.state.draining or (why := self.state.unready_because()):
                ctx.reason = "draining" if self.state.draining else f"{why}_unavailable"
                return bytes(HealthCheckResponse(status=NOT_SERVING).SerializeToString())
            try:
                ready = service_pb2.ServerReadyResponse.FromString(
                    await self._upstream[f"/{GRPC_SERVICE}/ServerReady"](
                        service_pb2.ServerReadyRequest().SerializeToString(), timeout=_HEALTH_TIMEOUT_S))
            except grpc.aio.AioRpcError as exc:
                ctx.reason = f"upstream_not_ready: {exc.code().name}"
            ctx.http_status = 200
            return bytes(HealthCheckResponse(status=SERVING if ready.ready else NOT_SERVING).SerializeToString())
        except SeekgateError as err:
            await self._abort(context, ctx, err)
            raise AssertionError("unreachable: abort raises") from err
        finally:
            finish(self.state, ctx)

    # ------------------------------------------------------------------ shared pieces

    def _context(self, context: grpc.aio.ServicerContext, path: str) -> RequestContext:
        peer = context.peer()
        ctx = RequestContext(request_id=new_id(), client_ip=client_ip(peer), protocol="grpc", method="POST",
                             path=path)
        if self.tls is not None:   # the address grpc sees is the TLS listener's relay: ask it who is behind
            tls_peer = self.tls.peer_of(peer)
            ctx.client_ip = tls_peer.client_ip if tls_peer else ""
            ctx.peer_cert = tls_peer.cert if tls_peer else None   # mTLS: verified in the handshake
            ctx.extra[_NO_TLS_PEER] = tls_peer is None
        return ctx

    @staticmethod
    def _check_peer(ctx: RequestContext) -> None:
        """Fail closed: a call that did not come through the TLS listener has no known client."""
        if ctx.extra.get(_NO_TLS_PEER):
            raise Unauthenticated("connection_not_from_tls_listener")

    def _check_size(self, raw: bytes) -> None:
        """A message over the cap that grpc core let through (see _CORE_SLACK_BYTES) is refused here."""
        if len(raw) > self.state.settings.server.grpc_max_message_bytes:
            raise PayloadTooLarge(_OVER_CAP_REASON)

    def _metadata(self, context: grpc.aio.ServicerContext) -> list[tuple[str, Any]]:
        metadata = upstream_metadata(context.invocation_metadata())
        if self.state.internal_key:
            # Every call seekgate forwards is authorised, so every one carries the key (as over HTTP, see
            # UpstreamPool): Triton's --grpc-restricted-protocol reads it from "triton-grpc-protocol-<header>".
            metadata.append((GRPC_INTERNAL_HEADER, self.state.internal_key))
        return metadata

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The client's deadline, capped by upstream.request_timeout_s."""
        remaining = context.time_remaining()
        limit = self.state.settings.upstream.request_timeout_s
        return limit if remaining is None else min(remaining, limit)

    async def _abort(self, context: grpc.aio.ServicerContext, ctx: RequestContext, err: SeekgateError) -> None:
        refuse(ctx, err)
        try:
            await commit_audit(self.state, ctx)   # strict audit: the refusal is durable before it is sent
        except AuditUnavailable as audit_err:
            err = audit_err
            refuse(ctx, err)
        trailing: tuple[tuple[str, str], ...] = (("x-request-id", ctx.request_id),)
        # Retry-After and X-RateLimit-* as trailing metadata; other HTTP headers mean nothing here.
        trailing += tuple((k.lower(), v) for k, v in err.headers().items()
                          if k.lower() == "retry-after" or k.lower().startswith("x-ratelimit-"))
        await context.abort(err.grpc_code, err.public_message, trailing)

    async def _upstream_failed(self, context: grpc.aio.ServicerContext, ctx: RequestContext,
                               exc: grpc.aio.AioRpcError) -> None:
        code, details = exc.code(), exc.details() or ""
        if not self._triton_answered(details):
            # Not Triton's answer but the transport's: as over HTTP, no upstream time, so the meter
            # charges the bound (Triton may have run the request), or nothing when no connection
            # could be made at all (core fails the call's pick with _NEVER_CONNECTED: it never left).
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                ctx.upstream_ms = None
                ctx.never_sent = details.startswith(_NEVER_CONNECTED)
            if code == grpc.StatusCode.UNAVAILABLE:
                # Connection details name internal addresses: the client gets our message, the audit the cause.
                await self._abort(context, ctx, UpstreamUnavailable(f"upstream_unavailable: {details}"))
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                await self._abort(context, ctx, UpstreamTimeout("upstream_timeout"))
        # Triton's own refusals (unknown model, bad tensor, a model's UNAVAILABLE) pass through, as over HTTP.
        ctx.http_status = http_status_of(code)
        ctx.reason = f"upstream_{code.name.lower()}"
        if ctx.http_status >= 500:
            # As over HTTP (forward._upstream_error): the audit keeps the start of Triton's message, and
            # upstream.redact_errors hides it from the client here too, or the gRPC port would leak the
            # stack traces and paths the HTTP port redacts. The code stays Triton's: clients retry by it.
            ctx.reason += ": " + details[:UPSTREAM_ERROR_KEPT]
            if self.state.settings.upstream.redact_errors:
                details = REDACTED_ERROR
        try:
            await commit_audit(self.state, ctx)
        except AuditUnavailable as audit_err:
            await self._abort(context, ctx, audit_err)
        await context.abort(code, details, (("x-request-id", ctx.request_id),))

    def _triton_answered(self, details: str) -> bool:
        """Whether the call that just failed was answered by Triton, not ended by a failed connection.

        grpc reports both alike (same code, no metadata, and debug_error_string no longer says "received
        from peer"), but a call that could not connect, or lost its connection, leaves the channel out of
        READY, while Triton's own UNAVAILABLE (a model shedding load) leaves it connected. The channel's
        state can lag the failure, though (a cut connection's call failed while the channel still read
        READY, under load): grpc core's own words for a lost or refused connection settle it first, on
        the safe side (our 503, the request's bound charged). A connection lost just after Triton
        answered reads as a failure: the client then gets our message, never an address.
        """
        if details.startswith(_TRANSPORT_FAILURES):
            return False
        return self.channel is not None and self.channel.get_state() == grpc.ChannelConnectivity.READY


class _EveryOtherMethod(grpc.GenericRpcHandler):
    """The handler for every method the server's services lack (grpc's own answer says "Method not found!")."""

    def __init__(self, handle: Callable[[str, AsyncIterator[bytes], grpc.aio.ServicerContext],
                                        Awaitable[None]]) -> None:
        self._handle = handle

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        # Any call shape (a stream handler reads none of the bytes) bound to the method's path.
        method: Any = getattr(handler_call_details, "method", b"")   # grpc's stubs do not declare it
        path = method.decode("ascii", "replace") if isinstance(method, bytes) else str(method)
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._handle, path))


async def _refused_by_core(ctx: RequestContext) -> None:
    """The request stream ended with no message: waits briefly for the cancellation that follows when
    grpc core refused the message over grpc_max_message_bytes (RESOURCE_EXHAUSTED to the client), and
    records that refusal on ctx, so finish() audits it as body_too_large (413, as over HTTP)."""
    try:
        await asyncio.sleep(_OVER_CAP_GRACE_S)
    except asyncio.CancelledError:
        refuse(ctx, PayloadTooLarge(_OVER_CAP_REASON))
        ctx.extra[_OVER_CAP] = True
        raise


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


def _parse(message_type: type[Message], raw: bytes) -> Any:
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise BadRequest("malformed_message") from exc
