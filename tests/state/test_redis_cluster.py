"""The Redis limiter on a real Redis Cluster (three masters): the single-Redis tests again, and one slot per call."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot

from proxy.errors import StoreUnavailable
from proxy.state.limits import OverLimit
from proxy.state.redis_limiter import RedisLimiter
from proxy.state.redis_scripts import cluster_prefix
from tests.backends import PrivateRedisCluster
from tests.state.test_redis_limiter import (  # noqa: F401 - collected here, on the cluster's fixtures below
    limiter,
    scope,
    test_a_batch_that_fails_in_an_unforeseen_way_refuses_its_admissions_instead_of_leaving_them_waiting,
    test_a_busy_key_refills_its_slots_before_they_run_dry,
    test_a_key_idle_after_a_busy_minute_expires_its_log_in_chunks,
    test_a_killed_replica_frees_its_slot_when_its_lease_expires,
    test_a_raised_charge_rides_the_next_admission_and_goes_alone_within_its_delay,
    test_a_refusal_by_any_scope_charges_none,
    test_a_refused_admission_cancelled_in_flight_credits_no_budget_back,
    test_a_reservation_takes_slots_while_half_of_every_limit_stays_free,
    test_a_settlement_is_applied_once_when_a_retry_of_it_never_reached_redis,
    test_a_settlement_whose_answer_was_lost_is_not_applied_twice,
    test_a_slot_stays_in_the_window_at_least_as_long_as_a_request_admitted_when_it_was_used,
    test_an_admission_redis_fails_refuses_only_itself_not_its_batch,
    test_concurrency_slot_freed_by_settle,
    test_daily_and_monthly_budgets,
    test_daily_budget_is_one_window_across_replicas_with_skewed_clocks,
    test_every_key_the_scripts_touch_is_declared_in_keys,
    test_rpm_admits_exactly_the_limit_and_says_when_a_place_frees,
    test_slots_never_used_are_given_back,
    test_slots_reserved_by_an_admission_cancelled_in_flight_are_given_back,
    test_three_busy_processes_served_from_reserved_slots_still_admit_exactly_the_limits,
    test_three_processes_never_admit_more_than_the_limits,
    test_tpm_charge_is_corrected_at_settle,
)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[PrivateRedisCluster]:
    cluster = PrivateRedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def redis_server_url(redis_cluster: PrivateRedisCluster) -> str:
    """The tests imported above run against the cluster: seekgate is configured with its cluster URL."""
    return redis_cluster.url


@pytest.fixture
def redis_prefix() -> str:
    """A prefix as an operator writes it, no hash tag (the limiter adds one: tests read keys by
    `limiter.prefix`); a fresh one per test spreads the tests over the cluster's three masters."""
    return f"seekgate-test:{secrets.token_hex(6)}:"


def test_the_cluster_has_three_masters_and_the_test_prefixes_land_on_each(redis_cluster: PrivateRedisCluster) -> None:
    """Without the hash tag a request's scopes hash to different slots, hence different nodes."""
    assert len(redis_cluster.ports) == 3
    assert len({key_slot(f"seekgate:limits:{k}:r".encode()) for k in ("dev", "app", "rule:r1:app")}) == 3


def test_the_cluster_prefix_is_a_hash_tag() -> None:
    assert cluster_prefix("seekgate:limits:") == "{seekgate:limits}:"
    assert cluster_prefix("{t}:limits:") == "{t}:limits:"   # already tagged: kept
    assert cluster_prefix("a{}b:") == "{a{}b}:"            # an empty tag tags nothing
    assert cluster_prefix("a{}{b}:") == "{a{}{b}}:"        # ... and Redis reads no further for another
    for prefix in ("seekgate:limits:", "{t}:limits:", "a{}b:", "a{}{b}:", "x{y}z:"):
        tagged = cluster_prefix(prefix)
        assert len({key_slot(f"{tagged}{key}:r".encode()) for key in ("dev", "app", "rule:r1:app", "a}{b")}) == 1


