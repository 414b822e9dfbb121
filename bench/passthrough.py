#!/usr/bin/env python
"""The baseline proxy: a bare aiohttp passthrough to Triton (uvloop, one process, no checks).

Everything seekgate does on top of forwarding is missing here on purpose: no
authentication, no policy, no limits, no audit, no metrics. What is left is what
any aiohttp proxy pays: parse the request, send it on over a pooled ClientSession,
stream the answer back. The bench's (c)/(b) ratio is seekgate's cost over that.

    python -m bench.passthrough --port 9000 --upstream http://127.0.0.1:18000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection", "host",
})
# aiohttp frames the response itself (length or chunked); Triton's would be a duplicate.
RESPONSE_DROPPED = frozenset({"content-length", "server", "date"})
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def _headers(incoming: CIMultiDictProxy[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in dropped)


async def handle(request: web.Request) -> web.StreamResponse:
    """Forward one request as it comes: the body streamed up, the answer streamed down."""
    session = request.app[SESSION]
    # A declared length is kept (Content-Length framing); otherwise aiohttp sends chunked.
    body = request.content.iter_any() if request.body_exists else None
    async with session.request(request.method, request.app[UPSTREAM] + request.raw_path,
                               data=body, headers=_headers(request.headers, HOP_BY_HOP),
                               allow_redirects=False, auto_decompress=False) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=_headers(upstream.headers, HOP_BY_HOP | RESPONSE_DROPPED))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            pass   # the client left (a load generator stops mid-request): nothing to answer
        return response


def build_app(upstream: str, pool_size: int = 100) -> web.Application:
    """The passthrough app; its ClientSession lives in cleanup_ctx."""
    app = web.Application(client_max_size=0)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size), timeout=aiohttp.ClientTimeout(total=300),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def run(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(build_app(upstream), access_log=None, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="Triton's HTTP base URL, e.g. http://127.0.0.1:18000")
    args = p.parse_args(argv)
    import uvloop
    uvloop.run(run(args.host, args.port, args.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
