"""The Redis limiter against a real Redis: the semantics of LocalLimiter, exact across processes, leases, Redis down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio

from proxy.errors import StoreUnavailable
from proxy.quotas import Limits
from proxy.state.limits import OverLimit, Scope
from proxy.state.redis_limiter import RedisGrant, RedisLimiter, cluster_url
from proxy.state.redis_scripts import scope_keys
from tests.backends import PrivateRedis
from tests.relay import TcpRelay
from tests.state.redis_worker import BURST

REPO = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(loop_scope="function")   # on the test's own loop, like its client
async def limiter(redis_server_url: str, redis_prefix: str) -> AsyncIterator[RedisLimiter]:
    lim = RedisLimiter(redis_server_url, prefix=redis_prefix)
    await lim.start()
    yield lim
    await lim.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.destroy()


def direct_client(url: str, **options: Any) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """A client reading the limiter's keys behind its back: the cluster client for a Redis Cluster URL
    (test_redis_cluster.py runs these tests there too), else a plain one."""
    node = cluster_url(url)
    if node is not None:
        return redis.asyncio.RedisCluster.from_url(node, **options)
    return redis.asyncio.Redis.from_url(url, **options)


def scope(key_id: str, inherited: bool = False, **limits: int) -> Scope:
    return Scope(key_id, Limits(**limits), inherited)


async def test_rpm_admits_exactly_the_limit_and_says_when_a_place_frees(limiter: RedisLimiter) -> None:
    s = [scope("k", rpm=3)]
    windows = [(await limiter.acquire(s, 0)).rpm_window for _ in range(3)]
    assert [w[1] for w in windows if w] == [2, 1, 0]
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(s, 0)
    assert (over.value.kind, over.value.limit, over.value.remaining) == ("rpm", 3, 0)
    assert 58 <= over.value.retry_after <= 60
    assert over.value.headers()["Retry-After"] == str(over.value.retry_after)


async def test_tpm_charge_is_corrected_at_settle(limiter: RedisLimiter) -> None:
    s = [scope("k", tpm=100)]
    grant = await limiter.acquire(s, 90)            # estimate 90
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(s, 20)
    assert (over.value.kind, over.value.remaining) == ("tpm", 10)
    limiter.settle(grant, 40)                       # the response used 40
    await asyncio.sleep(0.05)                       # the settle is written off the request path
    await limiter.acquire(s, 60)                    # 40 + 60 = 100 fits exactly
    with pytest.raises(OverLimit):
        await limiter.acquire(s, 1)
    with pytest.raises(OverLimit) as never:
        await limiter.acquire(s, 101)               # can never fit: a full window
    assert never.value.retry_after == 60


async def test_concurrency_slot_freed_by_settle(limiter: RedisLimiter) -> None:
    s = [scope("k", concurrency=2)]
    a = await limiter.acquire(s, 0)
    await limiter.acquire(s, 0)
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(s, 0)
    assert over.value.kind == "concurrency"
    limiter.settle(a, 0)
    limiter.settle(a, 0)   # idempotent: frees one slot, not two
    await asyncio.sleep(0.05)
    await limiter.acquire(s, 0)
    with pytest.raises(OverLimit):
        await limiter.acquire(s, 0)


async def test_daily_and_monthly_budgets(limiter: RedisLimiter) -> None:
    day = [scope("d", daily_tokens=50)]
    g = await limiter.acquire(day, 30)
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(day, 30)
    assert (over.value.kind, over.value.remaining) == ("daily_tokens", 20)
    limiter.settle(g, 10)
    await asyncio.sleep(0.05)
    await limiter.acquire(day, 40)                  # 10 + 40 = 50
    month = [scope("m", monthly_tokens=5)]
    await limiter.acquire(month, 5)
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(month, 1)
    assert over.value.kind == "monthly_tokens"


async def test_a_refusal_by_any_scope_charges_none(limiter: RedisLimiter) -> None:
    parent, child = scope("app", True, rpm=1), scope("dev", rpm=5)
    await limiter.acquire([parent], 0)
    with pytest.raises(OverLimit) as over:
        await limiter.acquire([child, parent], 0)
    assert over.value.scope.key_id == "app" and over.value.reason == "rate_limited:rpm@app"
    for _ in range(5):   # the refused request took nothing from the child's window
        await limiter.acquire([child], 0)


async def test_unlimited_request_makes_no_round_trip(redis_prefix: str) -> None:
    lim = RedisLimiter("redis://127.0.0.1:1/0", prefix=redis_prefix)   # nothing listens there
    grant = await lim.acquire([scope("free")], 10)
    lim.settle(grant, 10)
    assert grant.key_ids == ()


def test_three_processes_never_admit_more_than_the_limits(redis_server_url: str, redis_prefix: str) -> None:
    start_at = time.time() + 3.0   # every process connected and waiting when the burst begins
    procs = [subprocess.Popen([sys.executable, "-m", "tests.state.redis_worker", "burst", redis_server_url,
                               redis_prefix, str(start_at), "40"], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    total = {name: sum(r[name] for r in results) for name in BURST}
    # 120 attempts at each key; exactly the limit gets through, spread over the three processes.
    assert total == {"rpm": 60, "tpm": 1000 // 30, "conc": 5, "daily": 500 // 7}
    assert all(r["rpm"] < 60 for r in results), results   # really shared: no process had it alone


def test_three_busy_processes_served_from_reserved_slots_still_admit_exactly_the_limits(
        redis_server_url: str, redis_prefix: str) -> None:
    """Sequential traffic makes each key busy on each process: most admissions come from slots
    reserved ahead (no round trip), and the three together still get exactly the limits."""
    start_at = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-m", "tests.state.redis_worker", "steady", redis_server_url,
                               redis_prefix, str(start_at), "150"], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    total = {name: sum(r[name] for r in results) for name in ("rpm", "tpm", "daily")}
    assert total == {"rpm": 60, "tpm": 1000 // 30, "daily": 500 // 7}, results
    # Slots go up to half of each limit; the rest of the way each admission is a round trip.
    assert sum(r["from_slots"] for r in results) >= 30, results


async def test_slots_never_used_are_given_back(limiter: RedisLimiter, redis_server_url: str,
                                               redis_prefix: str) -> None:
    s = [scope("busy", rpm=1000, tpm=100_000)]
    for _ in range(12):
        limiter.settle(await limiter.acquire(s, 5), 5)
    assert limiter.round_trips < 12   # the key got busy: later admissions came from slots
    client = direct_client(redis_server_url)
    try:
        reserved = await client.zcard(f"{limiter.prefix}busy:r")
        assert reserved > 12   # slots counted in Redis before they were handed out
        deadline = time.monotonic() + 5
        while await client.zcard(f"{limiter.prefix}busy:r") != 12:   # the unused ones cancelled after their life
            assert time.monotonic() < deadline, "unused slots were not given back"
            await asyncio.sleep(0.1)
        assert int(await client.hget(f"{limiter.prefix}busy:tc", "_sum")) == 12 * 5
        assert int(await client.zcard(f"{limiter.prefix}busy:t")) == 12
    finally:
        await client.aclose()


async def test_a_key_idle_after_a_busy_minute_expires_its_log_in_chunks(limiter: RedisLimiter,
                                                                          redis_server_url: str,
                                                                          redis_prefix: str) -> None:
    """30 000 expired tpm entries (a key at 500 req/s for a minute, then a pause): the admission
    after the pause must not fail on Lua's unpack limit, and the window empties over a few calls."""
    base = f"{limiter.prefix}idle"
    client = direct_client(redis_server_url)
    try:
        seconds, _ = await client.time()
        old_ms = (seconds - 120) * 1000
        pipe = client.pipeline(transaction=False)
        for start in range(0, 30_000, 5_000):
            pipe.zadd(f"{base}:t", {f"old:{n}": old_ms for n in range(start, start + 5_000)})
            pipe.hset(f"{base}:tc", mapping={f"old:{n}": 3 for n in range(start, start + 5_000)})
        pipe.hset(f"{base}:tc", "_sum", 90_000)
        await pipe.execute()
        s = [scope("idle", tpm=100)]
        for _ in range(2):   # 10 000 expired per call: the rest still counts, stricter
            with pytest.raises(OverLimit):
                await limiter.acquire(s, 10)
        await limiter.acquire(s, 10)   # the third call has expired them all
        assert await client.zcount(f"{base}:t", "-inf", old_ms) == 0
        charges = {k.decode(): int(v) for k, v in (await client.hgetall(f"{base}:tc")).items()}
        assert not any(k.startswith("old:") for k in charges)
        assert charges.pop("_sum") == sum(charges.values()) >= 10
    finally:
        await client.aclose()


