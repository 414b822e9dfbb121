"""A private PostgreSQL stopped under a serving replica: cached keys last their TTL, the rest get 503, nothing is lost.

The replica is a real `seekgate serve` process in front of the real Triton; the server is a
PrivatePostgres of this test alone, stopped and started again while seekgate keeps running.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy.local.triton import TritonProcess
from tests.backends import PrivatePostgres
from tests.frontend.test_replicas import PATH, Replica
from tests.gateway import wait_for

TTL_S = 4.0


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


def jsonl_records(data_dir: Path, key_id: str) -> list[dict[str, object]]:
    lines = (data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("key_id") == key_id]


def test_a_stopped_store_fails_closed_and_recovers_without_a_restart(
        triton: TritonProcess, private_pg: PrivatePostgres, tmp_path: Path) -> None:
    root_key = tmp_path / "root.key"
    root_key.write_bytes(secrets.token_bytes(32))
    os.chmod(root_key, 0o600)
    replica = Replica(tmp_path / "r0", triton, private_pg.url, root_key,
                      extra={"auth": {"key_cache_ttl_s": TTL_S}})
    try:
        assert wait_for(replica.ready, 90), replica.log.read_text()
        cached_id, cached = replica.gw.key(owner="cached")
        uncached_id, uncached = replica.gw.key(owner="uncached")
        assert replica.request("GET", PATH, cached)[0] == 200   # verified now: cached for TTL_S
        warmed = time.monotonic()
        pid = replica.proc.pid

        private_pg.stop()
        assert wait_for(lambda: replica.request("GET", "/v2/health/ready")[0] == 503, 5)
        # Within its TTL a cached key still works; an uncached one cannot be checked: 503 + Retry-After.
        served_in_outage = 0
        while time.monotonic() - warmed < TTL_S - 1.0:
            status, body = replica.request("GET", PATH, cached)
            assert status == 200, body
            served_in_outage += 1
        conn = http.client.HTTPConnection("127.0.0.1", replica.http, timeout=30)
        conn.request("GET", PATH, headers={"Authorization": f"Bearer {uncached}"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 503 and resp.getheader("Retry-After"), (resp.status, body)
        conn.close()
        # Past its TTL the cached key is refused too (it cannot be re-checked): never forwarded unchecked.
        answers: list[int] = []
        assert wait_for(lambda: answers.append(replica.request("GET", PATH, cached)[0]) or answers[-1] == 503,
                        TTL_S + 5)
        assert set(answers) <= {200, 503}, answers
        served_in_outage += answers.count(200)

        private_pg.start()
        assert wait_for(lambda: replica.request("GET", "/v2/health/ready")[0] == 200, 30)
        assert replica.request("GET", PATH, uncached)[0] == 200
        assert replica.request("GET", PATH, cached)[0] == 200
        assert replica.proc.pid == pid and replica.proc.poll() is None   # recovered in place

        # No record lost: the JSONL file holds every served request, and the shared index catches up.
        def served() -> int:   # the writer batches: the last request's line lands a moment after its answer
            return sum(r["status"] == "allowed" for r in jsonl_records(replica.gw.data_dir, cached_id))
        assert wait_for(lambda: served() == 1 + served_in_outage + 1, 10), (served(), served_in_outage)
        # The refusal is audited too (no principal: the key could not be checked).
        lines = (replica.gw.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
        assert any(r["http_status"] == 503 and str(r["reason"]).startswith("store_unavailable")
                   for r in map(json.loads, lines)), "the refusal in the outage is audited"

        async def indexed(key_id: str) -> int:
            conn = await asyncpg.connect(private_pg.url)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM audit_events WHERE key_id = $1", key_id))
            finally:
                await conn.close()
        want = len(jsonl_records(replica.gw.data_dir, cached_id))
        assert wait_for(lambda: asyncio.run(indexed(cached_id)) == want, 30), (asyncio.run(indexed(cached_id)), want)
    finally:
        replica.stop()
