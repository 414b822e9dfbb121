"""The shared limiter as seekgate's start-up wires it (http.choose_limiter): a settlement it drops shows in /metrics.

A real seekgate in front of the real Triton, its limits counted in a PrivateRedis of this module
(`redis.url`). The limiter's own tests call its callbacks directly; only a running seekgate shows
that choose_limiter hands them to the metrics a scrape reads.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
import redis

from tests.backends import PrivateRedis
from tests.gateway import Gateway, gateway_via, metric, wait_for
from tests.relay import TcpRelay

GENERATE = "/v2/models/deepseek/generate"
PREFIX = "seekgate-test:wiring:"
DROPPED = "seekgate_limits_settlements_dropped_total"


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def gw(relays: tuple[TcpRelay, TcpRelay], private_redis: PrivateRedis,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    overrides = {"redis.url": private_redis.url, "redis.key_prefix": PREFIX}
    with gateway_via(tmp_path_factory.mktemp("gw-shared-limiter"), *relays, **overrides) as g:
        yield g


def test_a_settlement_redis_fails_is_counted_in_metrics(gw: Gateway, private_redis: PrivateRedis,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The key's concurrency-lease key holds a string (a stray write, a key of another tool): admitting it
    (a tpm limit alone) never reads that key, settling it does, and Redis fails that settlement alone. The
    request is served; the correction of its charge is dropped, logged and counted as redis_error."""
    key_id, token = gw.key(owner="wiring", limits={"tpm": 100_000})
    with redis.Redis.from_url(private_redis.url) as r:
        r.set(f"{PREFIX}{key_id}:c", "not a sorted set")
    assert metric(gw, DROPPED, reason="redis_error") == 0   # its series is there from the start, at 0

    request = urllib.request.Request(
        gw.url + GENERATE, data=json.dumps({"text_input": "wiring", "max_tokens": 8}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:   # served, whatever its settlement does
        assert answer.status == 200
        assert json.loads(answer.read())["text_output"]

    # The estimate (the prompt's bound plus max_tokens) is corrected to the real count at settle.
    assert wait_for(lambda: metric(gw, DROPPED, reason="redis_error") == 1, 10), metric(gw, DROPPED)
    assert metric(gw, DROPPED) == 1   # that reason alone
    assert any("Redis failed a settlement" in r.getMessage() and "WRONGTYPE" in r.getMessage()
               for r in caplog.records if r.name == "seekgate.limits"), [r.getMessage() for r in caplog.records]
