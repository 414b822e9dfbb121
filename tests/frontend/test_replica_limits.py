"""Limits exact across three `seekgate serve` replicas on one PostgreSQL and one Redis, and Redis stopped under them.

The replicas are real processes (the test_replicas.py harness) in front of the real Triton, reached
through a TcpRelay so the test sees every byte that was forwarded. The Redis is a PrivateRedis of
this module alone: the last test stops it mid-traffic and starts it again on the same port, with
`limits.on_backend_down: closed`, and the replicas keep running throughout.

What each test shows:
- rpm, tpm, concurrency and the daily token budget are exact across the three: requests spread
  round robin over the replicas get exactly the limit admitted, no more, each replica admitting
  some and refusing some (the counters are shared, not one replica's).
- Requests stay in flight (holding their tokens, their concurrency slot) for as long as the test
  wants: the relay keeps a tagged request from Triton until the test releases it
  (`TcpRelay.hold_requests`), on that one upstream connection only, and by itself after a bound,
  so no test can hang on a hold it forgot.
- A replica killed with SIGKILL while it holds a concurrency slot gives the slot back within its
  lease (`redis.lease_s: 2` here), while the others keep serving without a failure.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc
from tritonclient.utils import InferenceServerException

from proxy.local.triton import TritonProcess
from tests.backends import PrivateRedis, PrivateRedisCluster, create_database, drop_database
from tests.frontend.test_replicas import PATH, Replica
from tests.gateway import wait_for
from tests.relay import RequestHold, TcpRelay, relays_to

GENERATE = "/v2/models/deepseek/generate"
LEASE_S = 2.0          # redis.lease_s of these replicas: a killed replica's slot is back this long after
HOLD_LIMIT_S = 45.0    # the longest the relay keeps a request from Triton if a test never releases it


@dataclass
class Cluster:
    replicas: list[Replica]
    relay: TcpRelay
    redis: PrivateRedis | PrivateRedisCluster
    store_url: str
    root: Path
    root_key: Path
    extra: dict[str, Any]
    triton: TritonProcess
    started: list[Replica] = field(default_factory=list)   # every replica started, stopped at the end

    def another_replica(self, name: str) -> Replica:
        """One more replica on the same store, Redis and relay, with the same config."""
        replica = Replica(self.root / name, self.triton, self.store_url, self.root_key, extra=self.extra)
        self.started.append(replica)
        assert wait_for(replica.ready, 90), replica.log.read_text()
        return replica


@contextmanager
def running_cluster(triton: TritonProcess, postgres_admin_url: str, root: Path, on_backend_down: str,
                    redis: PrivateRedis | PrivateRedisCluster | None = None) -> Iterator[Cluster]:
    """Three replicas on a fresh database, a PrivateRedis (or the Redis Cluster given) and a relay to
    Triton; all stopped at exit."""
    url = asyncio.run(create_database(postgres_admin_url))
    root_key = root / "root.key"
    root_key.write_bytes(secrets.token_bytes(32))
    os.chmod(root_key, 0o600)
    if redis is None:
        redis = PrivateRedis()
    redis.start()
    with relays_to(triton.launch.http_port) as (relay,):
        extra = {"upstream": {"http_url": f"http://127.0.0.1:{relay.port}",
                              "grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"},
                 "redis": {"url": redis.url, "timeout_s": 0.5, "lease_s": LEASE_S},
                 "limits": {"on_backend_down": on_backend_down}}
        started = [Replica(root / f"r{i}", triton, url, root_key, extra=extra) for i in range(3)]
        cluster = Cluster(list(started), relay, redis, url, root, root_key, extra, triton, started)
        try:
            for r in started:
                assert wait_for(r.ready, 90), r.log.read_text()
            yield cluster
        finally:
            for r in cluster.started:
                r.stop()
            redis.destroy()
            asyncio.run(drop_database(postgres_admin_url, url))


@pytest.fixture(scope="module")
def cluster(triton: TritonProcess, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    with running_cluster(triton, postgres_admin_url, tmp_path_factory.mktemp("replica-limits"), "closed") as c:
        yield c


def call(replica: Replica, method: str, path: str, key: str, body: Any = None, timeout: float = 60
         ) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: status, headers (lower-cased names), body."""
    conn = http.client.HTTPConnection("127.0.0.1", replica.http, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def grpc_ready(replica: Replica) -> bool:
    """KServe ServerReady through the replica's gRPC door (no key: a probe, like HTTP's)."""
    with tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{replica.grpc}") as client:
        try:
            return bool(client.is_server_ready())
        except InferenceServerException:
            return False


@dataclass
class Sent:
    """A generate request sent from a thread: held at the relay (in flight) or answered."""
    replica: int
    hold: RequestHold
    answer: Future[tuple[int, dict[str, str], bytes]]


class InFlight:
    """Generate requests kept in flight at the relay until released; every one is released at exit."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.sent: list[Sent] = []

    def send(self, replica: int, key: str, max_tokens: int = 1) -> Sent:
        tag = f"held-{uuid.uuid4().hex}"
        hold = self.cluster.relay.hold_requests(tag.encode(), limit_s=HOLD_LIMIT_S)
        answer = self.pool.submit(call, self.cluster.replicas[replica], "POST", GENERATE, key,
                                  {"text_input": tag, "max_tokens": max_tokens}, HOLD_LIMIT_S + 30)
        sent = Sent(replica, hold, answer)
        self.sent.append(sent)
        return sent

    @staticmethod
    def admitted(sent: Sent, timeout: float = 30) -> bool:
        """True once it is in flight (it reached the relay); False once it was answered without reaching it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sent.hold.held.is_set():
                return True
            if sent.answer.done():
                return sent.hold.held.is_set()
            time.sleep(0.01)
        raise AssertionError(f"a request to replica {sent.replica} was neither admitted nor answered in {timeout} s")

    def settle_all(self) -> None:
        for s in self.sent:
            s.hold.release()

    def __enter__(self) -> InFlight:
        return self

    def __exit__(self, *exc: object) -> None:
        self.settle_all()
        self.pool.shutdown(wait=True)   # bounded: every call has a socket timeout, every hold a limit


def refused(sent: Sent, limit: int) -> None:
    """`sent` was answered 429 naming `limit` (its only limit: the one that refused it)."""
    status, headers, body = sent.answer.result(timeout=30)
    assert status == 429 and headers["x-ratelimit-limit"] == str(limit), (status, headers, body)
    assert int(headers["retry-after"]) >= 1 and json.loads(body) == {"error": "rate limit exceeded"}, body


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


def tokens_used(body: bytes) -> int:
    """input + output tokens of a generate answer: what the limiter charges once the request settled."""
    doc = json.loads(body)

    def scalar(v: Any) -> int:
        while isinstance(v, list):
            v = v[0]
        return int(v)
    return scalar(doc["input_tokens"]) + scalar(doc["output_tokens"])


def test_tpm_50_is_exact_across_three_replicas_while_the_tokens_are_in_flight(cluster: Cluster) -> None:
    """Each request asks for 5 tokens and stays in flight, so its charge stays 5: exactly ten admitted."""
    _, key = cluster.replicas[0].gw.key(owner="tpm50", limits={"tpm": 50})
    with InFlight(cluster) as flight:
        # One after another, round robin: each is in flight or refused before the next is sent.
        admitted = [flight.admitted(flight.send(n % 3, key, max_tokens=5)) for n in range(14)]
        assert admitted == [True] * 10 + [False] * 4, admitted
        for sent in flight.sent[10:]:
            refused(sent, 50)
        # Shared, not one replica's: every replica admitted some (4, 3, 3) and refused some.
        assert sorted(s.replica for s in flight.sent[:10]) == [0] * 4 + [1] * 3 + [2] * 3
        assert {s.replica for s in flight.sent[10:]} == {0, 1, 2}
        flight.settle_all()
        for sent in flight.sent[:10]:
            status, _, body = sent.answer.result(timeout=60)
            assert status == 200 and tokens_used(body) > 0, (status, body)
    seen = cluster.relay.seen()
    assert not any(s.hold.tag in seen for s in flight.sent[10:])   # a refused one never reached Triton


def test_concurrency_4_is_exact_across_three_replicas_and_a_freed_slot_serves_another(cluster: Cluster) -> None:
    _, key = cluster.replicas[0].gw.key(owner="conc4", limits={"concurrency": 4})
    with InFlight(cluster) as flight:
        admitted = [flight.admitted(flight.send(n % 3, key)) for n in range(9)]
        assert admitted == [True] * 4 + [False] * 5, admitted   # r0 r1 r2 r0 in flight; each replica refuses
        for sent in flight.sent[4:]:
            refused(sent, 4)
        assert {s.replica for s in flight.sent[4:]} == {0, 1, 2}

        # Replica 1's request ends: its slot is taken through replica 2 (its lease freed in Redis at settle).
        flight.sent[1].hold.release()
        assert flight.sent[1].answer.result(timeout=60)[0] == 200
        assert wait_for(lambda: flight.admitted(flight.send(2, key)), 10)
        again = flight.send(0, key)   # and the four are in flight again: full
        assert not flight.admitted(again)
        refused(again, 4)
        flight.settle_all()
        assert all(s.answer.result(timeout=60)[0] in (200, 429) for s in flight.sent)
        assert sum(s.hold.held.is_set() for s in flight.sent) == 5

    # A burst: twelve at once, four to each replica, racing for five slots. Exactly five win.
    _, key = cluster.replicas[0].gw.key(owner="conc5", limits={"concurrency": 5})
    with InFlight(cluster) as flight:
        burst = [flight.send(n % 3, key) for n in range(12)]
        assert wait_for(lambda: all(s.hold.held.is_set() or s.answer.done() for s in burst), 30)
        winners = [s for s in burst if s.hold.held.is_set()]
        assert len(winners) == 5, [(s.replica, s.hold.held.is_set()) for s in burst]
        for sent in burst:
            if sent not in winners:
                refused(sent, 5)
        # At most four per replica, so the five came through two replicas at least, the seven refusals likewise.
        assert len({s.replica for s in winners}) >= 2
        assert len({s.replica for s in burst if s not in winners}) >= 2
        flight.settle_all()
        assert all(s.answer.result(timeout=60)[0] == 200 for s in winners)


def test_the_daily_token_budget_is_exact_across_three_replicas_with_the_real_counts(cluster: Cluster) -> None:
    """Spent round robin, corrected at settle to the real counts Triton reported, refused one token over."""
    daily = 300
    _, key = cluster.replicas[0].gw.key(owner="daily", limits={"daily_tokens": daily})

    def generate(n: int, max_tokens: int) -> tuple[int, dict[str, str], bytes]:
        return call(cluster.replicas[n % 3], "POST", GENERATE, key, {"text_input": f"day {n}", "max_tokens": max_tokens})

    def left_everywhere(expected: int) -> bool:
        """Each replica refuses a request over the whole budget and says how much is left: `expected`?"""
        left = []
        for n in range(3):
            status, headers, body = generate(n, daily + 1)   # over any budget left: refused, charges nothing
            assert status == 429 and headers["x-ratelimit-limit"] == str(daily), (status, headers, body)
            left.append(int(headers["x-ratelimit-remaining"]))
        return left == [expected] * 3

    used, n = 0, 0
    while daily - used > 40:   # at most ~30 a request (a short prompt + 8): it never overshoots
        status, _, body = generate(n, 8)
        assert status == 200, body
        used += tokens_used(body)
        n += 1
    assert n >= 3   # every replica spent some
    # Settlements land just after the answers: then every replica sees the same budget left.
    assert wait_for(lambda: left_everywhere(daily - used), 10)

    rest = daily - used
    for m in range(3):   # one token over what is left: refused by every replica
        status, headers, _ = generate(n + m, rest + 1)
        assert status == 429 and headers["x-ratelimit-remaining"] == str(rest), (status, headers)
    status, _, body = generate(n + 1, rest)   # exactly what is left: admitted
    assert status == 200, body
    used += tokens_used(body)
    assert wait_for(lambda: left_everywhere(max(0, daily - used)), 10)
    for m in range(3):   # and from now on nothing more than is left, on any replica
        status, headers, _ = generate(m, max(0, daily - used) + 1)
        assert status == 429, (status, headers)


def test_a_replica_killed_holding_a_concurrency_slot_gives_it_back_within_its_lease(cluster: Cluster) -> None:
    replicas, relay = cluster.replicas, cluster.relay
    victim = cluster.another_replica("victim")
    _, key = replicas[0].gw.key(owner="lease", limits={"concurrency": 1})
    _, busy = replicas[0].gw.key(owner="busy", limits={"concurrency": 8, "rpm": 100_000})
    failures: list[tuple[int, int | str]] = []
    served = [0]
    stop = threading.Event()

    def traffic() -> None:   # the other replicas serve limited requests throughout, and fail none
        n = 0
        while not stop.is_set():
            try:
                status: int | str = call(replicas[n % 3], "POST", GENERATE, busy,
                                         {"text_input": "busy", "max_tokens": 1}, timeout=30)[0]
            except (OSError, http.client.HTTPException) as exc:
                status = repr(exc)
            if status == 200:
                served[0] += 1
            else:
                failures.append((n % 3, status))
            n += 1

    def slot_held_everywhere() -> None:
        for r in replicas:
            status, headers, _ = call(r, "POST", GENERATE, key, {"text_input": "wait", "max_tokens": 1})
            assert status == 429 and headers["x-ratelimit-limit"] == "1", (status, headers)

    tag = f"victim-{uuid.uuid4().hex}"
    hold = relay.hold_requests(tag.encode(), limit_s=HOLD_LIMIT_S)
    pool = ThreadPoolExecutor(max_workers=1)
    background = threading.Thread(target=traffic, daemon=True)
    background.start()
    try:
        in_flight = pool.submit(call, victim, "POST", GENERATE, key, {"text_input": tag, "max_tokens": 1}, 60)
        assert hold.held.wait(30), victim.log.read_text()
        slot_held_everywhere()
        time.sleep(LEASE_S * 1.5)   # past one lease: the victim renews it while the request runs
        slot_held_everywhere()

        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.proc.wait(10)
        back_after = None
        n = 0
        while time.monotonic() - killed < LEASE_S + 5:
            status, headers, body = call(replicas[n % 3], "POST", GENERATE, key, {"text_input": "after", "max_tokens": 1})
            if status == 200:
                back_after = time.monotonic() - killed
                break
            assert status == 429 and headers["x-ratelimit-limit"] == "1", (status, headers, body)
            n += 1
            time.sleep(0.05)
        print(f"slot of the killed replica back after {back_after} s (lease {LEASE_S} s)")
        assert back_after is not None and back_after <= LEASE_S + 1.5, back_after
        # The killed replica's client got no answer: its connection died with it.
        assert isinstance(in_flight.exception(timeout=30), (OSError, http.client.HTTPException))
    finally:
        stop.set()
        hold.release()
        background.join(60)
        pool.shutdown(wait=True)
    assert not background.is_alive()
    assert served[0] > 0 and failures == [], (served, failures)


def test_redis_stopped_mid_traffic_fails_closed_and_recovers_without_a_restart(cluster: Cluster) -> None:
    replicas, relay, redis = cluster.replicas, cluster.relay, cluster.redis
    _, key = replicas[0].gw.key(owner="outage", limits={"rpm": 100_000})
    pids = [r.proc.pid for r in replicas]
    body = {"text_input": "before", "max_tokens": 1}
    for r in replicas:   # traffic first: every replica is admitting through Redis
        assert call(r, "POST", "/v2/models/deepseek/generate", key, body)[0] == 200

    assert all(call(r, "GET", "/v2/health/ready", "")[0] == 200 for r in replicas) and grpc_ready(replicas[0])
    redis.stop()
    markers = [f"outage-{uuid.uuid4().hex}" for _ in range(6)]
    for n, marker in enumerate(markers):
        status, headers, answer = call(replicas[n % 3], "POST", "/v2/models/deepseek/generate", key,
                                       {"text_input": marker, "max_tokens": 1})
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, answer)
    # Nothing of a refused request reached Triton: no unmetered request went through.
    seen = relay.seen()
    assert not any(m.encode() in seen for m in markers)
    # Readiness fails meanwhile (HTTP and gRPC), so a load balancer drains replicas that refuse everything.
    for r in replicas:
        status, headers, answer = call(r, "GET", "/v2/health/ready", "")
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, answer)
    assert not grpc_ready(replicas[0])

    redis.start()   # the same port, empty: the replicas find it again on their own
    after = f"after-{uuid.uuid4().hex}"
    for r in replicas:
        assert wait_for(lambda r=r: call(r, "POST", "/v2/models/deepseek/generate", key,
                                         {"text_input": after, "max_tokens": 1})[0] == 200, 30), r.log.read_text()
    assert after.encode() in relay.seen()
    assert all(call(r, "GET", "/v2/health/ready", "")[0] == 200 for r in replicas) and grpc_ready(replicas[0])
    assert [r.proc.pid for r in replicas] == pids and all(r.proc.poll() is None for r in replicas)