async def test_an_admission_redis_fails_refuses_only_itself_not_its_batch(limiter: RedisLimiter,
                                                                            redis_server_url: str,
                                                                            redis_prefix: str) -> None:
    client = direct_client(redis_server_url)
    try:
        await client.set(f"{limiter.prefix}broken:r", "not a sorted set")   # every script on it fails: WRONGTYPE
        trips = limiter.round_trips
        healthy, broken = await asyncio.gather(limiter.acquire([scope("fine", rpm=5)], 0),
                                               limiter.acquire([scope("broken", rpm=5)], 0),
                                               return_exceptions=True)
        assert limiter.round_trips == trips + 1   # one batch: the failing admission answered for itself
        assert isinstance(healthy, RedisGrant) and healthy.rpm_window == (5, 4, pytest.approx(60, abs=0.1))
        assert isinstance(broken, StoreUnavailable) and broken.http_status == 503
        assert limiter.up   # a script error is not Redis down
        assert await client.zcard(f"{limiter.prefix}fine:r") == 1
    finally:
        await client.aclose()



@pytest.mark.parametrize("answer", ["raises", "short", "garbled"])
async def test_a_batch_that_fails_in_an_unforeseen_way_refuses_its_admissions_instead_of_leaving_them_waiting(
        limiter: RedisLimiter, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    async def unforeseen(keys: list[str], args: list[object]) -> list[object]:
        if answer == "raises":
            raise RuntimeError("a bug, or a client library's surprise")
        return [[], [], []] if answer == "short" else [[["not a number"], ["x"]], [], []]

    monkeypatch.setattr(limiter, "_run_batch", unforeseen)
    async with asyncio.timeout(5):   # before the fix the admissions waited forever
        answers = await asyncio.gather(limiter.acquire([scope("a", rpm=5)], 0),
                                       limiter.acquire([scope("b", rpm=5)], 0), return_exceptions=True)
    assert all(isinstance(a, StoreUnavailable) and a.http_status == 503 for a in answers), answers
    monkeypatch.undo()
    assert isinstance(await limiter.acquire([scope("a", rpm=5)], 0), RedisGrant)   # the limiter goes on


async def test_a_slot_stays_in_the_window_at_least_as_long_as_a_request_admitted_when_it_was_used(
        limiter: RedisLimiter, redis_server_url: str, redis_prefix: str) -> None:
    s = [scope("late", rpm=1000)]
    for _ in range(2):
        await limiter.acquire(s, 0)   # busy: the second of these reserved slots
    client = direct_client(redis_server_url)
    try:
        # Long enough that the reservation's time and the use's differ, well inside the slots' life (1 s less
        # a margin): at 0.5 s a loaded CPU once let them expire first, and the grant came from no slot.
        await asyncio.sleep(0.2)
        seconds, micros = await client.time()
        used_at_ms = seconds * 1000 + micros // 1000
        grant = await limiter.acquire(s, 0)
        assert isinstance(grant, RedisGrant) and "#" in grant.gid   # handed out from a slot
        score = await client.zscore(f"{limiter.prefix}late:r", grant.gid)
        assert score is not None and score >= used_at_ms   # it leaves the window no earlier than 60 s after use
    finally:
        await client.aclose()


async def test_a_killed_replica_frees_its_slot_when_its_lease_expires(redis_server_url: str,
                                                                      redis_prefix: str) -> None:
    lease_s = 2.0
    holder = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.state.redis_worker", "hold",
                                                  redis_server_url, redis_prefix, str(lease_s), cwd=REPO,
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 30)).strip() == b"held"
        lim = RedisLimiter(redis_server_url, prefix=redis_prefix)
        await lim.start()
        s = [scope("held", concurrency=1)]
        await asyncio.sleep(lease_s * 1.5)   # past one lease: the holder's renewals keep its slot
        with pytest.raises(OverLimit):
            await lim.acquire(s, 0)
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            try:
                await lim.acquire(s, 0)
                break
            except OverLimit:
                assert time.monotonic() - killed < lease_s + 1.0, "slot not back within its lease"
                await asyncio.sleep(0.05)
        assert time.monotonic() - killed <= lease_s + 0.2
        await lim.close()
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def test_redis_down_closed_refuses_with_503_and_recovers(private_redis: PrivateRedis,
                                                               redis_prefix: str) -> None:
    seen: list[tuple[bool, bool]] = []
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1,
                       on_backend=lambda up, local: seen.append((up, local)))
    await lim.start()
    s = [scope("k", rpm=100)]
    await lim.acquire(s, 0)
    private_redis.stop()
    for _ in range(2):   # the first finds it down, the next fails fast without waiting on Redis
        with pytest.raises(StoreUnavailable) as down:
            await lim.acquire(s, 0)
        assert down.value.http_status == 503 and down.value.headers() == {"Retry-After": "1"}
    assert seen[-1] == (False, False)
    private_redis.start()
    deadline = time.monotonic() + 5
    while not lim.up:
        assert time.monotonic() < deadline, "limiter did not find Redis back"
        await asyncio.sleep(0.05)
    grant = await lim.acquire(s, 0)
    assert grant.rpm_window is not None and seen[-1] == (True, False)
    await lim.close()


