"""The limit step's decisions: per-key request, token and concurrency limits and token budgets.

A request is bound by its own key's limits and by every ancestor's (a device key also
by its app key's). `Limiter` is the interface; `LocalLimiter` keeps the counters in this
process, which is exact on one node. A shared backend (Redis) is another `Limiter`.

Algorithms of `LocalLimiter` (all exact, no approximation):
- rpm: a sliding-window log. The admission times of the last 60 s are kept; a request
  is admitted while fewer than `rpm` are in the window, so no 60 s span ever holds more
  than `rpm` requests (a token bucket or fixed window would allow up to 2x at a boundary).
- tpm: the same sliding log, each entry carrying tokens: charged the estimate at
  admission, corrected to the response's real count when it is known.
- concurrency: a counter of requests in flight, released on every path by `settle`.
- daily / monthly budgets: counters for the current UTC calendar day / month, reset
  when the calendar moves on. With a `BudgetStore` they survive a restart: `start()` loads
  the current windows, a background task writes what changed every `flush_interval_s` and
  `close()` writes the rest. The in-memory counters stay authoritative while running; the
  request path never waits on the store (a crash loses at most one interval of charges).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import RateLimited
from ..quotas import Limits
from ..store.budgets import BudgetStore

log = logging.getLogger("seekgate.limits")

WINDOW_S = 60.0


def max_tokens_cap(roles: Iterable[str], caps: Mapping[str, int]) -> int | None:
    """The most generous cap among the key's capped roles; None if no cap applies.

    Roles absent from `caps` do not count, so adding an unrelated role never lifts a cap;
    a role capped at 0 is explicitly uncapped (e.g. admin=0).
    """
    found = [caps[r] for r in roles if r in caps]
    if not found or 0 in found:
        return None
    return max(found)


@dataclass(frozen=True, slots=True)
class Scope:
    """One key whose limits bind a request: the caller's own key or one of its ancestors."""

    key_id: str
    limits: Limits
    inherited: bool = False


class OverLimit(RateLimited):
    """429 / RESOURCE_EXHAUSTED naming the limit; the audit reason is rate_limited:<kind>."""

    def __init__(self, kind: str, scope: Scope, limit: int, remaining: int, reset_s: float,
                 retry_after_s: float) -> None:
        where = f"@{scope.key_id}" if scope.inherited else ""
        super().__init__(f"rate_limited:{kind}{where}", retry_after=max(1, math.ceil(retry_after_s)))
        self.kind, self.scope, self.limit, self.remaining = kind, scope, limit, max(0, remaining)
        self.reset_s = max(1, math.ceil(reset_s))

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "X-RateLimit-Limit": str(self.limit),
                "X-RateLimit-Remaining": str(self.remaining), "X-RateLimit-Reset": str(self.reset_s)}


@dataclass(eq=False, slots=True)
class _Charge:
    """Tokens charged to one window at admission; corrected in place when the real count is known."""

    at: float
    tokens: int
    live: bool = True       # False once it has left the sliding window


@dataclass(eq=False, slots=True)
class _Budget:
    window: str             # "2026-11-29" or "2026-11"
    used: int = 0


class _TimeLog:
    """Admission times of the last minute, oldest first, kept as raw doubles in one array.

    A deque of floats held a Python object per admitted request for 60 s; under steady load those
    objects, interleaved with everything else the request path allocates, spread the heap and RSS
    crept upwards long after every structure had reached its size. Expired times are skipped by
    bisection and dropped in bulk once they are half of the array.
    """

    __slots__ = ("_times", "_head")

    def __init__(self) -> None:
        self._times = array("d")
        self._head = 0

    def __len__(self) -> int:
        return len(self._times) - self._head

    def append(self, at: float) -> None:
        self._times.append(at)

    def oldest(self) -> float:
        return self._times[self._head]

    def expire(self, cutoff: float) -> None:
        """Forgets every time at or before `cutoff`."""
        times = self._times
        head = bisect_right(times, cutoff, self._head)
        if head * 2 >= len(times):
            del times[:head]
            head = 0
        self._head = head


@dataclass(eq=False)
class _KeyState:
    requests: _TimeLog = field(default_factory=_TimeLog)
    # Only scopes with a tpm limit keep charges: they exist to count tokens in the window.
    charges: deque[_Charge] = field(default_factory=deque)
    tpm_used: int = 0
    inflight: int = 0
    day: _Budget = field(default_factory=lambda: _Budget(""))
    month: _Budget = field(default_factory=lambda: _Budget(""))

    def expire(self, now: float, day: str, month: str) -> None:
        self.requests.expire(now - WINDOW_S)
        while self.charges and self.charges[0].at <= now - WINDOW_S:
            old = self.charges.popleft()
            old.live = False
            self.tpm_used -= old.tokens
        if self.day.window != day:
            self.day = _Budget(day)
        if self.month.window != month:
            self.month = _Budget(month)

    def idle(self) -> bool:
        return not (self.requests or self.charges or self.inflight or self.day.used or self.month.used)


