"""Admissions a replica reserved in Redis ahead of its requests, handed out with no round trip.

A key that is busy on this replica (at least `MIN_DEMAND` admissions of one shape in the last
slot life) asks, with the admission that has to go to Redis anyway, for as many more as it used
in that time (at most `max_slots`). Redis charges each like a request, logged at the end of its
life (redis_scripts.BATCH), and grants them only while they leave half of every limit free: so a
slot used at any moment of its life is counted at least as long as a request admitted then, and
reserving never refuses a request another replica could have had. What is not used within its
life is cancelled. A shape is everything the script judged: the scopes' keys and limits, the
tokens charged and the calendar windows, so a slot never admits a request it would have refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

MIN_DEMAND = 2     # a key seen once per slot life gets none: its requests go to Redis as before


@dataclass(eq=False)
class SlotPool:
    """The unused slots of one reservation."""

    keys: tuple[str, ...]
    tokens: int
    day: str
    month: str
    gids: list[str]
    expires: float                                    # on `clock`: not handed out after this
    window: tuple[int, int, float] | None = None      # rpm (limit, remaining, reset s) once reserved
    handed: int = 0

    def next_window(self) -> tuple[int, int, float] | None:
        """X-RateLimit-* for the next slot: the reservation's window less what was handed since."""
        if self.window is None:
            return None
        limit, remaining, reset = self.window
        return limit, remaining - self.handed, reset


@dataclass(eq=False)
class _Demand:
    since: float
    now: int = 0       # admissions of the shape since `since`
    before: int = 0    # in the slot life before that


@dataclass(eq=False)
class SlotBook:
    life_s: float
    max_slots: int
    clock: Callable[[], float] = time.monotonic
    _pools: dict[Hashable, SlotPool] = field(default_factory=dict)
    _demand: dict[Hashable, _Demand] = field(default_factory=dict)
    _asking: set[Hashable] = field(default_factory=set)

    def take(self, shape: Hashable) -> tuple[str, SlotPool] | None:
        """One reserved admission of `shape` (its grant id and pool), or None; counts the demand."""
        now = self.clock()
        demand = self._demand.get(shape)
        if demand is None or now - demand.since >= 2 * self.life_s:
            self._demand[shape] = demand = _Demand(now)
        elif now - demand.since >= self.life_s:
            demand.since, demand.before, demand.now = now, demand.now, 0
        demand.now += 1
        pool = self._pools.get(shape)
        if pool is None or not pool.gids or pool.expires <= now:
            return None
        pool.handed += 1
        return pool.gids.pop(), pool

    def reserve(self, shape: Hashable) -> int:
        """How many slots to ask for with an admission of `shape` that goes to Redis anyway.

        One ask per shape at a time: a burst that finds the pool empty would otherwise reserve
        once per request. `reserved(shape)` ends the ask.
        """
        demand = self._demand.get(shape)
        if demand is None or shape in self._asking:
            return 0
        seen = max(demand.now, demand.before)
        if seen < MIN_DEMAND:
            return 0
        self._asking.add(shape)
        return min(self.max_slots, seen)

    def reserved(self, shape: Hashable) -> None:
        self._asking.discard(shape)

    def add(self, shape: Hashable, pool: SlotPool) -> SlotPool | None:
        """Keeps a new reservation; returns the one it replaces (its unused slots are to cancel)."""
        old = self._pools.get(shape)
        self._pools[shape] = pool
        return old if old is not None and old.gids else None

    def expired(self) -> list[SlotPool]:
        """Removes and returns the pools past their life (with their unused slots), and old demand."""
        now = self.clock()
        gone = [shape for shape, pool in self._pools.items() if pool.expires <= now]
        for shape in [s for s, d in self._demand.items() if now - d.since >= 2 * self.life_s]:
            del self._demand[shape]
        return [pool for pool in (self._pools.pop(shape) for shape in gone) if pool.gids]

    def drain(self) -> list[SlotPool]:
        """Removes and returns every pool with unused slots (the limiter is closing)."""
        pools = [pool for pool in self._pools.values() if pool.gids]
        self._pools.clear()
        return pools