async def test_redis_down_local_enforces_this_replicas_limits_and_says_so(private_redis: PrivateRedis,
                                                                          redis_prefix: str) -> None:
    seen: list[tuple[bool, bool]] = []
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1,
                       on_backend_down="local", on_backend=lambda up, local: seen.append((up, local)))
    await lim.start()
    s = [scope("k", rpm=2)]
    private_redis.stop()
    await lim.acquire(s, 0)
    await lim.acquire(s, 0)
    assert seen[-1] == (False, True)
    with pytest.raises(OverLimit):   # local limits, not none
        await lim.acquire(s, 0)
    private_redis.start()            # a fresh, empty Redis: the shared window starts again
    deadline = time.monotonic() + 5
    while not lim.up:
        assert time.monotonic() < deadline, "limiter did not find Redis back"
        await asyncio.sleep(0.05)
    assert seen[-1] == (True, False)
    grant = await lim.acquire(s, 0)
    assert grant.rpm_window == (2, 1, pytest.approx(60, abs=0.1))   # counted in Redis again
    await lim.close()


async def test_a_redis_restarted_between_batches_is_no_outage(private_redis: PrivateRedis, redis_prefix: str) -> None:
    """Redis restarts while the limiter is idle (a quick restart, a failover to the same address): the
    batch connection still holds the old server's closed socket. The next batch must go over a fresh
    one, not fail once on the stale one and count as an outage (a 503 under `closed`, a flip of
    seekgate_limits_backend_up)."""
    seen: list[tuple[bool, bool]] = []
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1,
                       on_backend=lambda up, local: seen.append((up, local)))
    await lim.start()
    try:
        s = [scope("restarted", rpm=100, concurrency=5)]   # a lease: every admission is a batch (no slots)
        lim.settle(await lim.acquire(s, 0), 0)       # the batch connection is open
        for round_ in range(2):
            await asyncio.sleep(0.2)                 # the settlement has gone
            private_redis.stop()
            private_redis.start()                    # the same port, before anything was sent
            await asyncio.sleep(0.2)                 # the old server's close has reached this process
            sent = lim.round_trips
            grant = await lim.acquire(s, 0)          # closed mode: a batch that failed would raise 503
            assert lim.round_trips == sent + 1 and grant.rpm_window is not None
            assert grant.rpm_window[:2] == (100, 99), round_   # counted in the fresh Redis
            assert lim.up and seen == [(True, False)], seen
            lim.settle(grant, 0)
    finally:
        await lim.close()


async def test_after_an_outage_found_by_the_lease_renewal_the_first_batch_is_no_second_outage(
        private_redis: PrivateRedis, redis_prefix: str) -> None:
    """Redis stops while no batch is out: the lease renewal finds it down, the probe finds it back. The
    batch connection, untouched meanwhile, still holds the old server's socket: the first batch after
    the recovery must not fail on it and count as a second outage."""
    seen: list[tuple[bool, bool]] = []
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1, lease_s=1.0,
                       on_backend=lambda up, local: seen.append((up, local)))
    await lim.start()
    try:
        s = [scope("renewed", rpm=100, concurrency=5)]
        held = await lim.acquire(s, 0)               # a lease to renew; the batch connection is open
        private_redis.stop()
        async with asyncio.timeout(5):
            while lim.up:                            # found by the renewal (every lease_s / 3), not a batch
                await asyncio.sleep(0.05)
        private_redis.start()
        async with asyncio.timeout(5):
            while not lim.up:
                await asyncio.sleep(0.05)
        assert seen == [(True, False), (False, False), (True, False)]
        grant = await lim.acquire(s, 0)              # closed mode: a batch that failed would raise 503
        assert grant.rpm_window is not None and grant.rpm_window[:2] == (100, 99)
        assert lim.up and seen == [(True, False), (False, False), (True, False)], seen
        lim.settle(held, 0)
        lim.settle(grant, 0)
    finally:
        await lim.close()


