"""Limits exact across replicas: the counters of `LocalLimiter`, kept in one Redis and changed by server-side scripts.

Every replica admits through one Lua script (redis_scripts.BATCH): it expires, checks every
scope and charges them in one atomic call, so N replicas together admit exactly what one process
would. The algorithms are those of limits.py (sliding-window logs for rpm and tpm with the charge
corrected at settle, budgets per UTC day and month), with one difference: concurrency is a set of
leases that expire, not a counter, so a replica killed mid-request frees its slots when its
leases run out (`lease_s`); a running request's lease is renewed every third of that by this process.

Round trips are group-committed: one batch is in flight at a time, and every admission that
arrives meanwhile rides in the next one, so a lone request pays one round trip and a burst of N
shares one. Settlements ride along; only one that frees a concurrency lease asks for a round trip
of its own (another request may be waiting for that place). One that raises a charge (a response
that used more tokens than its estimate: every generate call, whose estimate is its max_tokens)
waits up to `RAISE_DELAY_S` for a ride: every admission this replica sends meanwhile carries it, so
this replica never judges a request without it, and the others see it at most that much later
than a round trip of its own would bring it. One that only lowers a charge waits up to
`SETTLE_DELAY_S` (late, it is stricter, never looser).

Redis unreachable: `on_backend_down="closed"` refuses with 503 + Retry-After (nothing goes through
unmetered); `"local"` admits under this process's own `LocalLimiter` (each replica enforces the
full limits on its own: N replicas may let N times through) and says so in a log line and through
`on_backend(up, local)`. A probe finds Redis back and the shared counters take over again, no
restart. Settlements that could not be written are kept and retried then, and the tokens this
replica admitted on its own are added to the shared day and month budgets (`_repay`): an outage
does not hand a key its budget again. Each such repayment is a settlement of a grant id of its own
(one that creates a budget's key if it is missing), so it is applied exactly once like any other.
The rpm and tpm windows (a minute) are not carried over.
A Redis restarted between two batches is no outage: the batch connection it closed is replaced
before the next batch is sent on it (`_fresh`).

A settlement is applied exactly once or not at all. One whose batch's answer was lost may have been
applied: it is retried only within `settle_retry_s` of its first send (Redis checks the deadline
on its own clock, redis_scripts.BATCH), while the marks that say it ran still live. Past that, when
more than MAX_UNSETTLED wait, or when the limiter closes with Redis down (reason `shutdown`, sent or
still waiting for a ride alike), it is dropped: a log line naming the key, day and tokens, and
`on_settlement_dropped(reason)` (seekgate_limits_settlements_dropped_total). The request it
belongs to was served and audited already; only the counter's correction is left out. So are the
tokens the local fallback admitted and still owes the shared budgets when the limiter closes with
Redis down (reason `shutdown`, one per key, day and month), and a repayment dropped like a settlement.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, MasterDownError, NoScriptError, RedisClusterUnreachableError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import StoreUnavailable
from ..settings import redis_cluster_nodes
from .limits import Grant, Limiter, LocalLimiter, OverLimit, Scope, _windows
from .redis_scripts import BATCH, RENEW, cluster_prefix, lease_key, scope_keys, settled_key
from .redis_slots import SlotBook, SlotPool

log = logging.getLogger("seekgate.limits")

BACKEND_DOWN_MODES = ("closed", "local")
# Settlements kept while Redis is down; beyond this the oldest corrections are dropped (their
# leases expire on their own; only a token count's correction is lost, and recorded).
MAX_UNSETTLED = 100_000
# How long after its first send a settlement whose answer was lost is still sent again. Its marks
# live a third longer (MARK_LIFE): the margin covers the drift of this replica's estimate of Redis's
# clock between two reads of it (one per lease_s / 3) and a step of Redis's clock.
SETTLE_RETRY_S = 90.0
MARK_LIFE = 4 / 3
MAX_BATCH = 256            # operations per script call (its ARGV stays far below Lua's unpack limit)
SETTLE_DELAY_S = 0.05      # the longest a settlement that only lowers a charge waits for a ride
RAISE_DELAY_S = 0.01       # ... and one that raises a charge (a round trip per response costs more than it)
SLOT_LIFE_S = 1.0          # how long reserved admissions may be handed out (redis_slots.py)
SLOT_MARGIN_S = 0.05       # handed out no later than this before Redis's idea of their end
MAX_SLOTS = 256            # reserved with one admission at most
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError, ClusterDownError, MasterDownError,
         RedisClusterUnreachableError)


def cluster_url(url: str) -> str | None:
    """For a `redis+cluster://` (or `rediss+cluster://`) URL, its first node's plain URL (credentials, TLS,
    options: settings.redis_cluster_nodes); None for a single Redis's URL."""
    found = redis_cluster_nodes(url)
    return found[0] if found else None


