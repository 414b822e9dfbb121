"""Hostile-HTTP guards aiohttp lacks: odd framing, slow clients, compressed-size caps, clean parser errors.

What aiohttp 3.14's parsers (the C one and the pure-Python one alike, both tested) already refuse
with 400 and a closed connection, before any handler runs: Content-Length with Transfer-Encoding,
duplicate or malformed Content-Length, `chunked` not last (`chunked, identity`), unknown codings
(`xchunked`, `identity`), duplicate Transfer-Encoding, bare LF line endings, obs-fold
continuation lines, whitespace before a header name or colon. What they let through, refused
here by `check_framing`: a Transfer-Encoding other than exactly `chunked` with `chunked` last
(`gzip, chunked`: the gzip coding would reach Triton undeclared) and Transfer-Encoding on an
HTTP/1.0 request (RFC 9112 6.1: framing is faulty). Leading whitespace in the value
(`Transfer-Encoding:  chunked`) is legal OWS that both parsers strip: not an ambiguity.

aiohttp has no timeout for reading a request line and headers (only a 3630 s keep-alive), so
`GuardedRunner` installs a request handler that answers 408 and closes a connection whose
next request's headers are not complete `header_timeout_s` after its first byte (or after the
connection opened); the cut is audited like any refusal (reason `header_timeout`).

The same handler bounds a connection's drain on shutdown by one `shutdown_timeout`: aiohttp
waits that long for a running handler, then as long again after failing its body read (ours
have read their bodies by then), so a stream outliving the drain kept the process for twice
`server.drain_timeout_s`.

It also keeps a `lost` future per connection, resolved when the client's connection goes:
`upstream/forward.py` reads it off `request.protocol` so a long relay notices a client that left
without waiting for its next failed write (which, upstream stalled, may never come).

`read_body` reads a request body under the same deadline and the body-size cap, for every door on
the HTTP port (Triton's routes and the OpenAI API alike).

That handler subclasses aiohttp's `RequestHandler` and reads a few of its private attributes
(`AIOHTTP_INTERNALS`), tested against aiohttp 3.14 only: `check_aiohttp_internals` runs when a
`GuardedRunner` is made and stops the start with one clear line if an aiohttp upgrade moved them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import BaseSite, TCPSite
from aiohttp.web_server import Server

from ..context import RequestContext, client_ip_text, new_id

# FramingError, RequestTimeout and closes_connection live in the error tree; re-exported here.
from ..errors import (
    AuditUnavailable,
    BadRequest,
    FramingError,
    PayloadTooLarge,
    RequestTimeout,
    SeekgateError,
    closes_connection,
)
from ..steps.app_state import STATE, AppState
from ..steps.pipeline import commit_audit, finish, refuse

__all__ = ["AIOHTTP_INTERNALS", "SERVER_NAME", "FramingError", "GuardedRequestHandler", "GuardedRunner",
           "RequestTimeout", "check_aiohttp_internals", "check_framing", "closes_connection", "decoded_size_within",
           "name_the_server"]

log = logging.getLogger("seekgate.http")

_408 = json.dumps({"error": "request timed out"}).encode()
# Every answer's Server header: aiohttp would name itself and its version (Python/3.11 aiohttp/3.14.5),
# which tells a scanner what to try; nothing to advertise.
SERVER_NAME = "seekgate"


def _408_response(request_id: str) -> bytes:
    return (b"HTTP/1.1 408 Request Timeout\r\nServer: " + SERVER_NAME.encode()
            + b"\r\nContent-Type: application/json\r\nX-Request-Id: "
            + request_id.encode() + b"\r\nConnection: close\r\nContent-Length: " + str(len(_408)).encode()
            + b"\r\n\r\n" + _408)
DECODE_STEP = 64 * 1024   # bytes of decompressed output per step: a bomb never inflates past cap + this

SUPPORTED_AIOHTTP = "aiohttp>=3.14,<3.15"
# What GuardedRequestHandler / GuardedRunner read or override that aiohttp does not document.
AIOHTTP_INTERNALS: dict[type, tuple[str, ...]] = {
    RequestHandler: ("_request_count", "_current_request", "_messages", "_loop", "transport",
                     "force_close", "peername", "handle_error", "data_received", "connection_made",
                     "connection_lost", "shutdown", "_task_handler", "close", "_request_in_progress",
                     "_handler_waiter"),
    Server: ("__call__",),
    # tls_site.ListenerSite.start: TCPSite.start with a handshake deadline and listen_on, over the same attributes.
    BaseSite: ("_runner", "_ssl_context", "_backlog", "_server", "start"),
    TCPSite: ("_host", "_port", "_reuse_address", "_reuse_port", "_bound_port"),
}
_SERVER_INIT_ATTRS = ("self._loop", "self._kwargs")   # instance attributes the runner's factory copies
_HANDLE_ERROR_PARAMS = ("request", "status", "exc", "message")


def check_aiohttp_internals(internals: dict[type, tuple[str, ...]] | None = None) -> None:
    """Raises RuntimeError (one line) unless the aiohttp internals this module relies on are there."""
    missing = [f"{cls.__name__}.{name}" for cls, names in (internals or AIOHTTP_INTERNALS).items()
               for name in names if not hasattr(cls, name)]
    if internals is None:
        source = inspect.getsource(Server.__init__)
        missing += [f"Server.{a[5:]}" for a in _SERVER_INIT_ATTRS if a not in source]
        params = tuple(inspect.signature(RequestHandler.handle_error).parameters)[1:]
        if params != _HANDLE_ERROR_PARAMS:
            missing.append(f"RequestHandler.handle_error{_HANDLE_ERROR_PARAMS}")
    if missing:
        raise RuntimeError(f"aiohttp {aiohttp.__version__} lacks what seekgate's HTTP guard relies on "
                           f"({', '.join(missing)}): install {SUPPORTED_AIOHTTP}")


def check_framing(request: web.BaseRequest) -> None:
    """Refuses the framing shapes aiohttp's parser accepts but a proxy must not (see module doc)."""
    codings = request.headers.getall("Transfer-Encoding", [])
    if not codings:
        return
    if request.version < HttpVersion11:
        raise FramingError("framing: transfer_encoding_on_http_1_0")
    if len(codings) != 1 or codings[0].strip().lower() != "chunked":
        raise FramingError("framing: transfer_encoding_not_plain_chunked")