async def test_every_script_call_keeps_its_keys_in_one_slot(redis_server_url: str, redis_prefix: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Admissions of different keys (a key, its ancestors, an owner's rule scope) ride one batch with
    settlements, a retried settlement's mark, slot reservations and lease renewals: every call's keys
    are in one slot (else Redis Cluster refuses it with CROSSSLOT), and the configured prefix, untagged,
    gets the tag."""
    lim = RedisLimiter(redis_server_url, prefix=redis_prefix)
    assert lim.cluster and lim.prefix.startswith("{")
    calls: list[list[str]] = []
    real_batch, real_renew = lim._run_batch, lim._renew
    lost = 0

    async def run_batch(keys: list[str], args: list[Any]) -> Any:
        nonlocal lost
        calls.append(list(keys))
        answer = await real_batch(keys, args)
        if args[0] and not lost:
            lost += 1
            raise redis.exceptions.TimeoutError("reply lost")
        return answer

    async def renew(keys: list[str], args: list[Any]) -> Any:
        calls.append(list(keys))
        return await real_renew(keys=keys, args=args)

    monkeypatch.setattr(lim, "_run_batch", run_batch)
    monkeypatch.setattr(lim, "_renew", renew)
    await lim.start()
    try:
        leased = [scope("dev", concurrency=10, tpm=100_000), scope("app", True, rpm=1000, daily_tokens=10**6),
                  scope("rule:r1:app", True, rpm=1000)]
        busy = [scope("other", rpm=1000), scope("rule:r1:other", True, rpm=1000)]
        grants = await asyncio.gather(*(lim.acquire(leased if i % 2 else busy, 10) for i in range(12)))
        for _ in range(6):   # busy: admissions that go to Redis reserve slots
            lim.settle(await lim.acquire(busy, 10), 10)
        await lim._renew_leases()
        for grant in grants:
            lim.settle(grant, 15)
        async with asyncio.timeout(10):
            while not lost or not lim.up or lim._unsettled or lim._settlements:
                await asyncio.sleep(0.05)
    finally:
        await lim.close()
    assert len(calls) >= 4 and any(len(keys) > 6 for keys in calls)
    slots = {key_slot(key.encode()) for keys in calls for key in keys}
    assert len(slots) == 1


async def test_an_answered_cluster_refuses_what_a_limit_refuses_across_replicas(redis_server_url: str,
                                                                               redis_prefix: str) -> None:
    """Two replicas on the cluster share one count: the first admits 3 of rpm=5, the second 2, then 429s."""
    a, b = RedisLimiter(redis_server_url, prefix=redis_prefix), RedisLimiter(redis_server_url, prefix=redis_prefix)
    await a.start()
    await b.start()
    try:
        s = [scope("shared", rpm=5), scope("parent", True, rpm=100)]
        for _ in range(3):
            await a.acquire(s, 0)
        await b.acquire(s, 0)
        await b.acquire(s, 0)
        with pytest.raises(OverLimit):
            await b.acquire(s, 0)
        with pytest.raises(OverLimit):
            await a.acquire(s, 0)
    finally:
        await a.close()
        await b.close()


async def test_a_batch_whose_answer_timed_out_is_not_sent_again_by_the_cluster_client(
        redis_cluster: PrivateRedisCluster, redis_prefix: str) -> None:
    """The slot's master is busy (DEBUG SLEEP) past timeout_s while a settlement's batch waits in its
    socket: the batch runs once when the master wakes. A client that sent it again by itself would
    run it twice (Redis runs both) and give the key back 400 tokens twice; the limiter's own retry
    carries the batch's mark and is skipped."""
    lim = RedisLimiter(redis_cluster.url, prefix=redis_prefix, timeout_s=0.3, probe_interval_s=0.2)
    await lim.start()
    s = [scope("once", daily_tokens=1000)]
    try:
        grant = await lim.acquire(s, 500)                      # estimate 500
        import redis as sync_redis
        blocker = sync_redis.Redis(port=redis_cluster.port_of(f"{lim.prefix}x"))
        asleep = asyncio.create_task(asyncio.to_thread(blocker.execute_command, "DEBUG", "SLEEP", "1.5"))
        await asyncio.sleep(0.2)                               # the master is asleep
        lim.settle(grant, 100)                                 # the response used 100: -400, once
        await asleep
        blocker.close()
        async with asyncio.timeout(20):
            while not lim.up or lim._unsettled or lim._settlements or lim._sender is not None:
                await asyncio.sleep(0.05)
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 901)
        assert (over.value.kind, over.value.remaining) == ("daily_tokens", 900)
    finally:
        await lim.close()


# Last in the module: it stops one of the cluster's masters and starts it again.
@pytest.mark.parametrize("mode", ["closed", "local"])
async def test_the_slots_master_down_then_back(redis_cluster: PrivateRedisCluster, redis_prefix: str,
                                               mode: str) -> None:
    """The master serving the limiter's slot stops: limited requests get 503 (closed) or this replica's
    own limits (local), and the replica says so; started again, the shared counters take over, no restart."""
    seen: list[tuple[bool, bool]] = []
    lim = RedisLimiter(redis_cluster.url, prefix=redis_prefix, timeout_s=0.5, on_backend_down=mode,
                       on_backend=lambda up, local: seen.append((up, local)), probe_interval_s=0.2)
    await lim.start()
    port = redis_cluster.port_of(f"{lim.prefix}x")
    s = [scope("down", rpm=2)]
    try:
        await lim.acquire(s, 0)
        redis_cluster.stop_node(port)
        if mode == "closed":
            with pytest.raises(StoreUnavailable):
                await lim.acquire(s, 0)
        else:   # this replica's own rpm=2: two, then 429
            await lim.acquire(s, 0)
            await lim.acquire(s, 0)
            with pytest.raises(OverLimit):
                await lim.acquire(s, 0)
        assert not lim.up and seen[-1] == (False, mode == "local")
        redis_cluster.start_node(port)
        async with asyncio.timeout(30):
            while not lim.up:
                await asyncio.sleep(0.1)
        assert seen[-1] == (True, False)
        await lim.acquire(s, 0)   # the restarted master lost its data: a fresh window of 2
        await lim.acquire(s, 0)
        with pytest.raises(OverLimit):
            await lim.acquire(s, 0)
    finally:
        await lim.close()
