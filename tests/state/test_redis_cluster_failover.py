"""The Redis limiter on a real Redis Cluster with replicas (three masters, one replica each): the master
serving the limiter's slot is SIGKILLed, its replica takes over, and the limiter follows it; one
started after the failover finds the cluster through the other nodes its URL names."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest

from proxy.errors import StoreUnavailable
from proxy.state.limits import OverLimit
from proxy.state.redis_limiter import RedisGrant, RedisLimiter
from proxy.state.redis_scripts import cluster_prefix
from tests.backends import PrivateRedisCluster
from tests.state.test_redis_limiter import scope

NODE_TIMEOUT_MS = 1000   # cluster-node-timeout: a master unreachable this long is failed over


@pytest.fixture
def redis_cluster() -> Iterator[PrivateRedisCluster]:
    """A cluster per test: each kills a master."""
    cluster = PrivateRedisCluster(masters=3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def redis_prefix() -> str:
    return f"seekgate-test:{secrets.token_hex(6)}:"


async def test_the_slots_master_killed_fails_closed_until_its_replica_takes_over_then_counts_on(
        redis_cluster: PrivateRedisCluster, redis_prefix: str) -> None:
    """Three admissions (one still running) are counted and replicated; the slot's master is SIGKILLed.
    Until its replica is promoted every limited request is refused (StoreUnavailable: 503), none admitted
    unmetered, and the running request's settlement is kept. Once the replica serves the slot the same
    limiter, not restarted, admits again on the counts from before the kill: the rpm window holds its
    three, and the day's budget holds 100 + 100 + the running request's real 50, settled exactly once."""
    seen: list[tuple[bool, bool]] = []
    # The master killed is the node the URL names: the client finds the promoted replica through the
    # nodes it learned from the cluster, not through the address it was configured with.
    while redis_cluster.port_of(f"{cluster_prefix(redis_prefix)}x") != redis_cluster.ports[0]:
        redis_prefix = f"seekgate-test:{secrets.token_hex(6)}:"
    lim = RedisLimiter(redis_cluster.url, prefix=redis_prefix, timeout_s=0.5, on_backend_down="closed",
                       on_backend=lambda up, local: seen.append((up, local)), probe_interval_s=0.2)
    await lim.start()
    slot_key = f"{lim.prefix}x"
    master = redis_cluster.port_of(slot_key)
    assert redis_cluster.url.endswith(f":{master}")
    replica = redis_cluster.replica_of(master)
    s = [scope("failover", rpm=5, daily_tokens=1000)]
    try:
        for _ in range(2):
            lim.settle(await lim.acquire(s, 100), 100)
        running = await lim.acquire(s, 300)   # estimate 300; it will have used 50
        assert redis_cluster.wait_replicated(master) == 1   # the counts so far are on the replica too

        redis_cluster.kill_node(master)
        with pytest.raises(StoreUnavailable):
            await lim.acquire(s, 0)
        assert not lim.up and seen[-1] == (False, False)
        lim.settle(running, 50)   # ends during the outage: -250, kept until the slot is served again

        refused = 0
        async with asyncio.timeout(30):
            while not lim.up:   # no master for the slot: every attempt refused, none let through
                with pytest.raises(StoreUnavailable):
                    await lim.acquire(s, 0)
                refused += 1
                await asyncio.sleep(0.1)
        assert refused >= 1 and seen[-1] == (True, False)
        assert redis_cluster.port_of(slot_key) == replica   # promoted: it serves the slot now

        async with asyncio.timeout(10):
            while lim._unsettled or lim._settlements or lim._sender is not None:
                await asyncio.sleep(0.05)
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 751)
        assert (over.value.kind, over.value.remaining) == ("daily_tokens", 750)
        await lim.acquire(s, 0)   # the 4th and 5th of rpm=5: the three before the kill still count
        await lim.acquire(s, 0)
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 0)
        assert over.value.kind == "rpm"
    finally:
        await lim.close()


async def test_under_local_the_replica_counts_alone_through_the_failover_and_repays_the_promoted_master(
        redis_cluster: PrivateRedisCluster, redis_prefix: str) -> None:
    """`on_backend_down: local`: with no master for the slot this replica admits under its own limits
    (rpm=5 of its own), then, the replica promoted, repays the tokens it admitted alone to the shared
    day's budget, once: 200 counted before the kill and 100 during it leave 700 of 1000."""
    seen: list[tuple[bool, bool]] = []
    lim = RedisLimiter(redis_cluster.url, prefix=redis_prefix, timeout_s=0.5, on_backend_down="local",
                       on_backend=lambda up, local: seen.append((up, local)), probe_interval_s=0.2)
    await lim.start()
    master = redis_cluster.port_of(f"{lim.prefix}x")
    s = [scope("failover", rpm=5, daily_tokens=1000)]
    try:
        for estimate in (100, 90):   # shapes of their own: no slots reserved ahead (redis_slots.py)
            lim.settle(await lim.acquire(s, estimate), 100)
        async with asyncio.timeout(10):
            while lim._settlements or lim._sender is not None:
                await asyncio.sleep(0.05)
        assert redis_cluster.wait_replicated(master) == 1

        redis_cluster.kill_node(master)
        alone = await lim.acquire(s, 50)   # the failed batch falls back to this replica's own count
        assert not lim.up and seen[-1] == (False, True) and isinstance(alone, RedisGrant) and alone.local
        lim.settle(alone, 100)
        for _ in range(4):
            await lim.acquire(s, 0)
        with pytest.raises(OverLimit):   # its own rpm=5, while the slot has no master
            await lim.acquire(s, 0)

        async with asyncio.timeout(30):
            while not lim.up or lim._owed or lim._settlements or lim._sender is not None:
                await asyncio.sleep(0.1)
        assert seen[-1] == (True, False)
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 701)
        assert (over.value.kind, over.value.remaining) == ("daily_tokens", 700)
        for _ in range(3):   # the shared window: the two from before the kill (not those admitted alone)
            await lim.acquire(s, 0)
        with pytest.raises(OverLimit) as over:
            await lim.acquire(s, 0)
        assert over.value.kind == "rpm"
    finally:
        await lim.close()


async def test_a_replica_started_after_a_failover_finds_the_cluster_through_any_node_its_url_names(
        redis_cluster: PrivateRedisCluster, redis_prefix: str) -> None:
    """`redis+cluster://a,b,...`: the first node named is dead (SIGKILLed, its replica promoted) when a
    replica starts, as after a failover whose node never came back. Named alone it would leave that
    replica refusing every limited request until the dead node answered again; with the others named
    the client finds the cluster through the next one, and counts."""
    dead = redis_cluster.ports[0]
    redis_cluster.kill_node(dead)
    async with asyncio.timeout(30):
        while not redis_cluster.failed_over(dead):
            await asyncio.sleep(0.1)
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in redis_cluster.ports)
    lim = RedisLimiter(url, prefix=redis_prefix, timeout_s=0.5)
    await lim.start()
    try:
        assert lim.up
        s = [scope("restarted", rpm=2)]
        await lim.acquire(s, 0)
        await lim.acquire(s, 0)
        with pytest.raises(OverLimit):
            await lim.acquire(s, 0)
    finally:
        await lim.close()