def decoded_size_within(body: bytes, content_encoding: str | None, limit: int) -> None:
    """Raises unless `body`, decoded per Content-Encoding, fits in `limit` bytes.

    Decompresses in bounded steps and stops at the cap, so a gzip bomb costs at most
    `limit + DECODE_STEP` bytes of memory; the decoded bytes are thrown away (the compressed
    body is what is forwarded, byte for byte).
    """
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity"):
        return
    if coding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == "deflate":
        decoder = zlib.decompressobj()   # Triton's deflate is zlib-wrapped
    else:
        raise BadRequest(f"unsupported_content_encoding: {coding[:40]}",
                         public_message="unsupported content encoding")
    size = 0
    data = body
    try:
        while True:
            size += len(decoder.decompress(data, DECODE_STEP))
            if size > limit:
                raise PayloadTooLarge(f"body_too_large: decoded over {limit}")
            data = decoder.unconsumed_tail
            if not data:
                break
        size += len(decoder.flush())
    except zlib.error as exc:
        raise BadRequest("bad_compressed_body", public_message="malformed compressed body") from exc
    if size > limit:
        raise PayloadTooLarge(f"body_too_large: decoded over {limit}")


# ------------------------------------------------------------------ the connection level

# At a shutdown aiohttp closes every idle connection at once and ignores what arrives on it after,
# including a connection accepted a moment ago whose client is still sending its first request:
# that client gets a reset for a request nobody read (listener.quiesce accepts what the kernel had
# queued just for these). A connection that has not sent a whole request yet gets this long to.
FIRST_REQUEST_GRACE_S = 0.5


