"""Admissions a replica reserved in Redis ahead of its requests, handed out with no round trip.

A key that is busy on this replica (at least `MIN_DEMAND` admissions of one shape in the last
slot life) asks, with the admission that has to go to Redis anyway, for as many more as it used
in that time (at most `max_slots`; less those already waiting on Redis), and asks again on its
own once half of them are handed out, so a steady stream of requests never waits for Redis.
Redis charges each like a request, logged at the end of its life (redis_scripts.BATCH), and
grants them only while they leave half of every limit free: so a slot used at any moment of its
life is counted at least as long as a request admitted then, and reserving never refuses a
request another replica could have had. What is not used within its life is cancelled. A shape
is everything the script judged: the scopes' keys and limits, the tokens charged and the
calendar windows, so a slot never admits a request it would have refused."""

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
    size: int = 0                                     # slots reserved (gids at the start)

    def __post_init__(self) -> None:
        self.size = self.size or len(self.gids)

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
    _pools: dict[Hashable, list[SlotPool]] = field(default_factory=dict)   # oldest first
    _demand: dict[Hashable, _Demand] = field(default_factory=dict)
    _asking: set[Hashable] = field(default_factory=set)
    _spent: list[SlotPool] = field(default_factory=list)   # past their life with slots unused, for expired()
    _to_redis: dict[Hashable, int] = field(default_factory=dict)   # requests waiting on Redis, per shape

    def take(self, shape: Hashable) -> tuple[str, SlotPool] | None:
        """One reserved admission of `shape` (its grant id and pool), or None; counts the demand."""
        now = self.clock()
        demand = self._demand.get(shape)
        if demand is None or now - demand.since >= 2 * self.life_s:
            self._demand[shape] = demand = _Demand(now)
        elif now - demand.since >= self.life_s:
            demand.since, demand.before, demand.now = now, demand.now, 0
        demand.now += 1
        pools = self._pools.get(shape)
        while pools and not (pools[0].gids and pools[0].expires > now):
            if (gone := pools.pop(0)).gids:   # past its life: expired() hands its unused slots back
                self._spent.append(gone)
        if not pools:
            return None
        pool = pools[0]   # the oldest ends first
        pool.handed += 1
        return pool.gids.pop(), pool

    def refill(self, shape: Hashable) -> int:
        """How many slots to reserve now, ahead of need, or 0: once half of the last reservation is
        handed out, the next is asked for (on its own, `request` 0) while the rest serve the requests
        behind it, so a busy key's pool is topped up before it runs dry."""
        pools = self._pools.get(shape)
        if not pools or shape in self._asking or sum(len(p.gids) for p in pools) * 2 > pools[-1].size:
            return 0
        return self.reserve(shape)

    def reserve(self, shape: Hashable) -> int:
        """How many slots to ask for with an admission of `shape` that goes to Redis anyway.

        One ask per shape at a time: a burst that finds the pool empty would otherwise reserve
        once per request. `reserved(shape)` ends the ask. Slots are for the requests still to
        come: this one and those already on their way to Redis (`to_redis`) are not counted, so
        a burst that arrives all at once reserves none. It would hold them unused, refusing
        other replicas' requests, until their life ended.
        """
        demand = self._demand.get(shape)
        if demand is None or shape in self._asking:
            return 0
        seen = max(demand.now, demand.before)
        wanted = min(self.max_slots, seen - self._to_redis.get(shape, 0) - 1)
        if seen < MIN_DEMAND or wanted < 1:
            return 0
        self._asking.add(shape)
        return wanted

    def to_redis(self, shape: Hashable, change: int) -> None:
        """Counts this replica's requests of `shape` waiting on Redis's answer (+1 sent, -1 answered)."""
        if (left := self._to_redis.get(shape, 0) + change) > 0:
            self._to_redis[shape] = left
        else:
            self._to_redis.pop(shape, None)

    def reserved(self, shape: Hashable) -> None:
        self._asking.discard(shape)

    def add(self, shape: Hashable, pool: SlotPool) -> None:
        """Keeps a new reservation beside the older ones still in use (those are handed out first)."""
        self._pools.setdefault(shape, []).append(pool)

    def expired(self) -> list[SlotPool]:
        """Removes and returns the pools past their life (with their unused slots), and old demand."""
        now = self.clock()
        gone, self._spent = self._spent, []
        for shape, pools in list(self._pools.items()):
            gone += [pool for pool in pools if pool.expires <= now and pool.gids]
            if kept := [pool for pool in pools if pool.expires > now and pool.gids]:
                self._pools[shape] = kept
            else:
                del self._pools[shape]
        for shape in [s for s, d in self._demand.items() if now - d.since >= 2 * self.life_s]:
            del self._demand[shape]
        return gone

    def drain(self) -> list[SlotPool]:
        """Removes and returns every pool with unused slots (the limiter is closing)."""
        pools = self._spent + [pool for kept in self._pools.values() for pool in kept if pool.gids]
        self._pools.clear()
        self._spent = []
        return pools
