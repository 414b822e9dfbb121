"""Redis stopped under three replicas with `limits.on_backend_down: local`, and started again.

The cluster of test_replica_limits.py (three real `seekgate serve` processes, one PostgreSQL store,
a PrivateRedis of this module, the real Triton behind a relay), here configured to fall back to
each replica's own counters while Redis is unreachable. The test shows, through the real processes:
limited requests keep being served; each replica then enforces the key's limits alone (each one
admits the key's full rpm and refuses past it, so together they admit three times the limit); the
replicas say so in `seekgate_limits_backend_up` / `seekgate_limits_local` and in a log line; and
once Redis is back on the same port, without a restart, the shared counters are used again (exact
across the three, not three times the limit).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from proxy.local.triton import TritonProcess
from tests.frontend.test_replica_limits import GENERATE, Cluster, call, running_cluster
from tests.gateway import metric, wait_for

LOCAL_LOG = "this replica now enforces its own limits alone"
BACK_LOG = "Redis reachable again"


@pytest.fixture(scope="module")
def cluster(triton: TritonProcess, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    with running_cluster(triton, postgres_admin_url, tmp_path_factory.mktemp("replica-local"), "local") as c:
        yield c


def generate(cluster: Cluster, n: int, key: str, text: str) -> tuple[int, dict[str, str], bytes]:
    return call(cluster.replicas[n % 3], "POST", GENERATE, key, {"text_input": text, "max_tokens": 1})


def backend(cluster: Cluster) -> list[tuple[float, float]]:
    """Each replica's (seekgate_limits_backend_up, seekgate_limits_local)."""
    return [(metric(r.gw, "seekgate_limits_backend_up"), metric(r.gw, "seekgate_limits_local"))
            for r in cluster.replicas]


def test_redis_down_each_replica_enforces_its_own_limits_and_the_shared_ones_return(cluster: Cluster) -> None:
    replicas, redis = cluster.replicas, cluster.redis
    pids = [r.proc.pid for r in replicas]
    _, busy = replicas[0].gw.key(owner="busy", limits={"rpm": 100_000})
    _, key = replicas[0].gw.key(owner="rpm4", limits={"rpm": 4})
    for n in range(3):
        assert generate(cluster, n, busy, "before")[0] == 200
    assert backend(cluster) == [(1.0, 0.0)] * 3
    # Shared first: rpm 4 across the three is 4 in all.
    assert [generate(cluster, n, key, "shared")[0] for n in range(6)] == [200] * 4 + [429] * 2

    redis.stop()
    # Limited requests keep being served, by every replica.
    for n in range(6):
        status, _, body = generate(cluster, n, busy, "during")
        assert status == 200, body
    assert backend(cluster) == [(0.0, 1.0)] * 3
    for r in replicas:
        assert LOCAL_LOG in r.log.read_text(), r.log.read_text()
        assert call(r, "GET", "/v2/health/ready", "")[0] == 200   # serving under its own limits: stays in rotation

    # Each replica counts alone: a fresh key with rpm 4 gets 4 on each replica, refused past them there.
    _, alone = replicas[0].gw.key(owner="alone", limits={"rpm": 4})
    for r in range(3):
        answers = [generate(cluster, r, alone, f"local {r}") for _ in range(5)]
        assert [a[0] for a in answers] == [200] * 4 + [429], [a[0] for a in answers]
        assert answers[-1][1]["x-ratelimit-limit"] == "4"
        assert json.loads(answers[-1][2]) == {"error": "rate limit exceeded"}

    redis.start()   # the same port, empty: the probe finds it, no replica restarts
    assert wait_for(lambda: backend(cluster) == [(1.0, 0.0)] * 3, 30), backend(cluster)
    for r in replicas:
        assert BACK_LOG in r.log.read_text(), r.log.read_text()
    # Shared again: a fresh key's rpm 4 is 4 across the three (locally it would be 4 on each).
    _, again = replicas[0].gw.key(owner="again", limits={"rpm": 4})
    statuses = [generate(cluster, n, again, "shared again")[0] for n in range(9)]
    assert statuses == [200] * 4 + [429] * 5, statuses
    assert [r.proc.pid for r in replicas] == pids and all(r.proc.poll() is None for r in replicas)
