"""The upstream client (proxy/upstream_http.py): against the real Triton, and against raw sockets for
the failures Triton will not produce on demand (a connection cut at each stage, garbage, silence)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from proxy.local.triton import TritonProcess, free_ports
from proxy.upstream.pool import _HIGH_WATER, UpstreamBroken, UpstreamConnectError, UpstreamPool, UpstreamTimeout

INFER = json.dumps({"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]},
                               {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [2]}]}).encode()
GENERATE = json.dumps({"text_input": "hello", "max_tokens": 3}).encode()
JSON = [("Content-Type", "application/json")]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server whose every connection runs `handler`; counts connections and keeps what arrived."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.received = bytearray()
        self.closed_by_peer = asyncio.Event()
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request head plus its Content-Length body."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        body = await reader.readexactly(length)
        self.received += head + body
        return head + body


@asynccontextmanager
async def raw_server(handler: Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                     ) -> AsyncIterator[RawServer]:
    raw = RawServer(lambda r, w: handler(raw, r, w))
    server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()


def ok(body: bytes = b"hello") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def answer_each(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive server: every request on the connection gets ok()."""
    while True:
        await raw.read_request(reader)
        writer.write(ok())
        await writer.drain()


# ------------------------------------------------------------------ the real Triton

async def test_infer_and_generate_on_triton_over_one_kept_alive_connection(triton: TritonProcess) -> None:
    pool = UpstreamPool(triton.http_url, limit=4)
    try:
        for _ in range(3):
            answer = await pool.request("POST", "/v2/models/deepseek/infer", JSON, INFER)
            body = json.loads(await answer.read())
            answer.release()
            assert answer.status == 200 and answer.reason == "OK"
            assert answer.headers["content-type"] == "application/json"
            assert body["model_name"] == "deepseek" and {o["name"] for o in body["outputs"]} >= {"text_output"}
        answer = await pool.request("POST", "/v2/models/deepseek/generate", JSON, GENERATE)
        assert answer.status == 200 and "text_output" in json.loads(await answer.read())
        answer.release()
        assert len(pool._open) == 1   # every request after the first reused the connection
        answer = await pool.request("GET", "/v2/models/nope", ())
        assert answer.status in (400, 404) and b"nope" in await answer.read()   # Triton's own 4xx, unchanged
        answer.release()
    finally:
        await pool.close()


async def test_concurrent_requests_stay_within_the_pool_limit(triton: TritonProcess) -> None:
    # A generous wait for a free connection: the test counts connections, and on a loaded machine
    # 12 generates through 3 connections can queue past the default 2 s.
    pool = UpstreamPool(triton.http_url, limit=3, connect_timeout_s=60)
    peak = 0

    async def one() -> int:
        nonlocal peak
        answer = await pool.request("POST", "/v2/models/deepseek/generate", JSON, GENERATE)
        peak = max(peak, len(pool._open))
        await answer.read()
        answer.release()
        return answer.status

    try:
        assert await asyncio.gather(*(one() for _ in range(12))) == [200] * 12
        assert peak == 3   # 12 at once: the pool opens up to its limit, and not one past it
    finally:
        await pool.close()


# ------------------------------------------------------------------ failures, on raw sockets

async def test_the_pools_own_headers_go_with_every_request() -> None:
    async with raw_server(answer_each) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", own_headers=(("seekgate-internal", "k3y"),))
        for method, target in (("GET", "/v2/health/ready"), ("POST", "/v2/models/m/infer")):
            answer = await pool.request(method, target, JSON, b"{}" if method == "POST" else b"")
            await answer.read()
            answer.release()
        heads = [h for h in bytes(raw.received).split(b"\r\n\r\n") if h.startswith((b"GET", b"POST"))]
        assert len(heads) == 2 and all(b"\r\nseekgate-internal: k3y\r\n" in h for h in heads), heads
        await pool.close()


async def test_connection_refused_is_a_connect_error() -> None:
    (port,) = free_ports(1)
    pool = UpstreamPool(f"http://127.0.0.1:{port}", connect_timeout_s=1)
    with pytest.raises(UpstreamConnectError, match="upstream_unreachable"):
        await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
    assert not pool._open


