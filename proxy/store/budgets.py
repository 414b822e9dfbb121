"""Day and month token budgets kept across restarts: a small SQLite file, `<data_dir>/budgets.sqlite`.

Its own file rather than a table in the key store: the limiter writes every second while
traffic flows, and those writes must never queue behind (or hold) the key store's writer
lock, which revocations and key creation need at once. Nothing here is a secret.

One row per (key id, window): the window is the UTC day ("2026-11-29") or month ("2026-11"),
so a row of a past window is never read as the current one; `load` prunes them. Writes are
deltas (`used = used + ?`), so several processes adding to one file never overwrite each
other's counts. SQLite runs in aiosqlite's thread: the event loop only awaits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import aiosqlite

from proxy.store.wal import enable_wal_async

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    key_id  TEXT NOT NULL,
    window  TEXT NOT NULL,      -- UTC day 'YYYY-MM-DD' or month 'YYYY-MM'
    used    INTEGER NOT NULL,   -- tokens charged to the key in that window
    PRIMARY KEY (key_id, window)
) WITHOUT ROWID;
"""
_ADD = ("INSERT INTO budgets(key_id, window, used) VALUES (?, ?, ?) "
        "ON CONFLICT(key_id, window) DO UPDATE SET used = used + excluded.used")


def budget_store_path(data_dir: Path) -> Path:
    return Path(data_dir) / "budgets.sqlite"


class BudgetStore:
    """Token counts per (key id, window); open with `BudgetStore.open(path)`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> BudgetStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        try:
            await db.execute("PRAGMA busy_timeout=5000")
            await enable_wal_async(db)   # every worker opens the file at start
            # NORMAL in WAL: a crash may lose the last flush, never corrupt the file. The counts are
            # at most one flush interval stale either way.
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.executescript(_SCHEMA)
            await db.commit()
        except BaseException:
            await db.close()
            raise
        return cls(db)

    async def load(self, windows: tuple[str, ...]) -> dict[tuple[str, str], int]:
        """(key id, window) -> tokens used, for `windows` only; rows of every other window are deleted."""
        marks = ",".join("?" * len(windows))
        await self._db.execute(f"DELETE FROM budgets WHERE window NOT IN ({marks})", windows)
        await self._db.commit()
        async with self._db.execute(f"SELECT key_id, window, used FROM budgets WHERE window IN ({marks})",
                                    windows) as cur:
            return {(key_id, window): int(used) for key_id, window, used in await cur.fetchall()}

    async def add(self, deltas: Mapping[tuple[str, str], int]) -> None:
        """Adds each delta (negative when a charge was corrected down) in one transaction."""
        rows = [(key_id, window, delta) for (key_id, window), delta in deltas.items() if delta]
        if not rows:
            return
        try:
            await self._db.executemany(_ADD, rows)
            await self._db.commit()
        except BaseException:
            await self._db.rollback()   # all or nothing: the caller keeps the deltas and retries
            raise

    async def close(self) -> None:
        await self._db.close()
