"""Tests for proxy.audit: record shape, durability, rotation, retention, failures, queries."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import jsonl as audit_file
from proxy.audit import writer as audit
from proxy.audit.writer import FIELDS, AuditWriter, build_record, query_audit, tail_audit
from proxy.context import Principal, RequestContext, Resource

SECRET = "sk-seekgate-THIS-IS-A-SECRET"


def _ctx(**kw: Any) -> RequestContext:
    ctx = RequestContext(request_id="req-1", client_ip="10.0.0.7", protocol="http",
                         method="POST", path="/v2/models/deepseek/generate",
                         started_wall=1_700_000_000.1234)
    ctx.principal = Principal(key_id="k_app1", tier="app", owner="team-a")
    ctx.resource = Resource(resource="model:deepseek", action="infer", model="deepseek")
    ctx.http_status, ctx.upstream_ms, ctx.input_tokens, ctx.output_tokens = 200, 12.34567, 5, 7
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def _rec(i: int, **kw: Any) -> dict[str, Any]:
    rec = build_record(_ctx(request_id=f"req-{i}"), duration_ms=1.0)
    rec.update(kw)
    return rec


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]


def test_record_has_exactly_the_schema_fields() -> None:
    ctx = _ctx(path="/v2/models/deepseek/generate?api_key=" + SECRET,
               extra={"authorization": "Bearer " + SECRET})
    rec = build_record(ctx, duration_ms=3.14159)
    assert tuple(rec) == tuple(f for f in FIELDS if f not in ("openai", "admin"))   # only some records have these
    assert rec["timestamp"] == "2023-11-14T22:13:20.123Z"
    assert len(rec["event_id"]) == 32 and int(rec["event_id"], 16) >= 0
    assert (rec["actor"], rec["key_id"], rec["tier"]) == ("team-a", "k_app1", "app")
    assert (rec["action"], rec["resource"], rec["model"]) == ("infer", "model:deepseek", "deepseek")
    assert (rec["status"], rec["http_status"], rec["client_ip"]) == ("allowed", 200, "10.0.0.7")
    assert (rec["duration_ms"], rec["upstream_ms"]) == (3.142, 12.346)
    assert (rec["input_tokens"], rec["output_tokens"]) == (5, 7)
    assert (rec["protocol"], rec["method"], rec["path"]) == ("http", "POST",
                                                              "/v2/models/deepseek/generate")
    assert SECRET not in json.dumps(rec)
    assert build_record(ctx)["event_id"] != rec["event_id"]


def test_record_for_unauthenticated_request_has_null_actor() -> None:
    ctx = _ctx(principal=None, resource=None, status="denied", http_status=401,
               reason="unknown_key", upstream_ms=None, input_tokens=None, output_tokens=None)
    rec = build_record(ctx)
    assert rec["actor"] is rec["key_id"] is rec["tier"] is rec["model"] is None
    assert rec["upstream_ms"] is None and rec["reason"] == "unknown_key"
    assert isinstance(rec["duration_ms"], float) and rec["duration_ms"] >= 0


async def test_thousand_submits_all_written(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path, batch_size=64)
    await writer.start()
    for i in range(1000):
        writer.submit(_rec(i))
    assert writer.queue_depth() > 0
    await writer.close()
    lines = _lines(tmp_path / "audit" / "audit.jsonl")
    assert [r["request_id"] for r in lines] == [f"req-{i}" for i in range(1000)]
    assert _rows(tmp_path / "audit" / "audit.db") == 1000
    assert writer.queue_depth() == 0
    with sqlite3.connect(tmp_path / "audit" / "audit.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"audit_ts", "audit_actor", "audit_key_id"} <= indexes


async def test_submit_before_start_and_after_close(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path)
    writer.submit(_rec(0))  # queued, written once started
    await writer.start()
    await writer.close()
    writer.submit(_rec(1))  # must not raise
    assert len(_lines(tmp_path / "audit" / "audit.jsonl")) == 1


async def test_rotation_by_size(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path, max_bytes=4096, batch_size=8)
    await writer.start()
    now = datetime.now(timezone.utc).isoformat()   # within retention, which a file's newest record decides
    for i in range(100):
        writer.submit(_rec(i, timestamp=now))
    await writer.close()
    audit_dir = tmp_path / "audit"
    rotated = audit.rotated_files(audit_dir)
    assert rotated, "expected at least one rotated file"
    for path in [*rotated, audit_dir / "audit.jsonl"]:
        assert path.stat().st_size <= 4096
        assert path.name == "audit.jsonl" or path.name.startswith("audit-2")
    everything = [r for p in [*rotated, audit_dir / "audit.jsonl"] for r in _lines(p)]
    assert [r["request_id"] for r in everything] == [f"req-{i}" for i in range(100)]
    assert [r["request_id"] for r in tail_audit(tmp_path, 30)] == \
        [f"req-{i}" for i in range(70, 100)]


async def test_retention_deletes_old_files_and_rows(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    old = audit_dir / "audit-20000101T000000.000000Z.jsonl"
    fresh_stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    fresh = audit_dir / f"audit-{fresh_stamp}.jsonl"
    old.write_text("{}\n")
    fresh.write_text("{}\n")
    writer = AuditWriter(tmp_path, retention_days=30)
    await writer.start()  # retention runs at start
    assert not old.exists() and fresh.exists()
    writer.submit(_rec(1, timestamp="2000-01-01T00:00:00.000Z"))
    writer.submit(_rec(2, timestamp=datetime.now(timezone.utc).isoformat()))
    await writer.close()
    assert _rows(audit_dir / "audit.db") == 2
    async with AuditWriter(tmp_path, retention_days=30) as again:
        await again.prune()
    assert [r["request_id"] for r in await query_audit(tmp_path)] == ["req-2"]


async def test_file_write_failure_retries_and_reports(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = audit_file._write_all
    failures = {"left": 3}

    def flaky(fd: int, data: bytes) -> None:
        if failures["left"]:
            failures["left"] -= 1
            os.write(fd, data[: len(data) // 2])  # a torn write, as on a full disk
            raise OSError(28, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(audit_file, "_write_all", flaky)
    errors: list[int] = []
    writer = AuditWriter(tmp_path, on_error=lambda: errors.append(1), retry_base_s=0.005)
    await writer.start()
    for i in range(50):
        writer.submit(_rec(i))
    await writer.close()
    assert len(errors) == 3
    lines = _lines(tmp_path / "audit" / "audit.jsonl")  # no torn line left behind
    assert sorted(r["request_id"] for r in lines) == sorted(f"req-{i}" for i in range(50))
    assert _rows(tmp_path / "audit" / "audit.db") == 50


async def test_db_write_failure_retries_without_duplicating_lines(tmp_path: Path) -> None:
    errors: list[int] = []
    writer = AuditWriter(tmp_path, on_error=lambda: errors.append(1), retry_base_s=0.005)
    await writer.start()
    real_insert = writer._insert_rows
    failures = {"left": 2}

    async def flaky(batch: list[dict[str, Any]]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        await real_insert(batch)

    writer._insert_rows = flaky  # type: ignore[method-assign]
    for i in range(20):
        writer.submit(_rec(i))
    await writer.close()
    assert len(errors) == 2
    assert len(_lines(tmp_path / "audit" / "audit.jsonl")) == 20
    assert _rows(tmp_path / "audit" / "audit.db") == 20


async def test_a_locked_audit_db_never_holds_records_out_of_audit_jsonl(tmp_path: Path) -> None:
    """Another process holding audit.db's write lock (sqlite3 in a transaction, a backup) used to stall
    the writer on the index: strict requests hung, neither served nor refused."""
    writer = AuditWriter(tmp_path, durability="strict", retry_base_s=0.01, retry_max_s=0.05)
    await writer.start()
    await writer.submit_durable(_rec(1))
    await writer.flush()   # req-1 indexed before the lock is taken
    other = sqlite3.connect(tmp_path / "audit" / "audit.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")   # a real lock, as another process takes it
    try:
        async with asyncio.timeout(30):   # a hang guard, not a timing assertion
            for i in range(2, 6):
                await writer.submit_durable(_rec(i))
        assert writer.healthy
        assert [r["request_id"] for r in _lines(tmp_path / "audit" / "audit.jsonl")] == \
            [f"req-{i}" for i in range(1, 6)]
        assert _rows(tmp_path / "audit" / "audit.db") == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    await writer.flush()   # the held rows are indexed once the lock is gone
    assert _rows(tmp_path / "audit" / "audit.db") == 5
    await writer.close()


async def test_a_writer_starts_and_writes_while_another_process_holds_audit_db(tmp_path: Path) -> None:
    """A start re-indexes the file's tail and applies retention to audit.db: a lock held by another
    process (sqlite3 left in a transaction) must not stop seekgate from starting."""
    async with AuditWriter(tmp_path) as writer:
        writer.submit(_rec(1))
    other = sqlite3.connect(tmp_path / "audit" / "audit.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        writer = AuditWriter(tmp_path, durability="strict", retry_base_s=0.01, retry_max_s=0.05)
        await writer.start()
        async with asyncio.timeout(30):   # a hang guard, not a timing assertion
            await writer.submit_durable(_rec(2))
    finally:
        other.execute("ROLLBACK")
        other.close()
    await writer.flush()
    await writer.close()
    assert _rows(tmp_path / "audit" / "audit.db") == 2
    assert [r["request_id"] for r in _lines(tmp_path / "audit" / "audit.jsonl")] == ["req-1", "req-2"]


async def test_close_gives_up_after_timeout_without_hanging(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    def broken(fd: int, data: bytes) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit_file, "_write_all", broken)
    writer = AuditWriter(tmp_path, retry_base_s=0.01, retry_max_s=0.01)
    await writer.start()
    writer.submit(_rec(0))
    writer.submit(_rec(1))
    await writer.close(timeout=0.1)
    assert "could not persist 2 records" in caplog.text
    assert "req-1" in caplog.text  # the record itself survives in the log


async def test_query_filters(tmp_path: Path) -> None:
    base = float(int(time.time()) - 100)  # whole seconds: datetime keeps only microseconds
    writer = AuditWriter(tmp_path)
    await writer.start()
    for i in range(10):
        stamp = datetime.fromtimestamp(base + i, timezone.utc).isoformat()
        writer.submit(_rec(i, timestamp=stamp, actor="alice" if i % 2 else "bob",
                           key_id=f"k{i % 3}", status="denied" if i >= 7 else "allowed"))
    await writer.close()

    def ids(rows: list[dict[str, Any]]) -> list[str]:
        return [r["request_id"] for r in rows]

    assert ids(await query_audit(tmp_path)) == [f"req-{i}" for i in range(9, -1, -1)]
    assert ids(await query_audit(tmp_path, actor="alice")) == ["req-9", "req-7", "req-5",
                                                              "req-3", "req-1"]
    assert ids(await query_audit(tmp_path, key_id="k0")) == ["req-9", "req-6", "req-3", "req-0"]
    assert ids(await query_audit(tmp_path, status="denied")) == ["req-9", "req-8", "req-7"]
    assert ids(await query_audit(tmp_path, since=base + 3, until=base + 6)) == \
        ["req-5", "req-4", "req-3"]
    assert ids(await query_audit(tmp_path, actor="bob", status="allowed", limit=2)) == \
        ["req-6", "req-4"]
    row = (await query_audit(tmp_path, limit=1))[0]
    assert tuple(row) == FIELDS and row["http_status"] == 200 and row["upstream_ms"] == 12.346
    assert await query_audit(tmp_path / "nowhere") == []


async def test_an_audit_db_without_parent_key_ids_still_opens_and_gains_the_column(tmp_path: Path) -> None:
    """An audit.db made before the ancestry field: read as it is, then migrated by the writer."""
    (tmp_path / "audit").mkdir()
    db_path = tmp_path / "audit" / "audit.db"
    old_fields = [f for f in FIELDS if f not in ("parent_key_ids", "openai", "admin")]
    old = _rec(0)
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"CREATE TABLE audit (ts REAL NOT NULL, {', '.join(old_fields)})")
        conn.execute(f"INSERT INTO audit VALUES ({', '.join('?' * (len(old_fields) + 1))})",
                     (time.time() - 10, *[old[f] for f in old_fields]))
    # Read-only, before any writer opened it: the missing column reads as None.
    rows = await query_audit(tmp_path)
    assert [r["request_id"] for r in rows] == ["req-0"] and rows[0]["parent_key_ids"] is None
    assert await query_audit(tmp_path, ancestor="k_app1") == []

    session = Principal(key_id="a" * 32, tier="session", owner="team-a", parents=("k_app1",))
    async with AuditWriter(tmp_path) as writer:
        writer.submit(build_record(_ctx(request_id="req-1", principal=session, started_wall=time.time()),
                                   duration_ms=1.0))
    with sqlite3.connect(db_path) as conn:
        assert "parent_key_ids" in {r[1] for r in conn.execute("PRAGMA table_info(audit)")}
    under = await query_audit(tmp_path, ancestor="k_app1")
    assert [(r["request_id"], r["parent_key_ids"]) for r in under] == [("req-1", ["k_app1"])]
    assert [r["request_id"] for r in await query_audit(tmp_path)] == ["req-1", "req-0"]


async def test_an_audit_db_without_openai_gains_the_column_and_filters_by_api_and_endpoint(tmp_path: Path) -> None:
    """The OpenAI field is indexed (a JSON column added to an older audit.db as parent_key_ids was)."""
    (tmp_path / "audit").mkdir()
    db_path = tmp_path / "audit" / "audit.db"
    old_fields = [f for f in FIELDS if f not in ("openai", "admin")]
    old = _rec(0)
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"CREATE TABLE audit (ts REAL NOT NULL, {', '.join(old_fields)})")
        conn.execute(f"INSERT INTO audit VALUES ({', '.join('?' * (len(old_fields) + 1))})",
                     (time.time() - 10, *[json.dumps(old[f]) if isinstance(old[f], list) else old[f]
                                          for f in old_fields]))
    assert (await query_audit(tmp_path))[0]["openai"] is None
    assert await query_audit(tmp_path, endpoint="/v1/completions") == []   # read-only: no column yet, no match

    now = time.time()
    async with AuditWriter(tmp_path) as writer:
        for i, endpoint in enumerate(("/v1/chat/completions", "/v1/completions")):
            writer.submit(build_record(_ctx(request_id=f"req-oa{i}", protocol="openai", started_wall=now + i,
                                            extra={"openai": {"endpoint": endpoint, "user": "u-7"}}),
                                       duration_ms=1.0))
        writer.submit(build_record(_ctx(request_id="req-kserve", started_wall=now + 2), duration_ms=1.0))
    with sqlite3.connect(db_path) as conn:
        assert "openai" in {r[1] for r in conn.execute("PRAGMA table_info(audit)")}
    (chat,) = await query_audit(tmp_path, endpoint="/v1/chat/completions")
    assert (chat["request_id"], chat["protocol"], chat["openai"]) == (
        "req-oa0", "openai", {"endpoint": "/v1/chat/completions", "user": "u-7"})
    assert [r["request_id"] for r in await query_audit(tmp_path, protocol="openai")] == ["req-oa1", "req-oa0"]
    assert [r["request_id"] for r in await query_audit(tmp_path, protocol="http")] == ["req-kserve", "req-0"]
    assert (await query_audit(tmp_path, protocol="http"))[0]["openai"] is None


def test_tail_reads_last_lines(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    (audit_dir / "audit.jsonl").write_text("".join(json.dumps({"n": i}) + "\n"
                                                   for i in range(5000)))
    assert [r["n"] for r in tail_audit(tmp_path, 3)] == [4997, 4998, 4999]
    assert len(tail_audit(tmp_path, 10_000)) == 5000
    assert tail_audit(tmp_path, 0) == []
    assert tail_audit(tmp_path / "nowhere", 5) == []


# -- durability: strict group commit, batched fsync window, torn lines, crash recovery -----------

async def test_strict_group_commit_resolves_after_one_shared_fsync(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    writer = AuditWriter(tmp_path, durability="strict")
    await writer.start()
    monkeypatch.setattr(os, "fsync", counting)
    futures = [writer.submit_durable(_rec(i)) for i in range(200)]
    await asyncio.gather(*futures)
    # Every record is on disk the moment its future resolves, before close() flushes anything.
    assert len(_lines(tmp_path / "audit" / "audit.jsonl")) == 200
    assert 1 <= len(fsyncs) < 20   # 200 concurrent records share a handful of fsyncs, not one each
    await writer.close()


async def test_batched_fsyncs_an_idle_file_within_the_window(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    fsyncs: list[float] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        fsyncs.append(time.monotonic())
        real_fsync(fd)

    writer = AuditWriter(tmp_path, fsync_interval_s=0.1)
    await writer.start()
    monkeypatch.setattr(os, "fsync", counting)
    await asyncio.sleep(0.15)   # start-up settled: the fsyncs counted below are the window's
    fsyncs.clear()
    written = time.monotonic()
    writer.submit(_rec(1))
    await asyncio.sleep(0.03)
    writer.submit(_rec(2))      # lands inside the window: written, not yet synced
    await asyncio.sleep(0.25)   # no further traffic: the timer alone must sync it
    assert fsyncs and fsyncs[0] - written <= 0.1 + 0.05
    assert len(fsyncs) <= 2     # ... and a quiet file is not synced again and again
    await writer.close()


async def test_batched_linger_gathers_a_trickle_into_one_write_and_strict_never_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    writes: list[int] = []
    real_append = audit_file.JsonlFile.append

    def counting(self: audit_file.JsonlFile, lines: list[bytes], fsync: bool) -> None:
        writes.append(len(lines))
        real_append(self, lines, fsync=fsync)

    monkeypatch.setattr(audit_file.JsonlFile, "append", counting)
    writer = AuditWriter(tmp_path / "batched", batch_linger_s=0.08)
    await writer.start()
    for i in range(5):   # one record every 5 ms, as a single client at a time sends them
        writer.submit(_rec(i))
        await asyncio.sleep(0.005)
    await writer.flush()
    assert writes == [5]   # one write for the trickle, not one per record
    await writer.close()

    writes.clear()
    strict = AuditWriter(tmp_path / "strict", durability="strict", batch_linger_s=0.5)
    await strict.start()
    started = time.monotonic()
    await strict.submit_durable(_rec(1))
    assert time.monotonic() - started < 0.4 and writes == [1]   # durable at once: no linger in strict mode
    await strict.close()


async def test_strict_write_failure_fails_the_waiters_and_recovers(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.errors import AuditUnavailable
    real_write = audit_file._write_all

    def full(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    errors: list[int] = []
    writer = AuditWriter(tmp_path, durability="strict", on_error=lambda: errors.append(1),
                         retry_base_s=0.01, retry_max_s=0.01)
    await writer.start()
    monkeypatch.setattr(audit_file, "_write_all", full)
    with pytest.raises(AuditUnavailable):
        await writer.submit_durable(_rec(1))
    assert not writer.healthy and errors
    # The refused request is audited as a refusal instead: its durable record is not kept.
    writer.submit(_rec(2, status="error", http_status=503, reason="audit_unwritable"))
    monkeypatch.setattr(audit_file, "_write_all", real_write)
    await writer.submit_durable(_rec(3))
    assert writer.healthy
    await writer.close()
    assert [r["request_id"] for r in _lines(tmp_path / "audit" / "audit.jsonl")] == ["req-2", "req-3"]


async def test_a_durable_record_after_the_file_is_deleted_or_renamed_lands_in_a_new_audit_jsonl(
        tmp_path: Path) -> None:
    """An operator's rm, or logrotate's rename without copytruncate: the open descriptor still
    names the old inode, and a strict record acknowledged there would be in no file at the path."""
    audit_dir = tmp_path / "audit"
    async with AuditWriter(tmp_path, durability="strict") as writer:
        await writer.submit_durable(_rec(1))
        (audit_dir / "audit.jsonl").unlink()
        await writer.submit_durable(_rec(2))
        assert [r["request_id"] for r in _lines(audit_dir / "audit.jsonl")] == ["req-2"]
        (audit_dir / "audit.jsonl").rename(audit_dir / "audit.jsonl.1")
        await writer.submit_durable(_rec(3))
        assert [r["request_id"] for r in _lines(audit_dir / "audit.jsonl")] == ["req-3"]
    assert [r["request_id"] for r in _lines(audit_dir / "audit.jsonl.1")] == ["req-2"]
    assert [r["request_id"] for r in tail_audit(tmp_path, 10)] == ["req-3"]


async def test_torn_last_line_is_ended_not_glued_to_the_next_record(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    good = audit_file.dumps(_rec(1))
    (audit_dir / "audit.jsonl").write_text(good + "\n" + good[:40])   # a crash mid-write
    async with AuditWriter(tmp_path) as writer:
        writer.submit(_rec(2))
    lines = (audit_dir / "audit.jsonl").read_text().splitlines()
    assert lines == [good, good[:40], audit_file.dumps(_rec(2) | {"event_id": json.loads(lines[2])["event_id"]})]
    assert [r["request_id"] for r in tail_audit(tmp_path, 10)] == ["req-1", "req-2"]


async def test_a_torn_line_is_ended_before_any_record_even_when_ending_it_first_failed(tmp_path: Path) -> None:
    """The newline that ends a crash's torn line is the first write after a start; when the disk refuses
    it, the retried batch must not be glued onto the torn line (one unparseable line: the record lost)."""
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    torn = audit_file.dumps(_rec(1)) + '\n{"event_id": "torn", "pad": "'
    (audit_dir / "audit.jsonl").write_text(torn + "p" * (4096 - len(torn)))
    errors: list[int] = []
    writer = AuditWriter(tmp_path, on_error=lambda: errors.append(1), retry_base_s=0.01, retry_max_s=0.01)
    await writer.start()
    # A real refusal by the kernel: past RLIMIT_FSIZE a write fails with EFBIG, as on a full disk.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        writer.submit(_rec(2))
        async with asyncio.timeout(30):
            while not errors:
                await asyncio.sleep(0.001)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    await writer.close()
    assert [r["request_id"] for r in tail_audit(tmp_path, 10)] == ["req-1", "req-2"]


async def test_start_indexes_lines_the_crash_kept_out_of_the_db(tmp_path: Path) -> None:
    now = {"timestamp": datetime.now(timezone.utc).isoformat()}   # inside retention
    async with AuditWriter(tmp_path) as writer:
        writer.submit(_rec(1, **now))
    # As after a kill between the fsync of audit.jsonl and the commit of audit.db.
    with (tmp_path / "audit" / "audit.jsonl").open("a") as f:
        f.write(audit_file.dumps(_rec(2, **now)) + "\n")
    async with AuditWriter(tmp_path):
        pass
    assert sorted(r["request_id"] for r in await query_audit(tmp_path)) == ["req-1", "req-2"]


async def test_submit_durable_after_close_fails_closed(tmp_path: Path) -> None:
    from proxy.errors import AuditUnavailable
    writer = AuditWriter(tmp_path, durability="strict")
    await writer.start()
    await writer.close()
    with pytest.raises(AuditUnavailable):
        await writer.submit_durable(_rec(1))


def test_a_record_with_undecodable_bytes_is_still_one_valid_line() -> None:
    # aiohttp hands undecodable request bytes on as lone surrogates; orjson refuses them, json escapes them.
    rec = _rec(1, path="/v2/models/\udcff/infer", reason="ünïcode ok")
    line = audit_file.line_of(rec)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = json.loads(line)
    assert back["path"] == "/v2/models/\udcff/infer" and back["reason"] == "ünïcode ok"
    plain = audit_file.line_of(_rec(2, reason="ünïcode ok"))
    assert "ünïcode ok".encode() in plain   # the fast path keeps UTF-8 as is, like the old ensure_ascii=False


def test_index_rows_bind_plain_values_and_json_for_the_rest() -> None:
    from proxy.audit.index import row

    def reference(rec: dict[str, Any]) -> tuple[Any, ...]:   # the definition: plain values as they are
        return tuple(v if isinstance(v, (str, int, float, type(None))) else json.dumps(v, default=str)
                     for v in map(rec.get, FIELDS))

    full = _rec(1)
    cases = [full, {**full, "parent_key_ids": ["k_app", "k_user"]}, {**full, "parent_key_ids": "k_one"},
             {**full, "reason": {"odd": 1}, "http_status": True}, {"timestamp": full["timestamp"], "actor": "x"},
             {**full, "timestamp": "not a time"}]
    for rec in cases:
        got = row(rec)
        assert got[1:] == reference(rec) and isinstance(got[0], float)
    assert row(full)[0] == datetime.fromisoformat(full["timestamp"].replace("Z", "+00:00")).timestamp()


def test_the_index_takes_batches_across_statement_boundaries_all_or_nothing(tmp_path: Path) -> None:
    from proxy.audit.index import AuditIndex
    index = AuditIndex(tmp_path / "audit.db")
    first = [_rec(i) for i in range(150)]   # 64 + 64 + 22 rows: three statements, one transaction
    index.insert(first)
    index.insert(first[100:] + [_rec(150)])   # already indexed rows are skipped, the new one added
    assert _rows(tmp_path / "audit.db") == 151
    with sqlite3.connect(tmp_path / "audit.db") as conn:   # a failure inside the batch's second statement
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON audit WHEN NEW.request_id = 'boom' "
                     "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
    bad = [_rec(200 + i) for i in range(100)]
    bad[80] = {**bad[80], "request_id": "boom"}
    with pytest.raises(sqlite3.IntegrityError, match="disk trouble"):
        index.insert(bad)
    assert _rows(tmp_path / "audit.db") == 151   # the first 64 of the failed batch were rolled back
    index.insert(bad[:80])
    assert _rows(tmp_path / "audit.db") == 231
    index.close()


# ---------------------------------------------------------------- backpressure

async def _held_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[AuditWriter, Any]:
    """A started writer whose file writes wait for the returned threading.Event, with 20 records queued."""
    gate = threading.Event()
    real_append = audit_file.JsonlFile.append

    def held_append(self: audit_file.JsonlFile, lines: list[bytes], fsync: bool = False) -> None:
        gate.wait(10)
        real_append(self, lines, fsync=fsync)

    monkeypatch.setattr(audit_file.JsonlFile, "append", held_append)
    writer = AuditWriter(tmp_path, batch_size=4, **kw)
    await writer.start()
    for i in range(20):
        writer.submit(_rec(i))
    return writer, gate


async def test_room_holds_a_request_until_the_writer_is_back_under_the_soft_max(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, gate = await _held_writer(tmp_path, monkeypatch, queue_soft_max=10, room_wait_s=30)
    try:
        waiting = asyncio.create_task(writer.room())
        await asyncio.sleep(0.2)
        assert not waiting.done() and writer.queue_depth() == 20
        gate.set()
        await asyncio.wait_for(waiting, 5)
        assert writer.queue_depth() < 10
    finally:
        gate.set()
        await writer.close()
    assert len(_lines(tmp_path / "audit" / "audit.jsonl")) == 20


async def test_room_waits_at_most_its_bound_and_never_while_the_log_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, gate = await _held_writer(tmp_path, monkeypatch, queue_soft_max=10, room_wait_s=0.2)
    try:
        started = time.monotonic()
        await asyncio.wait_for(writer.room(), 5)
        assert 0.15 <= time.monotonic() - started and writer.queue_depth() == 20   # bounded, still behind
        writer.healthy = False   # a failing log: the backlog runs into queue_max, which refuses instead
        started = time.monotonic()
        await writer.room()
        assert time.monotonic() - started < 0.1
    finally:
        gate.set()
        await writer.close()


async def test_room_never_waits_without_a_soft_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, gate = await _held_writer(tmp_path, monkeypatch, queue_soft_max=0, room_wait_s=30)
    try:
        await asyncio.wait_for(writer.room(), 0.5)
        assert writer.queue_depth() == 20
    finally:
        gate.set()
        await writer.close()