async def test_tokens_admitted_locally_are_added_to_the_shared_budgets_once_redis_is_back(
        private_redis: PrivateRedis, redis_prefix: str) -> None:
    """An outage under on_backend_down=local does not hand a key its day's budget again."""
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1,
                       on_backend_down="local")
    await lim.start()
    s = [scope("k", daily_tokens=100), scope("app", inherited=True, monthly_tokens=1000)]
    private_redis.stop()
    lim.settle(await lim.acquire(s, 30), 60)      # admitted alone, used 60
    held = await lim.acquire(s, 10)               # still running when Redis comes back
    private_redis.start()                         # a fresh, empty Redis
    deadline = time.monotonic() + 5
    while not lim.up:
        assert time.monotonic() < deadline, "limiter did not find Redis back"
        await asyncio.sleep(0.05)
    lim.settle(held, 20)                          # settled once Redis is back: owed at once
    client = redis.asyncio.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        from proxy.state.limits import _windows
        day, month, _, _ = _windows(time.time())
        deadline = time.monotonic() + 5
        while await client.get(f"{redis_prefix}k:d:{day}") != "80":
            assert time.monotonic() < deadline, await client.keys("*")
            await asyncio.sleep(0.05)
        assert await client.get(f"{redis_prefix}app:m:{month}") == "80"
        assert 86400 < await client.ttl(f"{redis_prefix}k:d:{day}") <= 2 * 86400   # the budget's own expiry
    finally:
        await client.aclose()
    await lim.acquire(s, 20)                      # 80 + 20 fits the day exactly
    with pytest.raises(OverLimit) as over:
        await lim.acquire(s, 1)
    assert over.value.kind == "daily_tokens"
    await lim.close()


async def test_a_repayment_whose_answer_was_lost_after_redis_ran_it_is_charged_once(
        private_redis: PrivateRedis, redis_prefix: str) -> None:
    """Tokens admitted locally are repaid once Redis is back; Redis runs the repayment but its answer is
    lost (the connection cut as the answer comes back). The retry must find that it ran: the day's and
    month's budgets hold the tokens once, not once per recovery."""
    relay = TcpRelay("127.0.0.1", private_redis.port).start()
    lim = RedisLimiter(f"redis://127.0.0.1:{relay.port}/0", prefix=redis_prefix, timeout_s=0.3,
                       probe_interval_s=0.1, on_backend_down="local")
    client = redis.asyncio.Redis.from_url(private_redis.url, decode_responses=True)   # behind the relay's back
    try:
        await lim.start()
        s = [scope("repaid", daily_tokens=100), scope("repaid-app", inherited=True, monthly_tokens=1000)]
        # A batch before the outage: Redis has the script, so the repayment's send runs it (a first
        # send would be answered NOSCRIPT, and that answer lost would prove nothing).
        lim.settle(await lim.acquire(s, 0), 0)
        relay.block()                                 # Redis unreachable: new connections refused, open ones cut
        lim.settle(await lim.acquire(s, 30), 60)      # admitted alone, used 60: owed to both scopes
        assert not lim.up
        # The first batch to carry the key after the recovery is its repayment: Redis runs it, its
        # answer never arrives.
        lost = relay.lose_answer(f"{redis_prefix}repaid:d:".encode())
        relay.block(False)
        async with asyncio.timeout(10):
            while not lost.is_set():
                await asyncio.sleep(0.05)
            while not lim.up or lim._owed or lim._unsettled or lim._settlements or lim._sender is not None:
                await asyncio.sleep(0.05)
        grant = await lim.acquire(s, 0)               # counted in Redis again, after the repayment's retry
        assert isinstance(grant, RedisGrant) and grant.local is None
        assert await client.get(f"{redis_prefix}repaid:d:{grant.day}") == "60"
        assert await client.get(f"{redis_prefix}repaid-app:m:{grant.month}") == "60"
        assert 86400 < await client.ttl(f"{redis_prefix}repaid:d:{grant.day}") <= 2 * 86400   # the budget's expiry
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 41)
        assert (over.value.kind, over.value.remaining) == ("daily_tokens", 40)
    finally:
        await client.aclose()
        await lim.close()
        relay.stop()


