"""The forward step: one request to Triton over the upstream pool, the answer relayed back unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ..context import RequestContext
from ..errors import AuditUnavailable, BadRequest, UpstreamTimeout, UpstreamUnavailable
from . import pool as upstream_http
from . import tokens
from .pool import UpstreamPool, UpstreamResponse

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})
# Headers a client may not pass to Triton: the credential, identities only seekgate
# may assert, and the header that unlocks Triton's shared-memory API.
_DROPPED = frozenset({"authorization", "host", "content-length", "cookie", "forwarded", "expect", "x-real-ip",
                      "x-client-ip", "true-client-ip"})
_DROPPED_PREFIXES = ("x-seekgate-", "x-forwarded-", "triton-grpc-protocol-", "seekgate-internal")
# aiohttp frames the response itself; Triton's Server and Date would only be duplicates.
_RESPONSE_DROPPED = frozenset({"content-length", "server", "date"})
_RESPONSE_SKIP = HOP_BY_HOP | _RESPONSE_DROPPED
BUFFERED_LIMIT = 1 << 20   # token counts are read from non-stream bodies up to this size
# A plain answer up to this size is read whole and sent in one write; larger ones are streamed.
WHOLE_LIMIT = 64 * 1024
UPSTREAM_ERROR_KEPT = 512  # bytes of a Triton 5xx body kept in the audit reason
REDACTED_ERROR = "inference server error"   # upstream.redact_errors: what a client reads instead (HTTP and gRPC)
BeforeSend = Callable[[], Awaitable[None]]


def upstream_headers(incoming: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Client headers minus hop-by-hop, credentials and spoofable identity headers."""
    connection = incoming.get("Connection")
    listed = {h.strip().lower() for h in connection.split(",") if h.strip()} if connection else ()
    out: list[tuple[str, str]] = []
    for name, value in incoming.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in _DROPPED or low in listed or low.startswith(_DROPPED_PREFIXES):
            continue
        out.append((name, value))
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Triton's headers minus hop-by-hop ones (and those its Connection header names) and aiohttp's own."""
    connection = upstream.get("Connection")
    skip = _RESPONSE_SKIP if connection is None else _RESPONSE_SKIP.union(
        h.strip().lower() for h in connection.split(",") if h.strip())
    return CIMultiDict([(k, v) for k, v in upstream.items() if k.lower() not in skip])


async def forward(request: web.Request, ctx: RequestContext, pool: UpstreamPool, path_qs: str, body: bytes,
                  server_timing: str, before_send: BeforeSend | None = None,
                  redact_errors: bool = False) -> web.StreamResponse:
    """Sends the request to Triton and streams the answer, event by event for SSE.

    `before_send` (strict audit) runs once the response is known and before it is complete on the
    wire: a plain body is read whole first, so the record carries its token counts and the
    client gets nothing until the record is durable; an SSE stream is relayed event by event
    and the terminating chunk waits for it (holding events back would stall every token).
    If it raises, a plain response becomes that error; a stream is cut without its end.

    Triton's answers pass unchanged, its errors included (a client reads Triton's message and
    Content-Type); `redact_errors` (upstream.redact_errors) replaces the bodies of its 5xx answers.
    The audit record keeps the start of Triton's error message either way.
    """
    headers = upstream_headers(request.headers)
    started = time.perf_counter()
    # A request queued in Triton for a client gone is dropped (the pool closes its connection), not run.
    with cancel_on_leave(request) as gone:
        try:
            upstream = await pool.request(request.method, path_qs, headers, body)
        except ValueError as exc:   # aiohttp's parser refuses CR/LF already; this is the last line of defence
            raise BadRequest("unforwardable_header", public_message="malformed request header") from exc
        except upstream_http.UpstreamTimeout as exc:
            ctx.never_sent = not exc.sent
            raise UpstreamTimeout(str(exc)) from exc
        except upstream_http.UpstreamConnectError as exc:
            ctx.never_sent = not exc.sent   # the pool's word, as for a timeout
            raise UpstreamUnavailable(str(exc)) from exc
        except upstream_http.UpstreamBroken as exc:
            raise UpstreamUnavailable(f"upstream_unreachable: {exc}") from exc
        except asyncio.CancelledError:
            if not left_client(gone):
                raise   # not ours: the drain timeout's
            return client_left(ctx)
    ctx.upstream_ms = (time.perf_counter() - started) * 1000.0
    try:
        return await _relay(request, ctx, upstream, server_timing, before_send, redact_errors)
    finally:
        upstream.release()


async def _relay(request: web.Request, ctx: RequestContext, upstream: UpstreamResponse,
                 server_timing: str, before_send: BeforeSend | None, redact_errors: bool) -> web.StreamResponse:
    streaming = time.perf_counter()   # Triton's headers are in; a streamed body is Triton's time too
    headers = response_headers(upstream.headers)
    headers["Server-Timing"] = (f"{server_timing}, "
                                f"upstream;dur={ctx.upstream_ms:.3f};desc=\"time to Triton's response headers\"")
    headers["X-Request-Id"] = ctx.request_id
    ctx.http_status = upstream.status
    if upstream.status >= 300 and upstream.status < 400:
        # Never follow or relay a redirect from the inference server.
        ctx.status, ctx.reason = "error", "upstream_redirect"
        ctx.http_status = 502
        if before_send is not None:
            await before_send()
        # Only seekgate's own headers: nothing of Triton's redirect (its Location least of all) goes out.
        return web.json_response({"error": "unexpected redirect from inference server"}, status=502,
                                 headers={"Server-Timing": headers["Server-Timing"], "X-Request-Id": ctx.request_id})
    if upstream.status >= 500 and redact_errors:
        return await _generic_error(ctx, upstream, headers, before_send)
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    want_counts = ctx.resource is not None and ctx.resource.action == "infer"
    length = upstream.headers.get("Content-Length")
    if not is_sse and (before_send is not None or (length is not None and length.isdigit()
                                                   and int(length) <= WHOLE_LIMIT)):
        return await _relay_whole(ctx, upstream, headers, want_counts, before_send)
    first = b""
    if not is_sse and length is None:
        # A chunked plain answer (Triton's generate) is complete before Triton sends it: a small
        # one goes out whole, with a length, in one write instead of three (headers, the chunk,
        # the last chunk). A bigger one is streamed on from what was read.
        try:
            first, complete = await upstream.read_ahead(WHOLE_LIMIT)
        except upstream_http.UpstreamError as exc:
            raise UpstreamUnavailable(f"upstream_broke_mid_response: {exc}") from exc
        if complete:
            return _whole(ctx, upstream, headers, first, want_counts)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if length is not None and not is_sse:
        response.content_length = int(length)
    counter = tokens.SseTokenCounter() if is_sse else None
    kept: list[bytes] = []
    kept_size = 0
    # Releasing `upstream` after a client left closes Triton's side, which cancels the request there.
    with cancel_on_leave(request) as gone:
        try:
            try:
                await response.prepare(request)
            except ConnectionError:   # gone before the headers (unwatched: aiohttp's own protocol)
                return client_left(ctx)
            async for chunk in _body(first, upstream):
                try:
                    await response.write(chunk)
                except ConnectionError:
                    ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499
                    break
                if upstream.status >= 500 and not ctx.reason:
                    _upstream_error(ctx, chunk)
                if counter is not None:
                    counter.feed(chunk)
                elif want_counts and kept_size < BUFFERED_LIMIT:
                    kept.append(chunk)
                    kept_size += len(chunk)
        except upstream_http.UpstreamError as exc:
            # Headers are gone already: the best we can do is end the stream and say so in the audit.
            ctx.status, ctx.reason = "error", f"upstream_broke_mid_response: {exc}"
        except asyncio.CancelledError:
            if not left_client(gone):
                raise   # not ours: the drain timeout's
            ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499
    if ctx.upstream_ms is not None:
        # Triton's time ends at its last chunk, not at its headers (the Server-Timing sent): else a
        # stream's whole generation was seekgate_overhead_seconds, seekgate's own time.
        ctx.upstream_ms += (time.perf_counter() - streaming) * 1000.0
    if counter is not None:
        ctx.input_tokens, ctx.output_tokens = counter.input_tokens, counter.output_tokens
    elif want_counts and upstream.status == 200 and kept_size < BUFFERED_LIMIT:
        _count(ctx, b"".join(kept), upstream.headers)
    if ctx.reason == "client_disconnected":
        return response
    if before_send is not None:
        try:
            await before_send()
        except AuditUnavailable as exc:
            # Headers and events are out: all that is left is to withhold the end of the stream.
            ctx.status, ctx.reason = "error", f"stream_cut: {exc.reason}"
            if request.transport is not None:
                request.transport.abort()
            return response
    await response.write_eof()
    return response


def client_left(ctx: RequestContext) -> web.Response:
    """The client went before its answer began: nobody reads this; the record says 499, with the tokens
    counted so far (none: finish() charges the estimate, as Triton may have run it)."""
    ctx.status, ctx.reason, ctx.http_status = "error", "client_disconnected", 499
    return web.Response(status=499)


@contextlib.contextmanager
def cancel_on_leave(request: web.Request) -> Iterator[asyncio.Future[None] | None]:
    """Cancels the current task when the client's connection goes: between two events Triton may
    think for long, and a client gone must stop the relay (and, once the caller releases its
    upstream connection, the generation) when it goes, not at the next write. The guarded
    connection (frontend/http_guard.py) keeps the `lost` future; aiohttp's own has none: None."""
    gone: asyncio.Future[None] | None = getattr(request.protocol, "lost", None)
    task = asyncio.current_task()
    assert task is not None

    def interrupt(_: object) -> None:
        task.cancel()
    if gone is not None:
        gone.add_done_callback(interrupt)
    try:
        yield gone
    finally:
        if gone is not None:
            gone.remove_done_callback(interrupt)