async def test_a_connection_closed_at_once_is_broken_and_a_post_is_never_resent() -> None:
    async def slam(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with raw_server(slam) as raw:
        # Short read timeout: a request written to a connection already lost would otherwise hang to it.
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", read_timeout_s=2)
        with pytest.raises(UpstreamBroken):
            await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
        await asyncio.sleep(0.05)
        assert raw.connections == 1 and not pool._open


async def test_a_dead_kept_alive_connection_is_retried_for_get_but_not_for_post() -> None:
    async def once_then_drop(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(ok())
        await writer.drain()
        await raw.read_request(reader)   # the second request on this connection: dropped unanswered

    async with raw_server(once_then_drop) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}")
        for _ in range(2):
            answer = await pool.request("GET", "/v2/health/ready", ())
            assert await answer.read() == b"hello"
            answer.release()
        assert raw.connections == 2   # the GET was sent again on a fresh connection
        before = raw.received.count(b"POST ")
        with pytest.raises(UpstreamBroken):
            await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
        assert raw.received.count(b"POST ") == before + 1   # an inference is never run twice
        await pool.close()


async def test_silence_is_a_read_timeout_and_the_connection_is_dropped() -> None:
    async def silent(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        await reader.read()   # until seekgate gives up and closes
        raw.closed_by_peer.set()

    async with raw_server(silent) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", read_timeout_s=0.2)
        with pytest.raises(UpstreamTimeout):
            await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
        await asyncio.wait_for(raw.closed_by_peer.wait(), 2)
        assert not pool._open


async def test_request_timeout_is_end_to_end_however_the_bytes_trickle() -> None:
    """A byte every 0.1 s never trips the idle timeout (0.5 s); the answer is cut at the 1 s deadline anyway."""
    async def trickle(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):   # 10 s in all: served whole, were the timeout only between bytes
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with raw_server(trickle) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", read_timeout_s=0.5, total_timeout_s=1.0)
        answer = await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
        assert answer.status == 200
        with pytest.raises(UpstreamTimeout, match="request_timeout_s"):
            await answer.read()
        answer.release()
        await pool.close()


async def test_the_idle_timeout_still_cuts_a_silent_upstream_before_the_deadline() -> None:
    async def silent(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        await reader.read()

    async with raw_server(silent) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", read_timeout_s=0.2, total_timeout_s=60.0)
        with pytest.raises(UpstreamTimeout, match="idle_timeout_s"):
            await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
        await pool.close()


async def test_a_body_cut_short_or_garbage_is_broken() -> None:
    async def short(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    async with raw_server(short) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}")
        answer = await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
        assert answer.status == 200
        with pytest.raises(UpstreamBroken, match="closed_mid_response"):
            await answer.read()
        answer.release()
        assert not pool._open

    async def garbage(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with raw_server(garbage) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}")
        with pytest.raises(UpstreamBroken, match="upstream_bad_http"):
            await pool.request("POST", "/v2/models/m/infer", JSON, b"{}")
        assert not pool._open


async def test_a_body_without_a_length_ends_with_the_connection() -> None:
    async def until_close(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        await writer.drain()

    async with raw_server(until_close) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", read_timeout_s=2)
        answer = await pool.request("GET", "/v2", ())
        assert await answer.read() == b"part one, part two"
        answer.release()
        assert not pool._open


async def test_head_answers_end_at_their_headers_and_are_not_reused() -> None:
    async def head(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")   # a HEAD answer: no body follows
        await writer.drain()
        await reader.read()

    async with raw_server(head) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}")
        answer = await asyncio.wait_for(pool.request("HEAD", "/v2", ()), 2)
        assert answer.headers["Content-Length"] == "10" and await answer.read() == b""
        answer.release()
        assert not pool._open


async def test_the_target_goes_out_byte_for_byte_and_injection_is_refused() -> None:
    async with raw_server(answer_each) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}")
        target = "/v2/models/a%2Fb/../x/infer?q=%41&r=1"
        answer = await pool.request("POST", target, [("X-Custom", "1")], b"{}")
        await answer.read()
        answer.release()
        assert raw.received.startswith(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{raw.port}\r\n".encode())
        assert b"\r\nContent-Length: 2\r\n\r\n{}" in raw.received
        prefixed = UpstreamPool(f"http://127.0.0.1:{raw.port}/triton/")   # Triton behind a path prefix
        answer = await prefixed.request("GET", "/v2/health/ready", ())
        await answer.read()
        answer.release()
        await prefixed.close()
        assert b"GET /triton/v2/health/ready HTTP/1.1\r\n" in raw.received
        sent = len(raw.received)
        for headers, path in (([("X-Evil", "1\r\nAuthorization: Bearer x")], "/v2"),
                              ([("X-Evil\r\nHost", "x")], "/v2"), ((), "/v2 HTTP/1.0\r\n\r\nGET /admin")):
            with pytest.raises(ValueError):
                await pool.request("GET", path, headers)
        await asyncio.sleep(0.05)
        assert len(raw.received) == sent   # nothing of the refused requests left seekgate
        await pool.close()


async def test_a_slow_reader_pauses_the_upstream_and_release_mid_body_closes_it() -> None:
    size = 8 * _HIGH_WATER

    async def big(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        try:   # ends only when seekgate closes: a drain that fails, or the end of the request side
            for _ in range(size // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()
            await reader.read()
        finally:
            raw.closed_by_peer.set()

    async with raw_server(big) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}")
        answer = await pool.request("GET", "/big", ())
        await asyncio.sleep(0.3)   # nobody reads: Triton's side must be held back, not buffered whole
        assert answer._buffered < 2 * _HIGH_WATER and next(iter(pool._open))._paused
        first = await anext(answer.iter_any())
        assert first and answer._buffered < 2 * _HIGH_WATER
        answer.release()   # a client that went away: Triton sees the connection close
        await asyncio.wait_for(raw.closed_by_peer.wait(), 2)
        assert not pool._open


async def test_a_full_pool_waits_for_a_slot_then_times_out() -> None:
    async with raw_server(answer_each) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", limit=1, connect_timeout_s=0.2)
        held = await pool.request("GET", "/one", ())
        with pytest.raises(UpstreamTimeout, match="pool"):
            await pool.request("GET", "/two", ())
        waiting = asyncio.create_task(pool.request("GET", "/three", ()))
        await asyncio.sleep(0.05)
        await held.read()
        held.release()   # the slot passes to the waiter, on the same connection
        third = await asyncio.wait_for(waiting, 1)
        assert await third.read() == b"hello" and raw.connections == 1
        third.release()
        await pool.close()


PIECES = [b"a" * 300, b"b" * 300, b"c" * 300]


async def answer_in_pieces(raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive server: every request gets PIECES as chunks 10 ms apart, as a streaming answer arrives."""
    while True:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in PIECES:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def test_read_ahead_takes_a_short_body_whole_and_leaves_a_long_one_to_stream() -> None:
    pieces = PIECES
    async with raw_server(answer_in_pieces) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", read_timeout_s=2)
        answer = await pool.request("GET", "/v2", ())
        assert await answer.read_ahead(900) == (b"".join(pieces), True)   # ends within the limit
        answer.release()
        answer = await pool.request("GET", "/v2", ())
        first, complete = await answer.read_ahead(400)   # over the limit: what was read, and more to come
        assert not complete and b"".join(pieces).startswith(first) and 400 < len(first) < 900
        assert first + await answer.read() == b"".join(pieces)
        answer.release()
        assert raw.connections == 1   # both answers read to their end: the connection was kept
        await pool.close()


async def test_an_answer_complete_before_it_is_read_is_taken_whole_and_the_connection_kept() -> None:
    pieces = PIECES
    async with raw_server(answer_in_pieces) as raw:
        pool = UpstreamPool(f"http://127.0.0.1:{raw.port}", read_timeout_s=2)
        for read in (lambda a: a.read(), lambda a: a.read_ahead(900), lambda a: a.read_ahead(400)):
            answer = await pool.request("GET", "/v2", ())
            while not answer._eof:   # every piece is in before the first read
                await asyncio.sleep(0.01)
            got = await read(answer)
            if isinstance(got, tuple) and not got[1]:   # over the limit: the rest streams on
                assert len(got[0]) > 400
                got = (got[0] + await answer.read(), True)
            assert got in (b"".join(pieces), (b"".join(pieces), True))
            assert answer._buffered == 0 and not answer._chunks
            answer.release()
        assert raw.connections == 1   # each answer was read to its end: one connection for all three
        await pool.close()