@dataclass(eq=False)
class RedisGrant(Grant):
    gid: str = ""
    keys: tuple[str, ...] = ()          # every bound scope's base key
    lease_keys: tuple[str, ...] = ()    # those holding a concurrency lease
    day: str = ""
    month: str = ""
    local: Grant | None = None          # admitted by the local fallback while Redis was down
    ends: tuple[float, float] = (0.0, 0.0)   # a local grant's day and month ends (Redis's clock), for _repay


@dataclass(eq=False)
class _Unsettled:
    keys: tuple[str, ...]
    args: tuple[Any, ...]     # grant id, token delta, day, month, cancel (1: a slot never used)
    wait_s: float = 0.0       # the longest it waits for a ride; 0: it goes now (it frees a lease)
    due: float = 0.0          # the loop's time by which it goes, set when queued
    first_mark: str = ""      # the mark of the first batch it was sent in ('' never sent): a retry is
                              # skipped by Redis if that batch ran, so it is applied exactly once ...
    deadline_ms: int = 0      # ... if it runs before this (Redis's clock, ms), set at the first send
    ends: tuple[int, int] | None = None   # a repayment (_repay): its day's and month's end (Redis's clock, ms)


@dataclass(eq=False)
class _Admission:
    keys: tuple[str, ...]
    args: list[Any]           # scope count, grant id, tokens, day, month, ms to day end, ms to month end,
                              # slots wanted, request (1) or reservation alone (0), limits...
    answer: asyncio.Future[list[Any]]


@dataclass(eq=False)
class _Held:
    leases: dict[str, tuple[str, ...]] = field(default_factory=dict)   # grant id -> base keys with a lease