def left_client(gone: asyncio.Future[None] | None) -> bool:
    """After a CancelledError: whether it was the client leaving (then the cancel is consumed here)."""
    if gone is None or not gone.done():
        return False
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()
    return True


async def _relay_whole(ctx: RequestContext, upstream: UpstreamResponse, headers: CIMultiDict[str],
                       want_counts: bool, before_send: BeforeSend | None) -> web.Response:
    """The whole body read first, then `before_send`, then the response (handed to aiohttp to send)."""
    try:
        body = await upstream.read()
    except upstream_http.UpstreamError as exc:
        # Nothing sent yet, so unlike a streamed relay the client gets a clean error.
        raise UpstreamUnavailable(f"upstream_broke_mid_response: {exc}") from exc
    response = _whole(ctx, upstream, headers, body, want_counts)   # the counts go into the durable record
    if before_send is not None:
        await before_send()
    return response


def _whole(ctx: RequestContext, upstream: UpstreamResponse, headers: CIMultiDict[str], body: bytes,
           want_counts: bool) -> web.Response:
    """The answer with its whole body, token counts (or Triton's error) read from it onto ctx."""
    if upstream.status >= 500:
        _upstream_error(ctx, body)
    if want_counts and upstream.status == 200 and len(body) < BUFFERED_LIMIT:
        _count(ctx, body, upstream.headers)
    return web.Response(body=body, status=upstream.status, reason=upstream.reason, headers=headers)