async def test_a_repayment_whose_answer_was_lost_and_whose_retry_comes_past_its_horizon_is_dropped_and_said(
        private_redis: PrivateRedis, redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Redis runs a repayment and its answer is lost; the probe finds Redis back only after the retry
    horizon (shortened here to 0.75 s; the probe waits 2 s). Nothing can tell any more whether it ran:
    it is dropped, logged (key, day, tokens) and counted, never added a second time."""
    dropped: list[str] = []
    relay = TcpRelay("127.0.0.1", private_redis.port).start()
    lim = RedisLimiter(f"redis://127.0.0.1:{relay.port}/0", prefix=redis_prefix, timeout_s=0.3,
                       probe_interval_s=2.0, on_backend_down="local", settle_retry_s=0.75,
                       on_settlement_dropped=dropped.append)
    client = redis.asyncio.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        await lim.start()
        s = [scope("late-repaid", daily_tokens=100)]
        lim.settle(await lim.acquire(s, 0), 0)        # the script cached: the repayment's send runs it
        relay.block()
        lim.settle(await lim.acquire(s, 30), 60)      # admitted alone, used 60
        lost = relay.lose_answer(f"{redis_prefix}late-repaid:d:".encode())
        relay.block(False)
        async with asyncio.timeout(15):
            while not lost.is_set():
                await asyncio.sleep(0.05)
            while not dropped or not lim.up or lim._owed or lim._unsettled or lim._settlements:
                await asyncio.sleep(0.05)
        assert dropped == ["retry_horizon"]
        grant = await lim.acquire(s, 0)
        assert isinstance(grant, RedisGrant) and grant.local is None
        assert await client.get(f"{redis_prefix}late-repaid:d:{grant.day}") == "60"   # the lost send's, once
        assert any("+60 tokens on late-repaid for day" in r.getMessage() and "may have added them" in r.getMessage()
                   for r in caplog.records if r.name == "seekgate.limits" and r.levelname == "ERROR")
    finally:
        await client.aclose()
        await lim.close()
        relay.stop()


async def test_tokens_admitted_locally_and_still_owed_when_the_limiter_closes_with_redis_down_are_said_and_counted(
        private_redis: PrivateRedis, redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Redis is down at shutdown: what this replica admitted on its own can no longer reach the shared
    budgets. Like a settlement dropped then, it is logged (key, day, tokens) and counted, reason shutdown."""
    dropped: list[str] = []
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1,
                       on_backend_down="local", on_settlement_dropped=dropped.append)
    await lim.start()
    s = [scope("owing", daily_tokens=1000), scope("owing-app", inherited=True, monthly_tokens=10_000)]
    private_redis.stop()
    lim.settle(await lim.acquire(s, 30), 45)        # admitted alone, used 45
    lim.settle(await lim.acquire(s, 30), 5)         # and 5: 50 owed to each scope
    assert not lim.up
    await lim.close()
    assert dropped == ["shutdown", "shutdown"]      # one per scope's day and month
    from proxy.state.limits import _windows
    day = _windows(time.time())[0]
    lines = [r.getMessage() for r in caplog.records if r.name == "seekgate.limits" and r.levelname == "ERROR"]
    for key in ("owing", "owing-app"):
        assert any(f"+50 tokens on {key} for day {day}" in line and "on_backend_down=local" in line
                   for line in lines), lines


