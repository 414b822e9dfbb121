"""Three `seekgate serve` replicas on a Redis Cluster with replicas, in front of the real Triton: the master
serving the limiter's slot is SIGKILLed and its replica promoted.

The cluster (tests/backends.PrivateRedisCluster) has three masters with one replica each and
`cluster-node-timeout` 1000 ms, so a killed master's replica takes its slots a few seconds later.
Meanwhile every limited request is refused with 503 + Retry-After (`limits.on_backend_down: closed`)
and none reaches Triton; then every replica serves again on its own, no restart, on the counts
from before the kill.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from proxy.local.triton import TritonProcess
from proxy.state.redis_scripts import cluster_prefix
from tests.backends import PrivateRedisCluster
from tests.frontend.test_replica_limits import Cluster, call, grpc_ready, running_cluster
from tests.frontend.test_replicas import Replica
from tests.gateway import wait_for

GENERATE = "/v2/models/deepseek/generate"
RPM = 30


@pytest.fixture(scope="module")
def cluster(triton: TritonProcess, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    with running_cluster(triton, postgres_admin_url, tmp_path_factory.mktemp("replica-limits-failover"), "closed",
                         redis=PrivateRedisCluster(masters=3, replicas=1, node_timeout_ms=1000)) as c:
        yield c


def test_the_slots_master_killed_refuses_503_until_its_replica_is_promoted_then_counts_on(cluster: Cluster) -> None:
    replicas, relay = cluster.replicas, cluster.relay
    redis = cluster.redis
    assert isinstance(redis, PrivateRedisCluster)
    # A concurrency limit keeps every admission a trip to Redis (such a key gets no slots, admissions
    # reserved ahead and handed out while Redis is down: counted before the kill, they would be served).
    _, key = replicas[0].gw.key(owner="failover", limits={"rpm": RPM, "concurrency": 100})
    pids = [r.proc.pid for r in replicas]
    before = 6
    for n in range(before):   # counted on the slot's master by every replica
        assert call(replicas[n % 3], "POST", GENERATE, key, {"text_input": "before", "max_tokens": 1})[0] == 200
    slot_key = f"{cluster_prefix('seekgate:limits:')}x"   # the default redis.key_prefix, tagged
    master = redis.port_of(slot_key)
    promoted = redis.replica_of(master)
    assert redis.wait_replicated(master) == 1   # the six are on its replica too

    redis.kill_node(master)
    refused: list[str] = []
    admitted: list[str] = []
    deadline, n = time.monotonic() + 30, 0
    while time.monotonic() < deadline:   # until a replica is served by the promoted master
        marker = f"outage-{uuid.uuid4().hex}"
        status, headers, body = call(replicas[n % 3], "POST", GENERATE, key, {"text_input": marker, "max_tokens": 1})
        if status == 200:
            admitted.append(marker)
            break
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, headers, body)
        assert json.loads(body) == {"error": "service temporarily unavailable"}, body
        refused.append(marker)
        n += 1
        time.sleep(0.05)
    assert refused and admitted, (len(refused), len(admitted))
    assert redis.port_of(slot_key) == promoted

    for r in replicas:   # each finds the promoted master by itself, refusing until it does
        def serves(r: Replica = r) -> bool:
            marker = f"after-{uuid.uuid4().hex}"
            status = call(r, "POST", GENERATE, key, {"text_input": marker, "max_tokens": 1})[0]
            assert status in (200, 503), status
            (admitted if status == 200 else refused).append(marker)
            return status == 200
        assert wait_for(serves, 30), r.log.read_text()
    # Nothing of a refused request reached Triton: none went through unmetered.
    seen = relay.seen()
    assert not any(m.encode() in seen for m in refused) and all(m.encode() in seen for m in admitted)
    assert all(call(r, "GET", "/v2/health/ready", "")[0] == 200 for r in replicas) and grpc_ready(replicas[0])

    # The window still holds the six from before the kill: RPM - 6 in all after it, then 429.
    statuses = [call(replicas[n % 3], "POST", GENERATE, key, {"text_input": "fill", "max_tokens": 1})[0]
                for n in range(RPM - before - len(admitted) + 3)]
    assert statuses == [200] * (RPM - before - len(admitted)) + [429] * 3, statuses
    assert [r.proc.pid for r in replicas] == pids and all(r.proc.poll() is None for r in replicas)
