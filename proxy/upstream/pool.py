"""The upstream HTTP/1.1 client: a pool of keep-alive connections to Triton, responses parsed by llhttp.

aiohttp's ClientSession spends about half of a bare passthrough's CPU per request on what a
proxy never uses (request and response objects, tracing hooks, cookie jar, URL normalisation,
per-request timers). Forwarding needs one request with a body already in hand, then the
answer's status, headers and body as they arrive, so this is what the forward step uses.

The request target is sent exactly as the client sent it (no URL re-encoding or dot-segment
folding), so Triton sees the very path that seekgate classified and authorized.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

# Bytes buffered from Triton before reading from its socket pauses: a slow client then slows Triton's
# sending instead of growing seekgate's memory.
_HIGH_WATER = 256 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class UpstreamError(Exception):
    """Triton could not be reached, or its answer broke off; `reason` names which for the audit record.

    `sent` is False where no connection was made (refused, unreachable, no pool slot or connection in
    time): the request ran nowhere, so the meter charges it nothing (a dead Triton must not spend the
    budgets of the clients that retry against it).
    """

    sent = True

    def __init__(self, message: str, sent: bool | None = None) -> None:
        super().__init__(message)
        if sent is not None:
            self.sent = sent


class UpstreamConnectError(UpstreamError):
    """No connection: refused, unreachable, or the TLS handshake failed."""

    sent = False


class UpstreamTimeout(UpstreamError):
    """No pool slot or connection within connect_timeout_s, no byte from Triton for idle_timeout_s, or the
    answer not complete request_timeout_s after it was sent."""


class UpstreamBroken(UpstreamError):
    """The connection closed or sent something that is not HTTP/1.1 before the answer was complete."""


class UpstreamResponse:
    """One answer from Triton: status and headers at once, the body as it arrives; `release()` when done."""

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, read_timeout_s: float,
                 deadline: float = math.inf) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self._conn = conn
        self._loop = loop
        self._read_timeout_s = read_timeout_s
        self._deadline = deadline   # loop time by which the whole answer must be in (request_timeout_s)
        self._raw_headers: list[tuple[str, str]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in."""
        while True:
            chunk = await self._next()
            if not chunk:
                return
            yield chunk

    async def read(self) -> bytes:
        """The whole body."""
        if self._eof and self._error is None:
            return self._take_all()   # all in already, as a small answer usually is: nothing to wait for
        parts = [chunk async for chunk in self.iter_any()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_ahead(self, limit: int) -> tuple[bytes, bool]:
        """(the whole body, True) if it ends within `limit` bytes; else (the first pieces read, False)."""
        if self._eof and self._error is None and self._buffered <= limit:
            return self._take_all(), True
        parts: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = await self._next()
            if not chunk:
                return (parts[0] if len(parts) == 1 else b"".join(parts)), True
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts), False

    async def read_upto(self, limit: int) -> bytes:
        """At most `limit` bytes of the body (what is left stays unread; release() then closes the connection)."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            chunk = await self._next()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """Back to the pool when the answer was read to its end and Triton keeps the connection; else closed.

        Closing mid-answer is how a cancelled request reaches Triton: it sees the connection go.
        """
        if not self._released:
            self._released = True
            self._conn.done(reusable=self._eof and self._error is None)

    def _take_all(self) -> bytes:
        """Every buffered piece at once; only for a complete answer, which has nothing left to wait for."""
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    async def _next(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < _HIGH_WATER:
            self._conn.resume()
        return chunk

    async def _wait(self) -> None:
        """Until the next piece of the answer, bounded by the idle timeout between pieces and the deadline.

        The deadline makes the timeout end to end: an upstream that trickles a byte just inside
        the idle timeout is still cut once the whole answer has taken request_timeout_s.
        """
        self._waiter = self._loop.create_future()
        left = self._deadline - self._loop.time()
        reason = "upstream_timeout: no byte for idle_timeout_s"
        if left <= self._read_timeout_s:
            reason = "upstream_timeout: answer not complete within request_timeout_s"
        timer = self._loop.call_later(min(self._read_timeout_s, max(0.0, left)), self._time_out, self._waiter, reason)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _time_out(self, waiter: asyncio.Future[None], reason: str) -> None:
        if not waiter.done():
            self._error = UpstreamTimeout(reason)
            waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # Called by the connection as llhttp parses.
    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _headers_done(self, status: int) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        self._wake()

    def _finish(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._eof:
            self._error = error
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time (no pipelining)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._keep_alive = False
        self._paused = False
        self._head_only = False
        self._until_close = False   # the answer's body ends where the connection does (no length)
        self.closed = False
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)   # uvloop's transports are not asyncio subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._response is not None:
            if self._until_close:
                self._response._finish()   # llhttp would only say so if asked to finish; its end is ours
            else:
                self._response._fail(UpstreamBroken("upstream_closed_mid_response"))
        else:
            self._pool._forget(self)   # an idle connection Triton closed

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(UpstreamBroken(f"upstream_bad_http: {exc}"))

    def send(self, head: bytes, body: bytes, response: UpstreamResponse, head_only: bool) -> None:
        assert self._transport is not None
        self._response, self._keep_alive, self._head_only = response, False, head_only
        self._until_close = False
        if self.closed:
            # Lost between connecting (or leaving the pool) and now: a write would vanish unanswered.
            response._fail(UpstreamBroken("upstream_closed_before_request"))
            return
        # One write: the head and a small body leave in one segment.
        self._transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self._transport.write(body)

    def done(self, reusable: bool) -> None:
        """The response is finished with: the connection goes back to the pool or is closed."""
        self._response = None
        self.resume()
        if reusable and self._keep_alive and not self._head_only and not self.closed:
            self.reused = True
            self._pool._put(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()
        self._pool._forget(self)   # also after connection_lost: that left an answer's slot to its release

    def pause(self) -> None:
        if not self._paused and self._transport is not None and not self.closed:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def _broken(self, error: UpstreamError) -> None:
        if self._response is not None:
            self._response._fail(error)
        self.close()

    # llhttp callbacks (httptools calls them by name).
    def on_status(self, status: bytes) -> None:
        if self._response is not None:
            self._response.reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            self._response._raw_headers.append((name.decode("utf-8", "surrogateescape"),
                                                value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self._response is None:
            self._broken(UpstreamBroken("upstream_unsolicited_response"))
            return
        status = self._parser.get_status_code()
        self._response._headers_done(status)
        headers = self._response.headers
        self._until_close = (status >= 200 and status not in (204, 304) and "Content-Length" not in headers
                             and "chunked" not in headers.get("Transfer-Encoding", "").lower())
        if self._head_only:
            # llhttp cannot be told that a HEAD answer has no body: end it here; the connection is not reused.
            self._response._finish()

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._head_only:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        if self._response is not None:
            self._response._finish()


class UpstreamPool:
    """Keep-alive connections to one Triton HTTP endpoint, at most `limit` open at once."""

    def __init__(self, url: str, limit: int = 100, connect_timeout_s: float = 2.0,
                 read_timeout_s: float = 300.0, total_timeout_s: float = math.inf,
                 own_headers: Iterable[tuple[str, str]] = (), ca_file: str = "") -> None:
        """`ca_file`: the CA bundle that verifies an https:// Triton ('' = the system's trust store)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http:// or https://host[:port], not {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (ssl.create_default_context(cafile=ca_file or None)
                                            if parts.scheme == "https" else None)
        self._host_header = parts.netloc.rsplit("@", 1)[-1]
        self._prefix = parts.path.rstrip("/")   # Triton behind a path prefix: prepended to every target
        self._limit = max(1, limit)
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._total_timeout_s = total_timeout_s
        # Sent with every request: seekgate's key to Triton's restricted APIs. A client's header of the
        # same name never gets here (forward.py drops it), so only seekgate can unlock them.
        self._own_lines = [f"{name}: {value}\r\n" for name, value in own_headers]
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                      body: bytes = b"") -> UpstreamResponse:
        """Sends one request and returns once Triton's status and headers are in.

        Raises UpstreamConnectError, UpstreamTimeout or UpstreamBroken. A reused connection that
        turns out dead before any answer is retried once on a fresh one, for idempotent methods only:
        an inference must never run twice.
        """
        head = self._head(method, target, headers, body)
        loop = asyncio.get_running_loop()
        started = loop.time()   # the end-to-end deadline counts the wait for a pool slot too
        for attempt in (0, 1):
            conn = await self._acquire(loop)
            response = UpstreamResponse(conn, loop, self._read_timeout_s, started + self._total_timeout_s)
            conn.send(head, body, response, head_only=method == "HEAD")
            try:
                while response.status == 0:
                    if response._error is not None:
                        raise response._error
                    await response._wait()
            except UpstreamBroken:
                response.release()
                if attempt == 0 and conn.reused and method in _IDEMPOTENT:
                    continue
                raise
            except BaseException:
                response.release()   # cancelled or timed out: closing the connection tells Triton
                raise
            return response
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("upstream_pool_closed"))

    def _head(self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        lines = [f"{method} {self._prefix}{target} HTTP/1.1\r\n", f"Host: {self._host_header}\r\n", *self._own_lines]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if body or method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # Every line ends in exactly one CRLF: any other CR or LF is a header or target trying to inject one.
        if text.count("\n") != len(lines) or text.count("\r") != len(lines) or " " in target:
            raise ValueError("CR, LF or space in a forwarded request line or header")
        return text.encode("utf-8", "surrogateescape")

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        if self._closed:
            raise UpstreamConnectError("upstream_pool_closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        if len(self._open) >= self._limit:
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await asyncio.wait_for(waiter, self._connect_timeout_s)
            except asyncio.TimeoutError:
                raise UpstreamTimeout("upstream_pool_timeout", sent=False) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if handed is not None:
                return handed
        return await self._connect(loop)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        conn = _Connection(self)
        self._open.add(conn)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, self._host, self._port, ssl=self._ssl),
                                   self._connect_timeout_s)
        except asyncio.TimeoutError:
            self._forget(conn)
            raise UpstreamTimeout("upstream_connect_timeout", sent=False) from None
        except (OSError, ssl.SSLError) as exc:
            self._forget(conn)
            raise UpstreamConnectError(f"upstream_unreachable: {type(exc).__name__}") from exc
        except BaseException:
            self._forget(conn)
            raise
        return conn

    def _put(self, conn: _Connection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            # A slot came free: the first waiter opens a connection of its own.
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break
        if conn in self._idle:
            self._idle.remove(conn)