class RedisLimiter(Limiter):
    """The shared limiter of replicas on one Redis (`url`); `prefix` namespaces its keys.

    A `redis+cluster://host:port[,host:port...]` URL (`rediss+cluster://` with TLS) selects Redis Cluster: the
    cluster client, and the prefix given a hash tag (redis_scripts.cluster_prefix) so every key is in
    one slot. Any other URL keeps the single-Redis client and key names of earlier versions.
    """

    def __init__(self, url: str, *, prefix: str = "seekgate:limits:", lease_s: float = 30.0,
                 timeout_s: float = 0.5, pool_size: int = 32, on_backend_down: str = "closed",
                 on_backend: Callable[[bool, bool], None] | None = None,
                 probe_interval_s: float = 0.5, clock: Callable[[], float] = time.time,
                 settle_retry_s: float = SETTLE_RETRY_S,
                 on_settlement_dropped: Callable[[str], None] | None = None) -> None:
        if on_backend_down not in BACKEND_DOWN_MODES:
            raise ValueError(f"on_backend_down must be one of {BACKEND_DOWN_MODES}, got {on_backend_down!r}")
        cluster = redis_cluster_nodes(url)
        self.cluster = cluster is not None
        self.prefix = cluster_prefix(prefix) if self.cluster else prefix
        self.lease_ms = max(1000, int(lease_s * 1000))
        self.mode = on_backend_down
        self.clock = clock
        # Redis's clock minus this process's (seconds), read at start, on recovery and with each lease
        # renewal: a request is charged to the UTC day and month Redis is in, so replicas whose clocks
        # disagree still share one budget window (one a minute ahead would open tomorrow's early).
        self._skew = 0.0
        # Redis's clock minus time.monotonic(), for settlements' deadlines: a step of this host's wall
        # clock must not move a deadline past the marks' life.
        self._mono_skew = time.time() - time.monotonic()   # this host's wall clock until Redis's is read
        self._retry_ms = int(settle_retry_s * 1000)
        self._mark_ms = int(settle_retry_s * 1000 * MARK_LIFE)
        self._on_dropped = on_settlement_dropped or (lambda reason: None)
        self._on_backend = on_backend or (lambda up, local: None)
        self._probe_interval_s = probe_interval_s
        self._redis: aioredis.Redis | RedisCluster
        self._batch_conn: AbstractConnection | None = None
        if cluster is not None:
            node_url, nodes = cluster
            # The cluster client routes each call to the node that owns its keys' slot (all of them in
            # one: the tagged prefix) and follows MOVED/ASK when slots move or a replica takes over.
            # No retries of its own: a batch is not idempotent (one sent again after its answer was
            # lost would settle twice), so only this limiter retries, with the batch's mark. A node
            # that fails a call makes Redis count as down at once, as one Redis does after timeout_s;
            # the probe asks the cluster again where the slot lives and takes counting back.
            # (MOVED and ASK are redirects, not retries: the client still follows them.)
            # Every node the URL names is a start node: a process started while the first is down (a
            # master lost in a failover, not back yet) finds the cluster through another.
            self._redis = RedisCluster.from_url(
                node_url, startup_nodes=[ClusterNode(host, port) for host, port in nodes[1:]],
                max_connections=pool_size, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                decode_responses=True, retry=Retry(NoBackoff(), 0))
        else:
            # A bounded pool that queues: a burst waits for a connection instead of opening hundreds. The
            # wait for a free one is longer than timeout_s: a busy pool is not a Redis that is down.
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=pool_size, timeout=max(5.0, timeout_s), socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s, decode_responses=True)
            self._redis = aioredis.Redis(connection_pool=pool)
            # The batches go over a connection of their own, written to directly: redis-py's command
            # path (pool checkout, response callbacks) costs as much as the round trip itself.
            self._batch_conn = pool.make_connection()
        self._batch_sha = hashlib.sha1(BATCH.encode()).hexdigest()
        self.round_trips = 0   # batches sent (tests and debugging: a burst shares them)
        self._renew = self._redis.register_script(RENEW)
        self._instance = secrets.token_hex(6)   # grant ids unique across replicas and restarts
        self._next = 0
        self._held = _Held()
        self._admissions: list[_Admission] = []    # waiting for the next batch
        self._settlements: list[_Unsettled] = []   # likewise
        self._urgent = 0                            # settlements among them that must not wait
        self._settle_due: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task[None] | None = None   # the batch in flight, if any
        self._unsettled: list[_Unsettled] = []     # kept while Redis is down
        # Tokens admitted by the local fallback, owed to the shared budgets:
        # (base key, day, month) -> [tokens, day end, month end] (Redis's clock, seconds)
        self._owed: dict[tuple[str, str, str], list[Any]] = {}
        self._local = LocalLimiter(clock=clock)
        self._slots = SlotBook(SLOT_LIFE_S, MAX_SLOTS)
        self.up = True
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            await self._sync_clock()
        except _DOWN as exc:   # start anyway: requests fail closed (or go local) until the probe finds it
            self._went_down(exc)
        else:
            self._on_backend(True, False)
        self._loop_task = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        self._stopping.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._sender is not None:
            await self._sender   # what is out is answered first: a reservation among it adds its slots
        for pool in self._slots.drain():
            self._cancel_slots(pool)
        if self.up and self._settlements:
            self._urgent += 1   # the last settlements go now
            self._kick()
        if self._sender is not None:
            await self._sender
        if self.up:
            self._repay()
            await self._flush_unsettled()   # the repayments with them: what Redis did not take is dropped below
        # Redis down at the end: nothing will send them. Those still waiting for a ride count too: Redis was
        # found down (by a clock read, not a batch, which would have kept them) before their timer fired.
        for job in [*self._unsettled, *self._settlements]:
            self._drop(job, "shutdown", "Redis was unreachable when the limiter closed")
        self._unsettled, self._settlements = [], []
        self._drop_owed("Redis was unreachable when the limiter closed")
        if self._settle_due is not None:
            self._settle_due.cancel()
        if self._batch_conn is not None:
            await self._batch_conn.disconnect()
        await self._redis.aclose()

    # ------------------------------------------------------------------ admission

    async def acquire(self, scopes: Sequence[Scope], tokens: int) -> Grant:
        bound = [s for s in scopes if not s.limits.unlimited()]
        if not bound:
            return Grant((), tokens)   # nothing to count: no round trip
        day, month, to_day, to_month = _windows(self.clock() + self._skew)
        keys = tuple(self._key(s.key_id) for s in bound)
        limits = [(s.limits.rpm, s.limits.tpm, s.limits.concurrency, s.limits.daily_tokens, s.limits.monthly_tokens)
                  for s in bound]
        key_ids = tuple(s.key_id for s in bound)
        lease_keys = tuple(k for k, s in zip(keys, bound, strict=True) if s.limits.concurrency)
        # Concurrency is a lease per running request: no slots for a shape that holds one.
        shape = None if lease_keys else (keys, tuple(limits), tokens, day, month)
        if shape is not None and (slot := self._slots.take(shape)) is not None:
            gid, pool = slot   # counted in Redis already, Redis up or not
            if self.up and (wanted := self._slots.refill(shape)):
                self._reserve(shape, keys, limits, tokens, day, month, to_day, to_month, wanted)
            return RedisGrant(key_ids, tokens, rpm_window=pool.next_window(), gid=gid, keys=keys, day=day, month=month)
        if not self.up:
            return self._fallback(bound, tokens)
        gid = self._new_gid()
        wanted = 0
        if shape is not None:
            wanted = self._slots.reserve(shape)
            self._slots.to_redis(shape, +1)
        asked_at = self._slots.clock()
        admission = self._admit(keys, limits, gid, tokens, day, month, to_day, to_month, wanted, request=True)
        try:
            # Shielded: a request cancelled while its batch is out must still learn the answer.
            answer = await asyncio.shield(admission.answer)
        except _DOWN:
            return self._fallback(bound, tokens)
        except asyncio.CancelledError:
            if admission in self._admissions:   # never sent: nothing was charged
                self._admissions.remove(admission)
                admission.answer.cancel()
            else:   # its batch was out: undo its charge, if the answer says it made one (the request never ran)
                admission.answer.add_done_callback(
                    lambda answer: self._undo_cancelled(answer, keys, gid, tokens, day, month, bool(lease_keys),
                                                        shape, asked_at))
            raise
        finally:
            if shape is not None:
                self._slots.to_redis(shape, -1)
            if wanted:
                self._slots.reserved(shape)
        if int(answer[0]) == 0:
            _, index, kind, limit, remaining, reset_ms, retry_ms = answer
            raise OverLimit(str(kind), bound[int(index) - 1], int(limit), int(remaining),
                            int(reset_ms) / 1000.0, int(retry_ms) / 1000.0)
        window = self._keep_slots(shape, keys, tokens, day, month, gid, asked_at, answer)
        grant = RedisGrant(key_ids, tokens, rpm_window=window,
                           gid=gid, keys=keys, lease_keys=lease_keys, day=day, month=month)
        if lease_keys:
            self._held.leases[gid] = lease_keys
        return grant

    def _undo_cancelled(self, answer: asyncio.Future[list[Any]], keys: tuple[str, ...], gid: str, tokens: int,
                        day: str, month: str, leased: bool, shape: Any, asked_at: float) -> None:
        """Takes back the charge of an admission whose request was cancelled while its batch was out.

        Only an admitted one: a refusal charged nothing, and crediting its tokens to the budgets would
        let a client that leaves at once hand itself back what it never got. An answer lost with its
        batch keeps whatever it charged (stricter, never looser; a lease expires on its own).
        """
        if answer.cancelled() or answer.exception() is not None or int(answer.result()[0]) != 1:
            return
        self._enqueue_settlement(_Unsettled(keys, (gid, -tokens, day, month, 0),
                                            wait_s=0.0 if leased else SETTLE_DELAY_S))
        # The slots the admission reserved were charged too (each like a request, tokens and budgets
        # included): kept like any reservation's, handed to the next requests or cancelled when their
        # life ends. Dropped here, nothing would ever give them back and the key lost their tokens.
        self._keep_slots(shape, keys, tokens, day, month, gid, asked_at, answer.result())

    def _new_gid(self) -> str:
        self._next += 1
        return f"{self._instance}:{self._next}"

    def _admit(self, keys: tuple[str, ...], limits: list[tuple[int, int, int, int, int]], gid: str, tokens: int,
               day: str, month: str, to_day: float, to_month: float, wanted: int, *, request: bool) -> _Admission:
        """Queues one admission (or, `request` False, a reservation of slots alone) for the next batch."""
        args: list[Any] = [len(keys), gid, tokens, day, month, int(to_day * 1000), int(to_month * 1000), wanted,
                           1 if request else 0]
        for five in limits:
            args += five
        admission = _Admission(keys, args, asyncio.get_running_loop().create_future())
        self._admissions.append(admission)
        self._kick()
        return admission

    def _keep_slots(self, shape: Any, keys: tuple[str, ...], tokens: int, day: str, month: str, gid: str,
                    asked_at: float, answer: list[Any]) -> tuple[int, int, float] | None:
        """Keeps the slots an admitted answer reserved; returns its rpm window for X-RateLimit-*."""
        _, _, w_limit, w_left, w_reset, slots = (int(v) for v in answer)
        window = (w_limit, w_left, w_reset / 1000.0) if w_limit else None
        if slots and shape is not None:
            self._slots.add(shape, SlotPool(keys, tokens, day, month, [f"{gid}#{i}" for i in range(slots, 0, -1)],
                                            expires=asked_at + SLOT_LIFE_S - SLOT_MARGIN_S, window=window))
        return window

    def _reserve(self, shape: Any, keys: tuple[str, ...], limits: list[tuple[int, int, int, int, int]], tokens: int,
                 day: str, month: str, to_day: float, to_month: float, wanted: int) -> None:
        """Tops up a busy key's slots in the background while some are left: no request waits for it."""
        gid, asked_at = self._new_gid(), self._slots.clock()
        admission = self._admit(keys, limits, gid, tokens, day, month, to_day, to_month, wanted, request=False)

        def done(answer: asyncio.Future[list[Any]]) -> None:
            self._slots.reserved(shape)
            if not answer.cancelled() and answer.exception() is None and int(answer.result()[0]) == 1:
                self._keep_slots(shape, keys, tokens, day, month, gid, asked_at, answer.result())

        admission.answer.add_done_callback(done)

    def _cancel_slots(self, pool: SlotPool) -> None:
        """Gives back reserved admissions never handed out (stricter while they wait for a ride)."""
        for gid in pool.gids:
            self._enqueue_settlement(_Unsettled(pool.keys, (gid, -pool.tokens, pool.day, pool.month, 1),
                                                wait_s=SETTLE_DELAY_S))
        pool.gids = []

    def refusing(self) -> bool:
        return not self.up and self.mode == "closed"

    def _fallback(self, bound: Sequence[Scope], tokens: int) -> Grant:
        if self.mode == "closed":
            raise StoreUnavailable("limiter_unavailable: redis")
        local = self._local.acquire_now(bound, tokens)
        now = self.clock() + self._skew
        day, month, to_day, to_month = _windows(now)
        return RedisGrant(local.key_ids, tokens, rpm_window=local.rpm_window, local=local,
                          keys=tuple(self._key(s.key_id) for s in bound), day=day, month=month,
                          ends=(now + to_day, now + to_month))

    def settle(self, grant: Grant, tokens: int) -> None:
        if grant.settled:
            return
        grant.settled = True
        if not isinstance(grant, RedisGrant):
            return   # an unlimited request: nothing held
        if grant.local is not None:
            self._local.settle(grant.local, tokens)
            self._owe(grant, tokens)
            return
        held = self._held.leases.pop(grant.gid, None) is not None
        delta = tokens - grant.tokens
        if not held and delta == 0:
            return   # the charge stands as made: nothing to write
        wait_s = 0.0 if held else RAISE_DELAY_S if delta > 0 else SETTLE_DELAY_S
        job = _Unsettled(grant.keys, (grant.gid, delta, grant.day, grant.month, 0), wait_s=wait_s)
        if not self.up:
            self._keep(job)
            return
        self._enqueue_settlement(job)

    def _owe(self, grant: RedisGrant, tokens: int) -> None:
        """A local grant's tokens, to be added to the shared budgets of its day and month."""
        if tokens <= 0:
            return
        for key in grant.keys:
            self._add_owed(key, grant.day, grant.month, tokens, grant.ends)
        if self.up:   # settled after Redis came back
            self._repay()

    def _add_owed(self, key: str, day: str, month: str, tokens: int, ends: tuple[float, float]) -> None:
        owed = self._owed.setdefault((key, day, month), [0, *ends])
        owed[0] += tokens

    def _repay(self) -> None:
        """Adds what the local fallback admitted to Redis's day and month budgets: one settlement per key,
        day and month, of a grant id of its own, that raises the budgets by the tokens (creating a
        missing budget's key with the expiry a charge gives it, redis_scripts.BATCH).

        As a settlement it is applied exactly once or not at all: one whose batch's answer was lost is
        sent again with that batch's mark, and Redis skips it if the batch ran. (Sent as an admission,
        it was owed again whenever its answer was lost, and charged a second time at the next recovery.)
        It goes at once: it is sent on recovery, at close, and when a local grant ends after recovery."""
        owed, self._owed = self._owed, {}
        for (key, day, month), (tokens, day_end, month_end) in owed.items():
            self._enqueue_settlement(_Unsettled((key,), (self._new_gid(), tokens, day, month, 0),
                                                ends=(int(day_end * 1000), int(month_end * 1000))))

    def _drop_owed(self, why: str) -> None:
        """Tokens the local fallback admitted that will never reach the shared budgets (the limiter is
        closing and Redis did not take them): said in the log, one line per key, day and month (enough
        to correct the budgets by hand), and counted like a dropped settlement, reason `shutdown`."""
        owed, self._owed = self._owed, {}
        for (key, day, month), (tokens, _, _) in owed.items():
            self._said_unrepaid(why, tokens, key, day, month)
            self._on_dropped("shutdown")

    def _said_unrepaid(self, why: str, tokens: int, key: str, day: str, month: str, *,
                       maybe_added: bool = False) -> None:
        """The log line of a repayment left out: `maybe_added`, one sent whose answer was lost (it may have run)."""
        log.error("limits: tokens admitted under limits.on_backend_down=local not added to the shared "
                  "budgets (%s): %+d tokens on %s for day %s, month %s; that day's and month's budgets "
                  "may be short by that much%s", why, tokens, key.removeprefix(self.prefix), day, month,
                  " (or not: a send of it whose answer was lost may have added them)" if maybe_added else "")

    def _enqueue_settlement(self, job: _Unsettled) -> None:
        job.due = asyncio.get_running_loop().time() + job.wait_s
        self._settlements.append(job)
        if job.wait_s <= 0:
            self._urgent += 1
            self._kick()
        else:
            self._settle_by(job.due)

    def _settle_by(self, due: float) -> None:
        """Makes sure a batch goes by `due` (loop time): a timer, unless one set for earlier is pending."""
        if self._settle_due is not None:
            if self._settle_due.when() <= due:
                return
            self._settle_due.cancel()
        self._settle_due = asyncio.get_running_loop().call_at(due, self._settle_now)

    def _settle_now(self) -> None:
        self._settle_due = None
        if not self._settlements:
            return
        # The ones this timer was set for may have ridden a batch since: wait for the next due.
        due = min(job.due for job in self._settlements)
        if due > asyncio.get_running_loop().time() + 0.001:
            self._settle_by(due)
            return
        self._urgent += 1
        self._kick()

    # ------------------------------------------------------------------ batches

    def _kick(self) -> None:
        """Starts a batch unless one is in flight (its sender takes what waits when it returns)."""
        if self._sender is None and (self._admissions or self._urgent):
            self._sender = asyncio.get_running_loop().create_task(self._send_batches())

    async def _send_batches(self) -> None:
        try:
            while self._admissions or (self._urgent and self._settlements):
                admissions = self._admissions[:MAX_BATCH]
                del self._admissions[:MAX_BATCH]
                settlements = self._settlements[:MAX_BATCH]
                del self._settlements[:MAX_BATCH]
                self._urgent = 0 if not self._settlements else self._urgent
                if not self.up:
                    self._fail(admissions, settlements, None)
                    continue
                settlements = self._in_time(settlements)
                if admissions or settlements:
                    await self._run(admissions, settlements)
        finally:
            self._sender = None
        if self._settlements and not self._stopping.is_set():
            self._settle_by(min(job.due for job in self._settlements))

    async def _run(self, admissions: list[_Admission], settlements: list[_Unsettled]) -> None:
        """One script call for these operations, answering each admission."""
        keys, args = self._batch_call(admissions, settlements)
        try:
            replies, failed, late = await self._run_batch(keys, args)
        except _DOWN as exc:
            # The script may have run before the answer was lost: its charges stand (stricter,
            # never looser) and its leases expire on their own.
            self._went_down(exc)
            self._fail(admissions, settlements, exc)
            return
        except RedisError as exc:   # the whole call refused (out of memory, say): refuse, never admit unmetered
            log.error("limits: Redis failed a batch of %d admissions and %d settlements: %s",
                      len(admissions), len(settlements), exc)
            self._fail(admissions, settlements, StoreUnavailable(f"limiter_unavailable: {exc}"))
            return
        except Exception as exc:   # anything else must refuse the batch too: a request never waits on no answer
            log.exception("limits: a batch of %d admissions and %d settlements failed", len(admissions),
                          len(settlements))
            self._fail(admissions, settlements, StoreUnavailable(f"limiter_unavailable: {type(exc).__name__}"))
            return
        for error in failed:   # dropped: it would fail again (its lease, if any, expires on its own)
            log.error("limits: Redis failed a settlement: %s", error)
            self._on_dropped("redis_error")
        try:
            if late:   # sent again too late to tell whether an earlier send applied it: Redis left it out
                gone = set(late)
                for job in settlements:
                    if job.args[0] in gone:
                        self._drop(job, "retry_horizon", "Redis received it past its retry horizon")
            for adm, reply in zip(admissions, replies, strict=True):
                if adm.answer.done():
                    continue
                if int(reply[0]) == -1:   # Redis failed this one alone (its batch went on): refuse, not admit
                    log.error("limits: Redis failed an admission: %s", reply[1])
                    adm.answer.set_exception(StoreUnavailable(f"limiter_unavailable: {reply[1]}"))
                else:
                    adm.answer.set_result(reply)
        except (ValueError, TypeError, IndexError) as exc:   # replies of a shape the script never gives
            log.error("limits: unreadable answer to a batch of %d admissions: %s", len(admissions), exc)
            self._fail(admissions, [], StoreUnavailable("limiter_unavailable: unreadable answer"))

    def _batch_call(self, admissions: list[_Admission], settlements: list[_Unsettled]) -> tuple[list[str], list[Any]]:
        """BATCH's KEYS and ARGV for these operations: every key it touches is one of KEYS."""
        mark = f"{self.prefix}batch:{self._new_gid()}" if settlements else ""
        keys: list[str] = [mark] if mark else []
        args: list[Any] = [len(settlements), len(admissions), self.lease_ms, int(SLOT_LIFE_S * 1000),
                           "1" if mark else "", self._mark_ms]
        for job in settlements:
            gid, _, day, month, _ = job.args
            for base in job.keys:
                keys += scope_keys(base, day, month)
            keys.append(settled_key(self.prefix, gid))
            resent = bool(job.first_mark)
            if resent:
                keys.append(job.first_mark)
            else:
                job.first_mark, job.deadline_ms = mark, self._redis_ms() + self._retry_ms
            args += [len(job.keys), *job.args, job.deadline_ms, "1" if resent else "", *(job.ends or ("", ""))]
        for adm in admissions:
            day, month = adm.args[3], adm.args[4]
            for base in adm.keys:
                keys += scope_keys(base, day, month)
            args += adm.args
        return keys, args

    async def _run_batch(self, keys: list[str], args: list[Any]) -> list[Any]:
        self.round_trips += 1
        conn = self._batch_conn
        if conn is None:   # Redis Cluster: through the client, which sends it to the slot's node
            try:
                return list(await self._redis.evalsha(self._batch_sha, len(keys), *keys, *args))
            except NoScriptError:
                return list(await self._redis.eval(BATCH, len(keys), *keys, *args))
        await _fresh(conn)
        try:
            try:
                await conn.send_packed_command(_pack_call("EVALSHA", self._batch_sha, keys, args),
                                               check_health=False)
                return list(await conn.read_response())
            except NoScriptError:   # a restarted Redis forgot it: EVAL sends the text and caches it again
                await conn.send_packed_command(_pack_call("EVAL", BATCH, keys, args),
                                               check_health=False)
                return list(await conn.read_response())
        except BaseException:
            # Whatever was cut off mid-reply (a timeout, a cancel) must not be read as the next answer.
            await conn.disconnect()
            raise

    def _fail(self, admissions: list[_Admission], settlements: list[_Unsettled],
              error: BaseException | None) -> None:
        """Answers a batch that could not run: its admissions fall back (or fail), its settlements wait."""
        for adm in admissions:
            if not adm.answer.done():
                adm.answer.set_exception(error if isinstance(error, StoreUnavailable) else RedisConnectionError("down"))
        for job in settlements:
            self._keep(job)

    def _keep(self, job: _Unsettled) -> None:
        self._unsettled.append(job)
        if len(self._unsettled) > MAX_UNSETTLED:
            self._drop(self._unsettled.pop(0), "overflow", f"more than {MAX_UNSETTLED} settlements waited for Redis")

    def _in_time(self, settlements: list[_Unsettled]) -> list[_Unsettled]:
        """Those still to be sent: one sent before whose retry horizon has passed is dropped here (its
        first batch may have applied it, and the marks that would say so may be gone)."""
        now = self._redis_ms()
        keep = []
        for job in settlements:
            if job.first_mark and now >= job.deadline_ms:
                self._drop(job, "retry_horizon", "its answer was lost and its retry horizon has passed")
            else:
                keep.append(job)
        return keep

    def _drop(self, job: _Unsettled, reason: str, why: str) -> None:
        """A settlement left unapplied, on purpose: said in the log (enough to correct the budgets by
        hand) and counted (`reason`: one of metrics.SETTLEMENT_DROP_REASONS). Its lease, if it held
        one, expires on its own."""
        gid, delta, day, month, cancel = job.args
        if job.ends is not None:   # a repayment
            self._said_unrepaid(why, delta, job.keys[0], day, month, maybe_added=bool(job.first_mark))
            self._on_dropped(reason)
            return
        log.error("limits: settlement of %s not applied (%s): %s tokens on %s for day %s, month %s%s; "
                  "that day's and month's budgets may be off by that much", gid, why,
                  f"{delta:+d}", ", ".join(key.removeprefix(self.prefix) for key in job.keys), day, month,
                  " (an unused slot)" if cancel else "")
        self._on_dropped(reason)

    async def _flush_unsettled(self) -> None:
        """Redis is back: what was kept goes out, in batches."""
        pending, self._unsettled = self._unsettled, []
        for job in pending:
            job.wait_s = 0.0
        self._settlements[:0] = pending
        self._urgent += len(pending)
        self._kick()
        if self._sender is not None:
            await asyncio.shield(self._sender)

    # ------------------------------------------------------------------ backend health and leases

    def _went_down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        if self.mode == "local":
            log.warning("limits: Redis unreachable (%s): this replica now enforces its own limits alone "
                        "(limits.on_backend_down=local; replicas together may admit more)", exc or type(exc).__name__)
        else:
            log.error("limits: Redis unreachable (%s): refusing limited requests with 503 until it is back "
                      "(limits.on_backend_down=closed)", exc or type(exc).__name__)
        self._on_backend(False, self.mode == "local")

    async def _maintain(self) -> None:
        """Renews the leases of running requests while Redis is up; probes it while it is down."""
        renewed = time.monotonic()
        while not self._stopping.is_set():
            # Wakes every probe interval, so a Redis found down by a request is probed at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._probe_interval_s)
            if self._stopping.is_set():
                return
            for pool in self._slots.expired():
                self._cancel_slots(pool)
            try:
                if not self.up:
                    await self._sync_clock()
                    self.up = True
                    log.warning("limits: Redis reachable again: limits are shared across replicas again")
                    self._on_backend(True, False)
                    self._repay()
                    await self._flush_unsettled()
                elif time.monotonic() - renewed < self.lease_ms / 3000.0:
                    continue
                else:
                    await self._sync_clock()
                await self._renew_leases()
                renewed = time.monotonic()
            except _DOWN as exc:
                self._went_down(exc)
            except RedisError as exc:
                log.error("limits: lease renewal failed: %s", exc)

    async def _sync_clock(self) -> None:
        """Reads Redis's TIME (also the liveness probe): the offset is its clock against this one's."""
        before = self.clock()
        if self.cluster:   # the clock of the node that runs the scripts: the one owning the prefix's slot
            seconds, micros = (int(v) for v in await self._redis.eval(
                "return redis.call('TIME')", 1, f"{self.prefix}clock"))
        else:
            seconds, micros = await self._redis.time()
        after, mono_after = self.clock(), time.monotonic()
        self._skew = seconds + micros / 1e6 - (before + after) / 2
        # Redis read its clock no later than now: taken as now, the estimate is never ahead of Redis's
        # clock (behind by a round trip at most), so a deadline computed from it comes early, never late.
        self._mono_skew = seconds + micros / 1e6 - mono_after

    async def _renew_leases(self) -> None:
        held = list(self._held.leases.items())
        for start in range(0, len(held), 500):   # a bounded script call per 500 grants
            keys: list[str] = []
            gids: list[str] = []
            for gid, lease_keys in held[start:start + 500]:
                keys += [lease_key(k) for k in lease_keys]
                gids += [gid] * len(lease_keys)
            await self._renew(keys=keys, args=[self.lease_ms, *gids])

    def _redis_ms(self) -> int:
        """Redis's clock now (ms), as this replica estimates it (from the last TIME read)."""
        return int((time.monotonic() + self._mono_skew) * 1000)

    def _key(self, key_id: str) -> str:
        return f"{self.prefix}{key_id}"

    def in_flight_leases(self) -> int:
        """Grants of this process holding a lease (for tests and debugging)."""
        return len(self._held.leases)


