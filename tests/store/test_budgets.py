"""Tests for proxy.budget_store and LocalLimiter's persisted day/month budgets (real SQLite, fake clock)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from proxy.state.limits import LocalLimiter, OverLimit
from proxy.store.budgets import BudgetStore, budget_store_path
from tests.state.test_limits import Clock, at, scope

T0 = at("2026-11-29T12:00:00")
BUDGET = [scope("k", daily_tokens=100, monthly_tokens=1000)]


async def limiter(path: Path, clock: Clock, flush_interval_s: float = 3600.0) -> LocalLimiter:
    lim = LocalLimiter(clock, budgets=await BudgetStore.open(path), flush_interval_s=flush_interval_s)
    await lim.start()
    return lim


def rows(path: Path) -> dict[tuple[str, str], int]:
    with sqlite3.connect(path) as db:
        return {(k, w): u for k, w, u in db.execute("SELECT key_id, window, used FROM budgets")}


async def test_store_adds_deltas_and_loads_only_the_given_windows(tmp_path: Path) -> None:
    store = await BudgetStore.open(budget_store_path(tmp_path))
    try:
        await store.add({("a", "2026-11-29"): 5, ("a", "2026-11"): 5, ("b", "2026-11-28"): 7})
        await store.add({("a", "2026-11-29"): 3, ("a", "2026-11"): -2, ("c", "2026-11"): 0})
        assert await store.load(("2026-11-29", "2026-11")) == {("a", "2026-11-29"): 8, ("a", "2026-11"): 3}
    finally:
        await store.close()
    # Loading pruned yesterday's row; a zero delta never made one.
    assert rows(tmp_path / "budgets.sqlite") == {("a", "2026-11-29"): 8, ("a", "2026-11"): 3}


async def test_budget_used_before_a_restart_still_counts_after_it(tmp_path: Path) -> None:
    path, clock = tmp_path / "budgets.sqlite", Clock(T0)
    first = await limiter(path, clock)
    first.settle(first.acquire_now(BUDGET, 50), 60)   # charged the estimate, corrected to the real count
    first.settle(first.acquire_now(BUDGET, 10), 10)
    await first.close()                                # the shutdown flush
    assert rows(path) == {("k", "2026-11-29"): 70, ("k", "2026-11"): 70}

    clock.t = T0 + 3600
    second = await limiter(path, clock)
    try:
        with pytest.raises(OverLimit) as info:
            second.acquire_now(BUDGET, 31)
        assert info.value.reason == "rate_limited:daily_tokens" and info.value.remaining == 30
        second.settle(second.acquire_now(BUDGET, 30), 30)   # exactly what is left still fits
    finally:
        await second.close()


async def test_a_new_day_starts_fresh_but_the_month_carries_over(tmp_path: Path) -> None:
    path, clock = tmp_path / "budgets.sqlite", Clock(T0)
    first = await limiter(path, clock)
    first.settle(first.acquire_now(BUDGET, 100), 100)
    await first.close()
    clock.t = at("2026-11-30T00:00:01")
    second = await limiter(path, clock)
    try:
        assert ("k", "2026-11-29") not in rows(path)          # the old day is pruned at start
        second.settle(second.acquire_now(BUDGET, 100), 100)   # a full day's budget again
        with pytest.raises(OverLimit) as info:
            second.acquire_now([scope("k", monthly_tokens=250)], 51)
        assert info.value.reason == "rate_limited:monthly_tokens" and info.value.remaining == 50
    finally:
        await second.close()


async def test_periodic_flush_writes_without_a_shutdown(tmp_path: Path) -> None:
    path, clock = tmp_path / "budgets.sqlite", Clock(T0)
    lim = await limiter(path, clock, flush_interval_s=0.05)
    try:
        lim.settle(lim.acquire_now(BUDGET, 40), 40)
        for _ in range(200):   # the flush task runs on its own; wait for its write, not a fixed time
            if rows(path).get(("k", "2026-11-29")) == 40:
                break
            await asyncio.sleep(0.05)
        assert rows(path) == {("k", "2026-11-29"): 40, ("k", "2026-11"): 40}
        # A process that dies now (no close) restarts with the charge.
        revived = await limiter(path, clock)
        with pytest.raises(OverLimit):
            revived.acquire_now(BUDGET, 61)
        await revived.close()
    finally:
        await lim.close()


async def test_a_failed_write_keeps_the_charges_for_the_next_flush(tmp_path: Path) -> None:
    path, clock = tmp_path / "budgets.sqlite", Clock(T0)
    lim = await limiter(path, clock)
    try:
        lim.settle(lim.acquire_now(BUDGET, 25), 25)
        with sqlite3.connect(path, isolation_level=None) as blocker:
            blocker.execute("PRAGMA busy_timeout=0")
            blocker.execute("BEGIN EXCLUSIVE")
            assert lim._budgets is not None
            await lim._budgets._db.execute("PRAGMA busy_timeout=0")
            with pytest.raises(sqlite3.OperationalError):
                await lim.flush()
            lim.settle(lim.acquire_now(BUDGET, 5), 5)   # charged while the store was locked
            blocker.execute("ROLLBACK")
        await lim.flush()
        assert rows(path) == {("k", "2026-11-29"): 30, ("k", "2026-11"): 30}
    finally:
        await lim.close()


async def test_without_a_store_nothing_is_written_and_start_close_are_harmless(tmp_path: Path) -> None:
    lim = LocalLimiter(Clock(T0))
    await lim.start()
    lim.settle(lim.acquire_now(BUDGET, 10), 10)
    await lim.close()
    assert not list(tmp_path.iterdir())