async def _body(first: bytes, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    """`first` (what was read ahead, if anything), then the rest of the body as it arrives."""
    if first:
        yield first
    async for chunk in upstream.iter_any():
        yield chunk


def _upstream_error(ctx: RequestContext, body: bytes) -> None:
    """A Triton 5xx: an error in the audit record, with the start of Triton's own message."""
    ctx.status, ctx.reason = "error", "upstream_error: " + body[:UPSTREAM_ERROR_KEPT].decode("utf-8", "replace")


async def _generic_error(ctx: RequestContext, upstream: UpstreamResponse, headers: CIMultiDict[str],
                         before_send: BeforeSend | None) -> web.Response:
    """upstream.redact_errors: Triton's 5xx bodies may carry stack traces and file paths, so the client
    gets a generic error (same status), the audit record the start of the original. 4xx bodies pass."""
    try:
        original = await upstream.read_upto(UPSTREAM_ERROR_KEPT)
    except upstream_http.UpstreamError:
        original = b""
    _upstream_error(ctx, original)
    if before_send is not None:
        await before_send()
    kept = {k: headers[k] for k in ("X-Request-Id", "Server-Timing", "Retry-After") if k in headers}
    return web.json_response({"error": REDACTED_ERROR}, status=upstream.status, headers=kept)


def _count(ctx: RequestContext, body: bytes, headers: CIMultiDictProxy[str]) -> None:
    assert ctx.resource is not None
    # Triton compresses what the client's Accept-Encoding asks for: counted on an inflated copy.
    plain = tokens.inflated(body, headers.get("Content-Encoding"), BUFFERED_LIMIT)
    if plain is None:
        return   # unreadable: no counts, the meter settles at the request's bound
    body = plain
    if ctx.path.endswith("/generate"):
        ctx.input_tokens, ctx.output_tokens = tokens.from_generate(body)
        return
    header_length = headers.get("Inference-Header-Content-Length")
    ctx.input_tokens, ctx.output_tokens = tokens.from_infer(
        body, int(header_length) if header_length and header_length.isdigit() else None)
