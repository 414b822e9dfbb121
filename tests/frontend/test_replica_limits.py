"""Limits exact across three `seekgate serve` replicas on one PostgreSQL and one Redis, and Redis stopped under them.

The replicas are real processes (the test_replicas.py harness) in front of the real Triton, reached
through a TcpRelay so the test sees every byte that was forwarded. The Redis is a PrivateRedis of
this module alone: the last test stops it mid-traffic and starts it again on the same port, with
`limits.on_backend_down: closed`, and the replicas keep running throughout.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.local.triton import TritonProcess
from tests.backends import PrivateRedis, create_database, drop_database
from tests.frontend.test_replicas import PATH, Replica
from tests.gateway import wait_for
from tests.relay import TcpRelay, relays_to


class Cluster:
    def __init__(self, replicas: list[Replica], relay: TcpRelay, redis: PrivateRedis) -> None:
        self.replicas, self.relay, self.redis = replicas, relay, redis


@pytest.fixture(scope="module")
def cluster(triton: TritonProcess, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    url = asyncio.run(create_database(postgres_admin_url))
    root = tmp_path_factory.mktemp("replica-limits")
    root_key = root / "root.key"
    root_key.write_bytes(secrets.token_bytes(32))
    os.chmod(root_key, 0o600)
    redis = PrivateRedis()
    redis.start()
    with relays_to(triton.launch.http_port) as (relay,):
        extra = {"upstream": {"http_url": f"http://127.0.0.1:{relay.port}",
                              "grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"},
                 "redis": {"url": redis.url, "timeout_s": 0.5},
                 "limits": {"on_backend_down": "closed"}}
        started = [Replica(root / f"r{i}", triton, url, root_key, extra=extra) for i in range(3)]
        try:
            for r in started:
                assert wait_for(r.ready, 90), r.log.read_text()
            yield Cluster(started, relay, redis)
        finally:
            for r in started:
                r.stop()
            redis.destroy()
            asyncio.run(drop_database(postgres_admin_url, url))


def call(replica: Replica, method: str, path: str, key: str, body: Any = None
         ) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: status, headers (lower-cased names), body."""
    conn = http.client.HTTPConnection("127.0.0.1", replica.http, timeout=60)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_rpm_60_is_exact_across_three_replicas(cluster: Cluster) -> None:
    replicas = cluster.replicas
    _, key = replicas[0].gw.key(owner="rpm60", limits={"rpm": 60})
    answers = [call(replicas[n % 3], "GET", PATH, key) for n in range(75)]   # well inside one minute
    statuses = [a[0] for a in answers]
    assert statuses.count(200) == 60 and statuses.count(429) == 15, statuses
    # Admitted first, refused after: no replica let one through once the shared window was full.
    assert statuses == [200] * 60 + [429] * 15, statuses
    for _, headers, body in answers[60:]:
        assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit"] == "60", headers
        assert json.loads(body) == {"error": "rate limit exceeded"}, body


def test_redis_stopped_mid_traffic_fails_closed_and_recovers_without_a_restart(cluster: Cluster) -> None:
    replicas, relay, redis = cluster.replicas, cluster.relay, cluster.redis
    _, key = replicas[0].gw.key(owner="outage", limits={"rpm": 100_000})
    pids = [r.proc.pid for r in replicas]
    body = {"text_input": "before", "max_tokens": 1}
    for r in replicas:   # traffic first: every replica is admitting through Redis
        assert call(r, "POST", "/v2/models/deepseek/generate", key, body)[0] == 200

    redis.stop()
    markers = [f"outage-{uuid.uuid4().hex}" for _ in range(6)]
    for n, marker in enumerate(markers):
        status, headers, answer = call(replicas[n % 3], "POST", "/v2/models/deepseek/generate", key,
                                       {"text_input": marker, "max_tokens": 1})
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, answer)
    # Nothing of a refused request reached Triton: no unmetered request went through.
    seen = relay.seen()
    assert not any(m.encode() in seen for m in markers)

    redis.start()   # the same port, empty: the replicas find it again on their own
    after = f"after-{uuid.uuid4().hex}"
    for r in replicas:
        assert wait_for(lambda r=r: call(r, "POST", "/v2/models/deepseek/generate", key,
                                         {"text_input": after, "max_tokens": 1})[0] == 200, 30), r.log.read_text()
    assert after.encode() in relay.seen()
    assert [r.proc.pid for r in replicas] == pids and all(r.proc.poll() is None for r in replicas)