class GuardedRequestHandler(RequestHandler):
    """aiohttp's handler plus a header-read deadline and Triton-format parser errors."""

    def __init__(self, *args: Any, header_timeout_s: float,
                 on_header_timeout: Callable[[str, int, str], None] | None = None,
                 on_refused: Callable[[str, int, str, str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        # Each audits what it refused under the request id the client was told: (client ip, ..., request id).
        self._on_header_timeout = on_header_timeout   # (client ip, bytes received, request id)
        self._on_refused = on_refused   # (client ip, status, reason, request id)
        self._header_timer: asyncio.TimerHandle | None = None
        self._requests_seen = 0
        self._header_bytes = 0   # bytes of the request whose headers are being waited for
        self._first_request: asyncio.Future[None] | None = None   # awaited by a shutdown that found none yet
        self.lost: asyncio.Future[None] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A connection that never sends a byte is held to the same deadline.
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if not self.lost.done():
            self.lost.set_result(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The first bytes of a new request (none queued, none being handled) start the clock.
        starts = self._header_timer is None and self._current_request is None and not self._messages
        if starts:
            self._header_bytes = 0
        if starts or self._header_timer is not None:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._request_count != self._requests_seen:   # the parser completed a request's headers
            self._requests_seen = self._request_count
            self._disarm()
            if self._first_request is not None and not self._first_request.done():
                self._first_request.set_result(None)
        elif starts and self._current_request is None and not self._messages:
            # Armed only now, in the same loop turn as those bytes: a request whose headers came
            # whole in one read (nearly all) never needs a timer.
            self._arm()

    def _awaiting_first_request(self) -> bool:
        return self._request_count == 0 and not self.lost.done()

    def close(self) -> None:
        """aiohttp's close (after the request being handled); where no request came yet, shutdown() decides."""
        if not self._awaiting_first_request():
            super().close()

    def _arm(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.warning("request headers not complete within %.3gs from %s: connection closed",
                    self._header_timeout_s, self.peername)
        request_id = new_id()
        transport.write(_408_response(request_id))
        self.force_close()
        transport.close()
        if self._on_header_timeout is not None:
            peer = self.peername
            try:
                self._on_header_timeout(peer[0] if isinstance(peer, tuple) else str(peer or ""),
                                        self._header_bytes, request_id)
            except Exception:   # the audit must never take the event loop's callback down with it
                log.exception("auditing a header timeout failed")

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """aiohttp's shutdown, held to `timeout` in all, after a first request still on its way is answered."""
        try:
            async with asyncio.timeout(timeout):   # None: no limit, as aiohttp's own
                await self._answer_first_request()
                await super().shutdown(timeout)
        except TimeoutError:
            # Cut short mid-wait: end the handler and the connection as aiohttp would have after its second wait.
            if self._task_handler is not None:
                self._task_handler.cancel()
            self.force_close()

    async def _answer_first_request(self) -> None:
        """Up to FIRST_REQUEST_GRACE_S for a connection's first request, then its answer; then aiohttp's close.

        aiohttp's close and shutdown make a connection ignore whatever arrives after them (a body
        still coming in too), so they wait until that request is answered (seekgate's answers say
        `Connection: close` while draining).
        """
        if self._awaiting_first_request():
            self._first_request = self._loop.create_future()
            await asyncio.wait((self._first_request, self.lost), timeout=FIRST_REQUEST_GRACE_S)
            if not self.lost.done() and (self._messages or self._request_in_progress):
                self._handler_waiter = self._loop.create_future()   # resolved as the handler ends
                try:
                    await asyncio.wait((self._handler_waiter, self.lost))
                finally:
                    self._handler_waiter = None
        super().close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # Answers made here are prepared without the app's on_response_prepare hooks: the Server header is set here.
        if status >= 500:
            error = super().handle_error(request, status, exc, message)
            error.headers["Server"] = SERVER_NAME
            return error
        # A malformed request: the parser's message quotes the offending header line, which may
        # hold a credential, so neither the log nor the client gets it.
        log.warning("malformed HTTP request from %s refused: %s", request.remote, type(exc).__name__)
        request_id = new_id()
        if self._on_refused is not None:
            try:
                # What is known: the peer and what the parser refused (its class: never its message).
                self._on_refused(request.remote or "", status, f"http_parser: {type(exc).__name__}", request_id)
            except Exception:   # auditing must never turn a 400 into a 500
                log.exception("auditing a refused request failed")
        response = web.json_response({"error": "bad request"}, status=status,
                                     headers={"X-Request-Id": request_id, "Server": SERVER_NAME})
        response.force_close()
        return response


async def name_the_server(_: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook of the apps without one of their own (the metrics listeners): see SERVER_NAME."""
    response.headers["Server"] = SERVER_NAME


async def durable_refusal(state: AppState, ctx: RequestContext, err: SeekgateError,
                          render: Callable[[RequestContext, SeekgateError], web.Response]) -> web.Response:
    """A refusal in a door's own shape (`render`); under strict audit sent only once its record is
    durable, else the audit's 503 instead."""
    response = render(ctx, err)
    try:
        await commit_audit(state, ctx)
    except AuditUnavailable as audit_err:
        return render(ctx, audit_err)
    return response


def audit_unparsed(app: web.Application, client_ip: str, err: SeekgateError, request_id: str) -> None:
    """One audit record (and metrics) for a request refused before it was parsed whole.

    No request object exists, so the record has the peer address and no key: the headers
    (and any credential in them) never arrived whole, or the parser refused them, and are not read.
    """
    state = app.get(STATE)
    if state is None:   # refused before the cleanup_ctx built the state: nothing to write to
        return
    ctx = RequestContext(request_id=request_id, client_ip=client_ip_text(client_ip), protocol="http")
    refuse(ctx, err)
    finish(state, ctx)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections are served by `GuardedRequestHandler`; header cuts are audited."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        check_aiohttp_internals()   # fail at start, in one line, rather than on the first connection
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    @property
    def server(self) -> Callable[[], RequestHandler] | None:   # type: ignore[override]  # the protocol factory sites listen with
        inner = super().server
        if inner is None:
            return None

        def factory() -> RequestHandler:
            # Server.__call__ builds RequestHandler(server, loop=..., **handler kwargs); the same here.
            return GuardedRequestHandler(inner, loop=inner._loop, header_timeout_s=self._header_timeout_s,
                                         on_header_timeout=self._audit_cut, on_refused=self._audit_refused,
                                         **inner._kwargs)
        return factory

    def _audit_cut(self, client_ip: str, received: int, request_id: str) -> None:
        audit_unparsed(self.app, client_ip,
                       RequestTimeout(f"header_timeout: {received} bytes in {self._header_timeout_s:g}s"), request_id)

    def _audit_refused(self, client_ip: str, status: int, reason: str, request_id: str) -> None:
        err = BadRequest(reason)
        err.http_status = status   # the parser's own: 400, or 413/431 for what is too large
        audit_unparsed(self.app, client_ip, err, request_id)


async def read_body(request: web.Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, counted as it arrives, so chunked uploads cannot slip past the cap.

    `timeout_s` bounds the whole read, not each chunk: a body trickled a byte at a time is cut (408).
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body_too_large: {declared}")
    if declared == 0:
        return b""
    stream = request.content
    if declared is not None and stream.is_eof():
        # Everything arrived with the headers (most inference calls): no wait, no timer.
        body = stream.read_nowait()
        if len(body) == declared:
            return body
        raise BadRequest(f"body_shorter_than_content_length: {len(body)} of {declared}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            if declared is not None:   # one read, nothing to count chunk by chunk
                try:
                    return await stream.readexactly(declared)
                except asyncio.IncompleteReadError as exc:
                    size = len(exc.partial)
                    raise BadRequest(f"body_shorter_than_content_length: {size} of {declared}") from exc
            async for chunk in stream.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body_too_large: over {limit}")
                chunks.append(chunk)
    except TimeoutError as exc:
        got = f"{declared} bytes declared, not all" if declared is not None else f"{size} bytes"
        raise RequestTimeout(f"body_read_timeout: {got} in {timeout_s}s") from exc
    return b"".join(chunks)