@dataclass(eq=False)
class Grant:
    """What one admitted request holds: a concurrency slot and token charges, until `settle`."""

    key_ids: tuple[str, ...]
    tokens: int
    charges: list[tuple[_KeyState, _Charge | None, _Budget, _Budget]] = field(default_factory=list)
    settled: bool = False
    # The tightest rpm window after admission, for X-RateLimit-* on a successful response.
    rpm_window: tuple[int, int, float] | None = None    # (limit, remaining, seconds to reset)

    def headers(self) -> dict[str, str]:
        if self.rpm_window is None:
            return {}
        limit, remaining, reset = self.rpm_window
        return {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(max(0, remaining)),
                "X-RateLimit-Reset": str(max(1, math.ceil(reset)))}


class Limiter(ABC):
    """Admits or refuses a request against every scope's limits, atomically across scopes."""

    @abstractmethod
    async def acquire(self, scopes: Sequence[Scope], tokens: int) -> Grant:
        """Admit the request, charging `tokens` (0: not a token-metered request); raises OverLimit."""

    @abstractmethod
    def settle(self, grant: Grant, tokens: int) -> None:
        """The request is over: free its slot and correct its charge to `tokens`. Idempotent.

        Synchronous so that it runs in the request's `finally` before anything else can be
        admitted; a networked backend queues the write.
        """

    def refusing(self) -> bool:
        """True while a shared backend is unreachable and every limited request is refused for it
        (readiness then fails, so a load balancer drains this replica). In-process: never."""
        return False

    async def start(self) -> None:   # noqa: B027  (an optional hook: most backends need none)
        """Loads persisted state and starts any background work; before the first request."""

    async def close(self) -> None:   # noqa: B027  (an optional hook, like start)
        """Stops background work and persists what must outlive the process; after the last request."""


def _windows(now: float) -> tuple[str, str, float, float]:
    """(day id, month id, seconds to the next UTC midnight, seconds to the next UTC month)."""
    day = _day_of(now)
    return day[2], day[3], day[1] - now, day[4] - now


_day: tuple[float, float, str, str, float] = (0.0, 0.0, "", "", 0.0)   # the last day asked for


def _day_of(now: float) -> tuple[float, float, str, str, float]:
    """(midnight, next midnight, day id, month id, next month's start) of `now`'s UTC day; the last
    answer is kept, since every limited request asks (datetime work costs more than the rest of a
    local admission)."""
    global _day
    if not _day[0] <= now < _day[1]:
        t = datetime.fromtimestamp(now, timezone.utc)
        midnight = t.replace(hour=0, minute=0, second=0, microsecond=0)
        first = midnight.replace(day=1)
        next_month = first.replace(year=first.year + (first.month == 12), month=first.month % 12 + 1)
        _day = (midnight.timestamp(), midnight.timestamp() + 86400.0, t.strftime("%Y-%m-%d"), t.strftime("%Y-%m"),
                next_month.timestamp())
    return _day


