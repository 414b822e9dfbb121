"""Tests for proxy.audit.index: an audit.db deleted while the writer has it open is noticed and replaced."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.audit.index import AuditIndex
from proxy.audit.writer import AuditWriter, _iso_utc, query_audit
from proxy.context import new_id


def _rec(i: int) -> dict[str, Any]:
    # i ms on top of now: records made within one millisecond still sort in the order they were made
    # (search orders by ts, then rowid, and a rebuilt index's rowids need not follow the records' order).
    return {"timestamp": _iso_utc(time.time() + i / 1000), "event_id": new_id(), "request_id": f"req-{i}", "status": "allowed"}


def _ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT request_id FROM audit ORDER BY request_id")]


async def test_a_deleted_audit_db_is_replaced_and_rebuilt_from_the_jsonl_tail(tmp_path: Path) -> None:
    db = tmp_path / "audit" / "audit.db"
    async with AuditWriter(tmp_path) as writer:
        for i in range(3):
            writer.submit(_rec(i))
        await writer.flush()
        assert _ids(db) == ["req-0", "req-1", "req-2"]
        db.unlink()                      # an operator frees space; the writer still has the file open
        writer.submit(_rec(3))
        await writer.flush()
        # The new audit.db holds the new record and, re-indexed from audit.jsonl, the ones before it.
        assert [r["request_id"] for r in await query_audit(tmp_path)] == ["req-3", "req-2", "req-1", "req-0"]
        writer.submit(_rec(4))
        await writer.flush()
    assert _ids(db) == [f"req-{i}" for i in range(5)]


_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM audit").fetchall()   # the WAL's shared memory is open from here on
print("open", flush=True)
sys.stdin.readline()
conn.close()
"""


def test_no_new_index_beside_a_deleted_one_another_process_still_has_open(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    index = AuditIndex(db)
    index.insert([_rec(0)])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        db.unlink()
        # Its -wal/-shm are still the deleted database's: a new audit.db opened beside them would read
        # that database's pages as its own. Refused (the writer keeps the rows and retries) ...
        with pytest.raises(sqlite3.OperationalError, match="another process still has it open"):
            index.insert([_rec(1)])
        assert not db.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait() == 0
    # ... until the other process lets go: then the retry makes a sound new index.
    index.insert([_rec(1)])
    index.insert([_rec(2)])
    assert index.replaced
    index.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert _ids(db) == ["req-1", "req-2"]