async def _fresh(conn: AbstractConnection) -> None:
    """Drops the batch connection if the server closed it while it sat idle (a Redis restarted or failed
    over between two batches), so the next send opens a new one.

    The batches bypass the pool, whose checkout does this check for every other command. Sent on the
    dead socket, a batch would fail once and count as an outage (a 503 under `closed`, a flip to the
    local fallback), and could not simply be sent again: its answer lost, nothing would tell whether it
    ran. Checked before the send, nothing has left, so nothing can apply twice. The check costs no
    system call: the event loop has already read the server's close (EOF or a reset) off the socket.
    """
    if not conn.is_connected:
        return
    try:
        # Bytes waiting between two batches would be an answer out of step: never read as the next one.
        stale = await conn.can_read()
    except (RedisConnectionError, OSError):   # closed by the server (EOF or reset)
        stale = True
    if stale:
        await conn.disconnect()


def _pack_call(command: str, script: str, keys: list[str], args: Sequence[str | int]) -> bytes:
    """EVAL/EVALSHA `script` with `keys` and `args` in RESP. A scope's keys recur from batch to batch
    (six per scope, settlements and admissions alike): each is encoded once, then reused."""
    head = _pack([command, script, len(keys)])
    return b"".join([b"*%d\r\n" % (3 + len(keys) + len(args)), head[head.index(b"\r\n") + 2:],
                     *map(_bulk_key, keys), _pack(args)[len(b"*%d\r\n" % len(args)):]])


@lru_cache(maxsize=16384)
def _bulk_key(key: str) -> bytes:
    data = key.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _pack(args: Sequence[str | int]) -> bytes:
    """One command in RESP. redis-py's pack_command inspects and converts each value on its own: for
    a batch's hundreds of arguments that cost more than the round trip."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            raise TypeError(f"a limiter script argument must be str or int, got {type(arg).__name__}")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)