async def test_a_settlement_still_waiting_for_its_ride_when_the_limiter_closes_with_redis_down_is_said_and_counted(
        private_redis: PrivateRedis, redis_prefix: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A settlement that only lowers a charge waits a moment for a batch to ride; Redis is found down
    meanwhile (by the clock read, not by a batch that would have kept it), and the limiter closes. The
    settlement never reaches Redis: like every other one left out then, it is logged and counted
    (shutdown), not lost without a word."""
    import proxy.state.redis_limiter as redis_limiter
    monkeypatch.setattr(redis_limiter, "SETTLE_DELAY_S", 30.0)   # still waiting when the limiter closes
    dropped: list[str] = []
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1, lease_s=1.0,
                       on_settlement_dropped=dropped.append)
    await lim.start()
    grant = await lim.acquire([scope("waiting", daily_tokens=1000)], 500)   # no lease: its settlement waits
    lim.settle(grant, 100)                         # -400, waiting for a ride
    private_redis.stop()
    async with asyncio.timeout(5):
        while lim.up:                              # found by the clock read every lease_s / 3
            await asyncio.sleep(0.05)
    await lim.close()
    assert dropped == ["shutdown"]
    assert any("waiting" in r.getMessage() and "-400 tokens" in r.getMessage() for r in caplog.records
               if r.name == "seekgate.limits" and r.levelname == "ERROR")


@pytest.mark.parametrize(("limits", "tokens", "slots"), [
    ({"rpm": 20}, 0, 9),                      # its own charge makes 1; slots while the count stays under 10
    ({"rpm": 20, "request": 0}, 0, 10),       # a reservation alone charges no request of its own
    ({"rpm": 21}, 0, 10),                     # under 10.5
    ({"tpm": 100}, 7, 6),                     # 7 used; each slot 7 more while the total stays within 50
    ({"daily_tokens": 64, "rpm": 1000}, 5, 5),
    ({"monthly_tokens": 30}, 5, 2),
    ({"concurrency": 8}, 0, 3),               # leases: 1 held, slots while fewer than 4
    ({"rpm": 1000, "tpm": 1000}, 0, 64),      # nothing near half: as many as asked
    ({"rpm": 2}, 0, 0),                       # its own charge already took half
])
async def test_a_reservation_takes_slots_while_half_of_every_limit_stays_free(
        limiter: RedisLimiter, redis_server_url: str, redis_prefix: str, limits: dict[str, int], tokens: int,
        slots: int) -> None:
    """The script counts the fitting slots at once: exactly as many as a per-request check at half
    of every limit would admit one after another, charged in every log the limits keep."""
    limits = dict(limits)   # the parameter is shared by every run of it (test_redis_cluster.py runs it too)
    request = limits.pop("request", 1)
    s = scope("half", **limits)
    assert not s.limits.unlimited()
    from proxy.state.limits import _windows
    day, month, to_day, to_month = _windows(time.time())
    five = [s.limits.rpm, s.limits.tpm, s.limits.concurrency, s.limits.daily_tokens, s.limits.monthly_tokens]
    args = [0, 1, limiter.lease_ms, 1000, "", 120000, 1, "g", tokens, day, month, int(to_day * 1000),
            int(to_month * 1000), 64, request, *five]
    replies, failed, late = await limiter._run_batch(list(scope_keys(f"{limiter.prefix}half", day, month)), args)
    assert failed == late == [] and int(replies[0][0]) == 1
    assert int(replies[0][5]) == slots
    client = direct_client(redis_server_url)
    try:
        base = f"{limiter.prefix}half"
        charged = request + slots
        if s.limits.rpm:
            assert await client.zcard(f"{base}:r") == charged
        if s.limits.tpm:
            assert int(await client.hget(f"{base}:tc", "_sum")) == tokens * charged
        if s.limits.concurrency:
            assert await client.zcard(f"{base}:c") == charged
        if tokens:
            assert int(await client.get(f"{base}:d:{day}")) == tokens * charged
            assert int(await client.get(f"{base}:m:{month}")) == tokens * charged
    finally:
        await client.aclose()


async def test_a_busy_key_refills_its_slots_before_they_run_dry(limiter: RedisLimiter, redis_server_url: str,
                                                               redis_prefix: str) -> None:
    """32 requests at a time, each taking a moment: the pool is topped up while slots are left, so
    almost every admission comes from a slot rather than a burst of them going to Redis."""
    s = [scope("refill", rpm=1_000_000)]

    async def client_loop() -> None:
        for _ in range(40):
            limiter.settle(await limiter.acquire(s, 0), 0)
            await asyncio.sleep(0.01)   # a request that takes 10 ms: ~3 000 admissions a second

    await asyncio.gather(*(client_loop() for _ in range(32)))
    client = direct_client(redis_server_url)
    try:
        logged = [m.decode() for m in await client.zrange(f"{limiter.prefix}refill:r", 0, -1)]
    finally:
        await client.aclose()
    requests = [m for m in logged if "#" not in m]   # admissions judged in Redis one by one
    assert len(logged) >= 32 * 40
    assert len(requests) <= 32 * 40 // 10, len(requests)


async def test_a_raised_charge_rides_the_next_admission_and_goes_alone_within_its_delay(
        limiter: RedisLimiter, redis_server_url: str, redis_prefix: str) -> None:
    """A generate call's real count is above its estimate: the raise waits up to RAISE_DELAY_S for a
    ride, but an admission this replica sends meanwhile carries it and is judged after it."""
    s = [scope("raise", tpm=100)]
    limiter.settle(await limiter.acquire(s, 10), 30)    # charged 10, used 30: raised by 20
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(s, 71)                     # 30 + 71 > 100: judged with the raise
    assert over.value.remaining == 70
    grant = await limiter.acquire(s, 10)
    assert isinstance(grant, RedisGrant)
    limiter.settle(grant, 40)                           # raised by 30, and nothing else sent
    client = direct_client(redis_server_url)
    try:
        deadline = time.monotonic() + 1.0
        while int(await client.hget(f"{limiter.prefix}raise:tc", grant.gid) or 0) != 40:
            assert time.monotonic() < deadline, "the raise was not written on its own"
            await asyncio.sleep(0.005)
    finally:
        await client.aclose()


async def test_daily_budget_is_one_window_across_replicas_with_skewed_clocks(redis_server_url: str,
                                                                             redis_prefix: str) -> None:
    """A replica whose clock has run a day ahead still charges the day Redis is in, not a fresh one."""
    ahead = RedisLimiter(redis_server_url, prefix=redis_prefix, clock=lambda: time.time() + 86400.0)
    honest = RedisLimiter(redis_server_url, prefix=redis_prefix)
    await ahead.start()
    await honest.start()
    try:
        s = [scope("skew", daily_tokens=100, monthly_tokens=0)]
        await honest.acquire(s, 60)
        with pytest.raises(OverLimit) as over:
            await ahead.acquire(s, 60)    # 60 + 60 > 100 in the one day both replicas share
        assert over.value.kind == "daily_tokens"
        await ahead.acquire(s, 40)        # the same window's last 40 tokens
        with pytest.raises(OverLimit):
            await honest.acquire(s, 1)
    finally:
        await ahead.close()
        await honest.close()


async def test_a_refused_admission_cancelled_in_flight_credits_no_budget_back(limiter: RedisLimiter) -> None:
    """A client gone while its refused admission was out must not hand the tokens it never got back to the budget."""
    s = [scope("gone", daily_tokens=100)]
    await limiter.acquire(s, 60)
    for _ in range(3):
        asking = asyncio.create_task(limiter.acquire(s, 60))   # over the budget: Redis refuses it
        while limiter._admissions or limiter._sender is None:
            await asyncio.sleep(0)                              # until its batch is on the wire
        asking.cancel()
        with contextlib.suppress(asyncio.CancelledError, OverLimit):
            await asking
    await asyncio.sleep(0.3)                                    # any settlement it queued is written
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(s, 60)
    assert (over.value.kind, over.value.remaining) == ("daily_tokens", 40)


async def test_a_settlement_whose_answer_was_lost_is_not_applied_twice(limiter: RedisLimiter,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The script ran, its reply never came back (a timeout): the retry must not correct the budget again."""
    s = [scope("twice", daily_tokens=1000, concurrency=5)]
    grant = await limiter.acquire(s, 500)            # estimate 500
    real = limiter._run_batch
    lost = 0

    async def reply_lost(keys: list[str], args: list[Any]) -> Any:
        nonlocal lost
        answer = await real(keys, args)              # Redis ran the whole batch ...
        if args[0] and not lost:
            lost += 1
            raise redis.exceptions.TimeoutError("reply lost")   # ... and its answer never arrived
        return answer

    monkeypatch.setattr(limiter, "_run_batch", reply_lost)
    limiter.settle(grant, 100)                       # the response used 100: -400, once
    async with asyncio.timeout(10):
        while not lost or not limiter.up or limiter._unsettled or limiter._settlements:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(s, 901)
    assert (over.value.kind, over.value.remaining) == ("daily_tokens", 900)


async def test_a_settlement_is_applied_once_when_a_retry_of_it_never_reached_redis(
        limiter: RedisLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first batch ran and the answer was lost; its retry was lost on the way, never run. The next
    retry must still find the first batch's mark, not look only for the mark of the send that never ran."""
    s = [scope("chain", daily_tokens=1000, concurrency=5)]
    grant = await limiter.acquire(s, 500)            # estimate 500
    real = limiter._run_batch
    sends = 0

    async def ran_then_never_sent(keys: list[str], args: list[Any]) -> Any:
        nonlocal sends
        if not args[0]:                              # no settlement in it
            return await real(keys, args)
        sends += 1
        if sends == 2:
            raise redis.exceptions.TimeoutError("never reached Redis")
        answer = await real(keys, args)
        if sends == 1:
            raise redis.exceptions.TimeoutError("reply lost")   # Redis ran it
        return answer

    monkeypatch.setattr(limiter, "_run_batch", ran_then_never_sent)
    limiter.settle(grant, 100)                       # the response used 100: -400, once
    async with asyncio.timeout(10):
        while sends < 3 or not limiter.up or limiter._unsettled or limiter._settlements:
            await asyncio.sleep(0.05)
    with pytest.raises(OverLimit) as over:
        await limiter.acquire(s, 901)
    assert (over.value.kind, over.value.remaining) == ("daily_tokens", 900)


async def test_a_settlement_lost_in_an_outage_longer_than_its_marks_life_is_dropped_and_said_not_applied_twice(
        redis_prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A settlement's batch runs, and Redis stops before its answer comes back; it stays away longer than
    that batch's mark lives and starts again with its data. The retry can no longer tell whether the
    batch ran: it is dropped, in the log (key, tokens) and through on_settlement_dropped, never applied
    a second time. (The retry horizon is shortened here from its 90 s; the marks' life follows it.)"""
    server = PrivateRedis(persistent=True)
    server.start()
    dropped: list[str] = []
    lim = RedisLimiter(server.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1,
                       settle_retry_s=0.75, on_settlement_dropped=dropped.append)
    await lim.start()
    client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    from proxy.state.limits import _windows
    day = _windows(time.time())[0]
    real = lim._run_batch
    sends = 0

    async def ran_then_redis_stopped(keys: list[str], args: list[Any]) -> Any:
        nonlocal sends
        answer = await real(keys, args)
        if args[0]:
            sends += 1
            if sends == 1:                             # Redis ran it, then stopped before it answered
                await asyncio.to_thread(server.stop)
                assert lim._batch_conn is not None
                await lim._batch_conn.disconnect()     # as _run_batch does with a connection cut off
                raise redis.exceptions.ConnectionError("Redis stopped")
        return answer

    monkeypatch.setattr(lim, "_run_batch", ran_then_redis_stopped)
    try:
        s = [scope("outage", daily_tokens=1000, concurrency=5)]
        grant = await lim.acquire(s, 500)              # estimate 500
        lim.settle(grant, 100)                         # the response used 100: -400
        async with asyncio.timeout(5):
            while lim.up:
                await asyncio.sleep(0.01)
        await asyncio.sleep(1.5)                       # longer than the mark lives (1 s)
        server.start()
        async with asyncio.timeout(10):
            while not lim.up or lim._unsettled or lim._settlements or lim._sender is not None:
                await asyncio.sleep(0.05)
        assert await client.get(f"{redis_prefix}outage:d:{day}") == "100"   # applied once, kept by the restart
        assert dropped == ["retry_horizon"]
        assert any("outage" in r.getMessage() and "-400 tokens" in r.getMessage() for r in caplog.records
                   if r.name == "seekgate.limits" and r.levelname == "ERROR")
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 901)
        assert (over.value.kind, over.value.remaining) == ("daily_tokens", 900)
    finally:
        await client.aclose()
        await lim.close()
        server.destroy()


async def test_a_retry_that_reaches_redis_past_its_horizon_applies_nothing(
        private_redis: PrivateRedis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first batch ran and its answer was lost; the retry is sent in time, but Redis is held up
    (DEBUG SLEEP) until past the retry horizon and the first batch's mark has expired. Redis judges the
    deadline on its own clock when the retry runs: it applies nothing, instead of the correction again."""
    dropped: list[str] = []
    lim = RedisLimiter(private_redis.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.1,
                       settle_retry_s=1.5, on_settlement_dropped=dropped.append)   # marks live 2 s
    await lim.start()
    import redis as sync_redis
    blocker = sync_redis.Redis.from_url(private_redis.url)
    s = [scope("held-up", daily_tokens=1000, concurrency=5)]
    grant = await lim.acquire(s, 500)                # estimate 500
    real = lim._run_batch
    sends = 0
    naps: list[asyncio.Task[Any]] = []

    async def held_up(keys: list[str], args: list[Any]) -> Any:
        nonlocal sends
        if not args[0]:                              # no settlement in it
            return await real(keys, args)
        sends += 1
        if sends == 2:                               # the retry, in time: Redis sleeps past the horizon
            naps.append(asyncio.create_task(asyncio.to_thread(blocker.execute_command, "DEBUG", "SLEEP", "3")))
            await asyncio.sleep(0.2)
            return await real(keys, args)            # times out; runs when Redis wakes
        answer = await real(keys, args)
        if sends == 1:
            raise redis.exceptions.TimeoutError("reply lost")   # Redis ran it
        return answer

    monkeypatch.setattr(lim, "_run_batch", held_up)
    try:
        lim.settle(grant, 100)                       # the response used 100: -400, once
        async with asyncio.timeout(15):
            while not naps:
                await asyncio.sleep(0.05)
            await naps[0]
            while not lim.up or lim._unsettled or lim._settlements or lim._sender is not None:
                await asyncio.sleep(0.05)
        assert sends == 2 and dropped == ["retry_horizon"]   # not sent a third time: past its horizon
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 901)
        assert (over.value.kind, over.value.remaining) == ("daily_tokens", 900)
    finally:
        blocker.close()
        await lim.close()


async def test_slots_reserved_by_an_admission_cancelled_in_flight_are_given_back(
        limiter: RedisLimiter, redis_server_url: str, redis_prefix: str) -> None:
    """A busy key's admission asks for slots; its client leaves while the batch is out. Redis charged the
    slots like requests (budget tokens included): they must come back, not burn the key's day."""
    s = [scope("leaves", daily_tokens=10_000)]
    for _ in range(4):                              # busy: the next admission that goes to Redis reserves
        limiter.settle(await limiter.acquire(s, 10), 10)
    await asyncio.sleep(1.1)                        # the first reservation's life ends: the next asks anew
    admitted = 4
    asking = asyncio.create_task(limiter.acquire(s, 10))
    while limiter._admissions or limiter._sender is None:
        await asyncio.sleep(0)                      # its batch is on the wire
    sent = limiter._sender
    asking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asking
    await sent
    await asyncio.sleep(0)                          # the answer's callbacks have run
    client = direct_client(redis_server_url)

    async def charged() -> list[int]:
        return [int(await client.get(k)) async for k in client.scan_iter(f"{limiter.prefix}leaves:d:*")]

    try:
        assert (await charged())[0] > 10 * (admitted + 1), "the cancelled admission reserved no slots"
        deadline = time.monotonic() + 5             # unused slots are cancelled once their 1 s life ends
        while await charged() != [10 * admitted] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await charged() == [10 * admitted]
    finally:
        await client.aclose()


async def test_every_key_the_scripts_touch_is_declared_in_keys(limiter: RedisLimiter, redis_server_url: str,
                                                               redis_prefix: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis Cluster routes a script call by its KEYS and checks them: a key the script builds for
    itself (`<p>:r`, a batch's mark) is invisible to it. Every key in Redis after admissions, a lease
    renewal, a settlement and its retry (carrying its lost batch's mark) was one of the calls' KEYS."""
    declared: set[str] = set()
    renewed: list[str] = []
    real_batch, real_renew = limiter._run_batch, limiter._renew
    lost = 0

    async def run_batch(keys: list[str], args: list[Any]) -> Any:
        nonlocal lost
        declared.update(keys)
        answer = await real_batch(keys, args)
        if args[0] and not lost:   # the first settlement's answer is lost: its retry carries the mark
            lost += 1
            raise redis.exceptions.TimeoutError("reply lost")
        return answer

    async def renew(keys: list[str], args: list[Any]) -> Any:
        renewed.extend(keys)
        return await real_renew(keys=keys, args=args)

    monkeypatch.setattr(limiter, "_run_batch", run_batch)
    monkeypatch.setattr(limiter, "_renew", renew)
    every = {"rpm": 50, "tpm": 10_000, "concurrency": 5, "daily_tokens": 100_000, "monthly_tokens": 1_000_000}
    scopes = [scope("dev", **every), scope("app", True, **every), scope("rule:r1:app", True, rpm=50)]
    grants = [await limiter.acquire(scopes, 40) for _ in range(3)]
    await limiter._renew_leases()
    for grant in grants:
        limiter.settle(grant, 70)
    async with asyncio.timeout(10):
        while not lost or not limiter.up or limiter._unsettled or limiter._settlements:
            await asyncio.sleep(0.05)
    client = direct_client(redis_server_url, decode_responses=True)
    try:
        written = {key async for key in client.scan_iter(match=f"{limiter.prefix}*")}
    finally:
        await client.aclose()
    assert {f"{limiter.prefix}dev:r", f"{limiter.prefix}app:tc", f"{limiter.prefix}rule:r1:app:r"} <= written
    assert any(":batch:" in key for key in written)   # the settlements' batch marks
    assert written <= declared
    assert renewed and set(renewed) <= declared and {f"{limiter.prefix}dev:c", f"{limiter.prefix}app:c"} <= set(renewed)


async def test_a_single_redis_keeps_the_key_names_of_earlier_versions(limiter: RedisLimiter, redis_server_url: str,
                                                                      redis_prefix: str) -> None:
    """A rolling upgrade on one Redis keeps every window, lease and budget: no hash tag is added there,
    the keys are named exactly as before Redis Cluster support."""
    assert not limiter.cluster and limiter.prefix == redis_prefix
    grant = await limiter.acquire([scope("old", rpm=5, tpm=100, concurrency=2, daily_tokens=1000,
                                         monthly_tokens=1000)], 10)
    assert isinstance(grant, RedisGrant)
    client = direct_client(redis_server_url, decode_responses=True)
    try:
        written = {key async for key in client.scan_iter(match=f"{redis_prefix}*")}
    finally:
        await client.aclose()
    base = f"{redis_prefix}old"
    assert written == {f"{base}:r", f"{base}:t", f"{base}:tc", f"{base}:c", f"{base}:d:{grant.day}",
                       f"{base}:m:{grant.month}"}


def test_a_batch_packed_with_its_keys_encoded_once_is_the_same_command() -> None:
    """_pack_call reuses each key's encoding from batch to batch: the bytes are those of _pack, every time."""
    from proxy.state.redis_limiter import _pack, _pack_call
    keys = [*scope_keys("seekgate:limits:dév", "2026-12-07", "2026-12"), "seekgate:limits:batch:x:1"]
    args: list[str | int] = [1, 0, 30000, 1000, "1", 1, "g", -5, "2026-12-07", "2026-12", 0, ""]
    for _ in range(2):   # the second time from the cache
        assert _pack_call("EVALSHA", "s" * 40, keys, args) == _pack(["EVALSHA", "s" * 40, len(keys), *keys, *args])
    assert _pack_call("EVAL", "return 1", [], [0]) == _pack(["EVAL", "return 1", 0, 0])
