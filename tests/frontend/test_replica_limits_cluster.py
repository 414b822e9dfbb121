"""Three `seekgate serve` replicas on one real Redis Cluster (redis+cluster://) in front of the real Triton.

The exactness tests of test_replica_limits.py, run again with `redis.url` naming a node of a
three-master cluster (tests/backends.PrivateRedisCluster) instead of one Redis.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.local.triton import TritonProcess
from tests.backends import PrivateRedisCluster
from tests.frontend.test_replica_limits import (  # noqa: F401 - collected here, on the cluster fixture below
    Cluster,
    running_cluster,
    test_concurrency_4_is_exact_across_three_replicas_and_a_freed_slot_serves_another,
    test_rpm_60_is_exact_across_three_replicas,
    test_the_daily_token_budget_is_exact_across_three_replicas_with_the_real_counts,
    test_tpm_50_is_exact_across_three_replicas_while_the_tokens_are_in_flight,
)


@pytest.fixture(scope="module")
def cluster(triton: TritonProcess, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    with running_cluster(triton, postgres_admin_url, tmp_path_factory.mktemp("replica-limits-cluster"), "closed",
                         redis=PrivateRedisCluster()) as c:
        assert c.redis.url.startswith("redis+cluster://")
        yield c