class LocalLimiter(Limiter):
    """In-process counters (see the module docstring for the algorithms); `clock` is wall time.

    `budgets`: where day / month budgets persist (None: they reset with the process).
    """

    def __init__(self, clock: Callable[[], float] = time.time, budgets: BudgetStore | None = None,
                 flush_interval_s: float = 1.0) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._budgets = budgets
        self._flush_interval_s = flush_interval_s
        self._unsaved: dict[tuple[str, str], int] = {}   # (key id, window) -> tokens not yet in the store
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ persistence

    async def start(self) -> None:
        if self._budgets is None:
            return
        day, month, _, _ = _windows(self.clock())
        for (key_id, window), used in (await self._budgets.load((day, month))).items():
            st = self._keys.setdefault(key_id, _KeyState())
            budget = st.day if window == day else st.month
            if budget.window != window:   # a fresh state: take the stored window as it is
                budget = _Budget(window)
                if window == day:
                    st.day = budget
                else:
                    st.month = budget
            budget.used += used
        self._flusher = asyncio.create_task(self._flush_every())

    async def close(self) -> None:
        if self._flusher is not None:
            # Never cancelled mid-write: a commit that lands after its cancellation would count twice.
            self._stopping.set()
            await self._flusher
            self._flusher = None
        if self._budgets is not None:
            await self.flush()   # every request has settled by now: the last charges go in
            await self._budgets.close()

    async def flush(self) -> None:
        """Writes the charges since the last flush; on failure they are kept for the next one."""
        if self._budgets is None or not self._unsaved:
            return
        # Taken in one step on the loop: charges made while the write runs go to the next flush.
        pending, self._unsaved = self._unsaved, {}
        try:
            await self._budgets.add(pending)
        except BaseException:
            for k, v in pending.items():
                self._unsaved[k] = self._unsaved.get(k, 0) + v
            raise

    async def _flush_every(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._flush_interval_s)
            try:
                await self.flush()
            except Exception:   # a full disk must not stop limiting; the counts stay in memory
                log.exception("writing token budgets failed; retrying in %.3gs", self._flush_interval_s)

    def _charged(self, key_id: str, day: _Budget, month: _Budget, tokens: int) -> None:
        if self._budgets is None or not tokens:
            return
        for window in (day.window, month.window):
            k = (key_id, window)
            self._unsaved[k] = self._unsaved.get(k, 0) + tokens

    # ------------------------------------------------------------------ admission

    async def acquire(self, scopes: Sequence[Scope], tokens: int) -> Grant:
        # No await in here: on one event loop the check-then-commit below is atomic.
        return self.acquire_now(scopes, tokens)

    def acquire_now(self, scopes: Sequence[Scope], tokens: int) -> Grant:
        now = self.clock()
        day, month, to_day, to_month = _windows(now)
        bound = [s for s in scopes if not s.limits.unlimited()]
        states = []
        for scope in bound:   # check every scope before charging any: a refusal charges nothing
            st = self._keys.setdefault(scope.key_id, _KeyState())
            st.expire(now, day, month)
            self._check(scope, st, tokens, now, to_day, to_month)
            states.append(st)
        grant = Grant(tuple(s.key_id for s in bound), tokens)
        for scope, st in zip(bound, states, strict=True):
            if scope.limits.rpm:   # the log exists for rpm alone
                st.requests.append(now)
                window = (scope.limits.rpm, scope.limits.rpm - len(st.requests),
                          st.requests.oldest() + WINDOW_S - now)
                if grant.rpm_window is None or window[1] < grant.rpm_window[1]:
                    grant.rpm_window = window
            st.inflight += 1
            charge = _Charge(now, tokens) if scope.limits.tpm else None
            if charge is not None:
                st.charges.append(charge)
                st.tpm_used += tokens
            st.day.used += tokens
            st.month.used += tokens
            self._charged(scope.key_id, st.day, st.month, tokens)
            grant.charges.append((st, charge, st.day, st.month))
        return grant

    @staticmethod
    def _check(scope: Scope, st: _KeyState, tokens: int, now: float, to_day: float, to_month: float) -> None:
        lim = scope.limits
        if lim.concurrency and st.inflight >= lim.concurrency:
            # When a slot frees is unknowable here; 1 s is a polite retry interval.
            raise OverLimit("concurrency", scope, lim.concurrency, 0, 1, 1)
        if lim.rpm and len(st.requests) >= lim.rpm:
            # The window frees a place when its oldest request turns 60 s old.
            wait = st.requests.oldest() + WINDOW_S - now
            raise OverLimit("rpm", scope, lim.rpm, 0, wait, wait)
        if not tokens:
            return
        if lim.tpm and st.tpm_used + tokens > lim.tpm:
            wait, used = WINDOW_S, st.tpm_used
            if tokens <= lim.tpm:   # else it can never fit; say a full window
                for c in st.charges:
                    used -= c.tokens
                    if used + tokens <= lim.tpm:
                        wait = c.at + WINDOW_S - now
                        break
            raise OverLimit("tpm", scope, lim.tpm, lim.tpm - st.tpm_used, wait, wait)
        if lim.daily_tokens and st.day.used + tokens > lim.daily_tokens:
            raise OverLimit("daily_tokens", scope, lim.daily_tokens, lim.daily_tokens - st.day.used,
                            to_day, to_day)
        if lim.monthly_tokens and st.month.used + tokens > lim.monthly_tokens:
            raise OverLimit("monthly_tokens", scope, lim.monthly_tokens, lim.monthly_tokens - st.month.used,
                            to_month, to_month)

    def settle(self, grant: Grant, tokens: int) -> None:
        if grant.settled:
            return
        grant.settled = True
        delta = tokens - grant.tokens
        for key_id, (st, charge, day, month) in zip(grant.key_ids, grant.charges, strict=True):
            st.inflight -= 1
            if charge is not None:
                charge.tokens += delta
                if charge.live:   # a charge already out of the window no longer counts
                    st.tpm_used += delta
            # A budget whose calendar window has passed is gone; its correction goes with it
            # (in the store too: the row of a past window is never read again).
            day.used += delta
            month.used += delta
            self._charged(key_id, day, month, delta)
        for key_id in grant.key_ids:
            left = self._keys.get(key_id)
            if left is not None and left.idle():
                del self._keys[key_id]   # memory stays bounded by the keys in use

    def in_flight(self, key_id: str) -> int:
        st = self._keys.get(key_id)
        return st.inflight if st else 0
