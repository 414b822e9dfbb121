"""The workers' shared limiter: one set of counters behind a Unix socket, exact across clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio

from proxy.errors import StoreUnavailable
from proxy.quotas import Limits
from proxy.state.limits import LocalLimiter, OverLimit, Scope
from proxy.state.shared_limiter import LimiterServer, SocketLimiter


@pytest_asyncio.fixture(loop_scope="function")   # on the test's own loop, where its clients run
async def server(tmp_path: Path):   # type: ignore[no-untyped-def]
    srv = LimiterServer(LocalLimiter(), tmp_path / "run" / "limiter.sock")
    await srv.start()
    yield srv
    await srv.close()


async def test_two_workers_share_one_rpm_window(server: LimiterServer) -> None:
    a, b = SocketLimiter(server.path), SocketLimiter(server.path)
    scope = [Scope("k1", Limits(rpm=5))]
    admitted, refused = 0, []
    for i in range(12):   # alternate, as SO_REUSEPORT spreads connections
        try:
            await (a if i % 2 else b).acquire(scope, 0)
            admitted += 1
        except OverLimit as over:
            refused.append(over)
    assert admitted == 5   # not 5 per worker
    assert len(refused) == 7 and all(o.kind == "rpm" and o.limit == 5 and o.remaining == 0 for o in refused)
    assert refused[0].headers()["X-RateLimit-Limit"] == "5" and int(refused[0].headers()["Retry-After"]) >= 1
    await a.close()
    await b.close()


async def test_concurrent_admissions_are_exact(server: LimiterServer) -> None:
    workers = [SocketLimiter(server.path) for _ in range(3)]
    scope = [Scope("k2", Limits(concurrency=4))]

    async def one(w: SocketLimiter) -> bool:
        try:
            await w.acquire(scope, 0)
            return True
        except OverLimit:
            return False

    results = await asyncio.gather(*(one(workers[i % 3]) for i in range(30)))
    assert sum(results) == 4
    assert server.limiter.in_flight("k2") == 4
    for w in workers:
        await w.close()


async def test_settle_frees_the_slot_and_corrects_tokens(server: LimiterServer) -> None:
    w = SocketLimiter(server.path)
    scope = [Scope("k3", Limits(concurrency=1, tpm=100))]
    grant = await w.acquire(scope, 60)
    with pytest.raises(OverLimit, match="concurrency"):
        await w.acquire(scope, 10)
    w.settle(grant, 20)   # the real count was lower than the estimate
    w.settle(grant, 20)   # idempotent
    for _ in range(50):
        if server.limiter.in_flight("k3") == 0:
            break
        await asyncio.sleep(0.01)
    second = await w.acquire(scope, 80)   # 20 + 80 fits the 100 tpm only after the correction
    assert second.rpm_window is None and server.limiter.in_flight("k3") == 1
    await w.close()


async def test_a_dead_worker_releases_what_it_held(server: LimiterServer) -> None:
    w = SocketLimiter(server.path)
    await w.acquire([Scope("k4", Limits(concurrency=2))], 0)
    await w.acquire([Scope("k4", Limits(concurrency=2))], 0)
    assert server.limiter.in_flight("k4") == 2
    await w.close()   # as when a worker process dies mid-request
    for _ in range(100):
        if server.limiter.in_flight("k4") == 0:
            break
        await asyncio.sleep(0.01)
    assert server.limiter.in_flight("k4") == 0


async def test_unlimited_requests_need_no_round_trip(tmp_path: Path) -> None:
    w = SocketLimiter(tmp_path / "nothing-listens-here.sock")
    grant = await w.acquire([Scope("k5", Limits())], 10)
    assert grant.key_ids == ()
    w.settle(grant, 10)


async def test_unreachable_limiter_fails_closed(tmp_path: Path) -> None:
    w = SocketLimiter(tmp_path / "nothing-listens-here.sock")
    with pytest.raises(StoreUnavailable) as err:
        await w.acquire([Scope("k6", Limits(rpm=10))], 0)
    assert err.value.http_status == 503 and err.value.reason.startswith("limiter_unavailable")


async def test_limiter_restart_is_survived(tmp_path: Path) -> None:
    path = tmp_path / "limiter.sock"
    first = LimiterServer(LocalLimiter(), path)
    await first.start()
    w = SocketLimiter(path)
    await w.acquire([Scope("k7", Limits(rpm=10))], 0)
    await first.close()
    await asyncio.sleep(0.05)
    with pytest.raises(StoreUnavailable):
        await w.acquire([Scope("k7", Limits(rpm=10))], 0)
    second = LimiterServer(LocalLimiter(), path)
    await second.start()
    await w.acquire([Scope("k7", Limits(rpm=10))], 0)   # reconnects by itself
    await w.close()
    await second.close()


async def test_socket_is_private(server: LimiterServer) -> None:
    assert server.path.stat().st_mode & 0o077 == 0


async def test_a_default_is_fitted_to_the_budget_left_across_workers(server: LimiterServer) -> None:
    """limit(fit=True) (the OpenAI door's default max_tokens) on the workers' limiter: the supervisor's
    refusal carries what is left over the socket, so a default is granted exactly that, charged once in
    the shared counters; a named max_tokens (no fit) over it is refused, charging nothing."""
    from types import SimpleNamespace

    from proxy.context import Principal, RequestContext, Resource
    from proxy.settings import load_settings
    from proxy.steps.authz import Authorizer
    from proxy.steps.pipeline import limit

    a, b = SocketLimiter(server.path), SocketLimiter(server.path)
    chain = (("fit-dev", "device", {"daily_tokens": 100}), ("fit-app", "app", {"tpm": 70}))

    def ctx_for() -> RequestContext:
        ctx = RequestContext(request_id="r", client_ip="127.0.0.1")
        ctx.principal = Principal(chain[0][0], chain[0][1], "o", limits=chain)
        ctx.resource = Resource("model:deepseek", "infer", model="deepseek")
        return ctx

    def state(limiter: SocketLimiter) -> SimpleNamespace:
        return SimpleNamespace(settings=load_settings(None, env={}), authorizer=Authorizer(), limiter=limiter)

    first = ctx_for()
    assert await limit(state(a), first, 30) == 30  # type: ignore[arg-type]
    with pytest.raises(OverLimit) as over:   # named: 41 > the 40 the app's tpm has left
        await limit(state(b), ctx_for(), 41)  # type: ignore[arg-type]
    assert (over.value.kind, over.value.remaining) == ("tpm", 40)
    fitted = ctx_for()
    assert await limit(state(b), fitted, 512, fit=True) == 40  # type: ignore[arg-type]
    assert fitted.limit_grant is not None and fitted.limit_grant.tokens == 40
    local = server.limiter
    assert (local._keys["fit-dev"].day.used, local._keys["fit-app"].tpm_used) == (70, 70)
    with pytest.raises(OverLimit) as over:   # nothing left: a default too is refused
        await limit(state(a), ctx_for(), 512, fit=True)  # type: ignore[arg-type]
    assert over.value.kind == "tpm"
    await a.close()
    await b.close()
