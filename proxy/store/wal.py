"""Switching a SQLite file to WAL while other processes may be opening it at the same moment.

The switch needs an exclusive lock. Processes that open a new file together (the workers of a
first start, the CLI beside a starting server) each hold a shared lock and each want it, and
SQLite answers one of them "database is locked" at once: its busy handler would deadlock them,
so the connection's busy timeout does not apply. The answer is to try again. Once the file is in
WAL mode (a setting kept in the file) the pragma takes no exclusive lock, so the wait is paid
only on a first start, and at most `wait_s`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import aiosqlite

WAL_WAIT_S = 5.0     # as long as the store's busy timeout: the longest any opener should wait
_RETRY_S = 0.02
_PRAGMA = "PRAGMA journal_mode = WAL"


def _collided(exc: BaseException, deadline: float) -> bool:
    """Whether `exc` is a switch refused because another connection holds the file, with time left to retry."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc) and time.monotonic() < deadline


def _check(row: Any) -> None:
    if row is None or str(row[0]).lower() != "wal":
        raise sqlite3.OperationalError(f"could not enable WAL: {row!r}")


def enable_wal(db: sqlite3.Connection, wait_s: float = WAL_WAIT_S) -> None:
    """PRAGMA journal_mode = WAL on `db`, tried again while another connection holds the file."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            row = db.execute(_PRAGMA).fetchone()
            break
        except sqlite3.OperationalError as exc:
            if not _collided(exc, deadline):
                raise
        time.sleep(_RETRY_S)
    _check(row)


async def enable_wal_async(db: aiosqlite.Connection, wait_s: float = WAL_WAIT_S) -> None:
    """enable_wal() for an aiosqlite connection: the event loop waits, never blocks."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            async with db.execute(_PRAGMA) as cur:
                row = await cur.fetchone()
            break
        except sqlite3.OperationalError as exc:
            if not _collided(exc, deadline):
                raise
        await asyncio.sleep(_RETRY_S)
    _check(row)
