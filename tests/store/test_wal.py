"""Switching SQLite files to WAL while other connections open them too (proxy.store.wal), real SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest

from proxy.audit.index import AuditIndex
from proxy.store.budgets import BudgetStore
from proxy.store.sqlite import SqliteStore
from proxy.store.wal import enable_wal, enable_wal_async


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """A new file in rollback mode with a write transaction open on it: nobody can switch it to WAL."""
    path = tmp_path / "shared.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    yield path, holder
    holder.close()


def journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("PRAGMA journal_mode").fetchone()[0])


def test_a_switch_refused_while_another_connection_holds_the_file_is_tried_again(
        held: tuple[Path, sqlite3.Connection]) -> None:
    path, holder = held
    db = sqlite3.connect(path, timeout=0)   # no busy handler: "locked" at once, as two openers colliding get
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.execute("PRAGMA journal_mode = WAL")
    threading.Timer(0.2, holder.commit).start()
    started = time.monotonic()
    enable_wal(db)
    assert time.monotonic() - started >= 0.15
    db.close()
    assert journal_mode(path) == "wal"


def test_the_switch_gives_up_after_its_wait(held: tuple[Path, sqlite3.Connection]) -> None:
    path, _ = held
    db = sqlite3.connect(path, timeout=0)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        enable_wal(db, wait_s=0.1)
    assert 0.1 <= time.monotonic() - started < 2
    db.close()


def test_an_error_that_is_no_collision_is_raised_at_once(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not a database, " * 512)
    db = sqlite3.connect(path)
    started = time.monotonic()
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        enable_wal(db)
    assert time.monotonic() - started < 1
    db.close()


async def test_the_async_switch_waits_without_blocking_the_loop(held: tuple[Path, sqlite3.Connection]) -> None:
    path, holder = held
    threading.Timer(0.2, holder.commit).start()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    async with aiosqlite.connect(path, timeout=0) as db:
        await enable_wal_async(db)
    ticker.cancel()
    assert ticks >= 10   # the loop ran while the switch waited
    assert journal_mode(path) == "wal"


# A first start of N workers: each opens the same new files at once. Before the retry, one in
# about fifteen rounds of four openers crashed a worker with "database is locked".

def open_index(path: Path, barrier: threading.Barrier, errors: list[sqlite3.Error]) -> None:
    barrier.wait()
    index = AuditIndex(path)
    try:
        index.open()
    except sqlite3.Error as exc:
        errors.append(exc)
    finally:
        index.close()


def test_audit_indexes_opened_together_on_a_new_file_all_open(tmp_path: Path) -> None:
    for round_ in range(30):
        path = tmp_path / f"audit-{round_}.db"
        barrier, errors = threading.Barrier(4), []
        threads = [threading.Thread(target=open_index, args=(path, barrier, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and journal_mode(path) == "wal", round_


async def test_budget_and_key_stores_opened_together_on_a_new_file_all_open(tmp_path: Path) -> None:
    for round_ in range(15):
        budgets = await asyncio.gather(*(BudgetStore.open(tmp_path / f"budgets-{round_}.sqlite") for _ in range(4)))
        keys = await asyncio.gather(*(SqliteStore.open(tmp_path / f"keys-{round_}.db") for _ in range(4)))
        for store in (*budgets, *keys):
            await store.close()
        assert journal_mode(tmp_path / f"budgets-{round_}.sqlite") == journal_mode(tmp_path / f"keys-{round_}.db") \
            == "wal"
