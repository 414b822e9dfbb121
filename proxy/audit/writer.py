"""Audit trail: one record per request, written off the hot path (or durably, in strict mode) to JSONL and SQLite."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..context import RequestContext, new_id
from ..errors import AuditUnavailable
from .index import FIELDS, OPTIONAL_FIELDS, AuditIndex, query_audit
from .jsonl import (
    ACTIVE,
    JsonlFile,
    dumps,
    last_records,
    line_of,
    rotated_files,
    rotated_of,
    tail_audit,
    tail_stream,
)
from .pg_index import SharedAuditIndex
from .pg_index import prune as shared_prune
from .retention import RetentionClock, expired_files

__all__ = ["FIELDS", "AuditWriter", "admin_record", "build_record", "query_audit", "rotated_files", "tail_audit"]

log = logging.getLogger(__name__)

def _iso_utc(epoch: float) -> str:
    """2026-11-29T09:00:00.123Z; the part up to the second is formatted once per second."""
    millis = int(epoch * 1000)
    return f"{_iso_second(millis // 1000)}.{millis % 1000:03d}Z"


@lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def build_record(ctx: RequestContext, duration_ms: float | None = None) -> dict[str, Any]:
    """The audit record for a finished request. `duration_ms` defaults to time since start."""
    p, r = ctx.principal, ctx.resource
    elapsed = ctx.elapsed_ms() if duration_ms is None else duration_ms
    record: dict[str, Any] = {
        "timestamp": _iso_utc(ctx.started_wall),
        "event_id": new_id(),
        "request_id": ctx.request_id,
        "actor": p.owner if p else None,
        "key_id": p.key_id if p else None,
        "tier": p.tier if p else None,
        "action": r.action if r else None,
        "resource": r.resource if r else None,
        "model": r.model if r else None,
        "status": ctx.status,
        "http_status": ctx.http_status,
        "reason": ctx.reason,
        "client_ip": ctx.client_ip,
        "duration_ms": round(elapsed, 3),
        "upstream_ms": None if ctx.upstream_ms is None else round(ctx.upstream_ms, 3),
        "input_tokens": ctx.input_tokens,
        "output_tokens": ctx.output_tokens,
        "protocol": ctx.protocol,
        "method": ctx.method,
        # A query string can carry a credential (?api_key=...); the record never does.
        "path": ctx.path.split("?", 1)[0],
        "rule": ctx.rule,
        # Whose subtree this principal is in: the leak report finds a leaked key's sessions by it.
        "parent_key_ids": list(p.parents) if p and p.parents else None,
    }
    if ctx.peer_cert is not None:
        # mTLS: which certificate carried the request (the fingerprint pins it; subject and SANs name it).
        c = ctx.peer_cert
        record["client_cert"] = {"fingerprint": c.fingerprint, "subject": c.subject, "sans": list(c.sans)}
    if ctx.extra.get("openai") is not None:
        # The OpenAI API (/v1): its endpoint and the `user` the client named, as OpenAI's own logs keep it.
        record["openai"] = ctx.extra["openai"]
    if ctx.extra.get("admin_action"):
        # Admin calls say who (actor, key_id above) did what to which key; only ids, never a secret.
        # before/after: the public views of the key records it changed (admin/keys.py), never a secret or hash.
        record["admin"] = {k: ctx.extra[f"admin_{k}"] for k in ("action", "target", "detail", "before", "after")
                           if ctx.extra.get(f"admin_{k}") is not None}
    return record


def admin_record(actor: str, protocol: str, action: str, target: str | None = None, *, detail: Any = None,
                 before: dict[str, Any] | None = None, after: dict[str, Any] | None = None) -> dict[str, Any]:
    """An administrative change made outside a request (the CLI, a scheduled rotation), shaped like an
    admin API call's record; ids and public views only, never a secret. The writer adds time and ids."""
    admin = {k: v for k, v in (("action", action), ("target", target), ("detail", detail),
                               ("before", before), ("after", after)) if v is not None}
    # The resource the same operation has through the admin API (admin/crypto.py for crypto.*).
    resource = "admin:crypto" if action.startswith("crypto.") else "admin:keys"
    return {"actor": actor, "action": "admin", "resource": resource, "status": "allowed",
            "reason": action, "protocol": protocol, "admin": admin}


class AuditWriter:
    """Single background task: batches queued records into audit.jsonl and audit.db.

    Durability: in `batched` mode the JSONL file is fsynced at least every `fsync_interval_s`
    while anything is unsynced, so a crash of the host loses at most that window (a kill -9 of
    the process loses only what is still queued: written lines are in the page cache). In `strict`
    mode every batch is fsynced before the records' `submit_durable` futures resolve: group
    commit, one fsync for every request that arrived while the previous one ran. The JSONL file
    is the durable record; audit.db is the queryable index, committed right after in the same cycle
    (with `store.url` on PostgreSQL, the shared table instead: `share()`).

    A failed write keeps its batch and retries with backoff (calling `on_error` per
    failure), so records are delayed, never dropped. `close()` drains everything.
    """

    def __init__(self, data_dir: Path, max_bytes: int = 100 * 1024 * 1024,
                 retention_days: int = 180, on_error: Callable[[], None] | None = None,
                 *, batch_size: int = 512, retry_base_s: float = 0.1, retry_max_s: float = 5.0,
                 fsync_interval_s: float = 0.1, durability: str = "batched", file_name: str = ACTIVE,
                 queue_max: int | None = None, batch_linger_s: float = 0.0, queue_soft_max: int = 0,
                 room_wait_s: float = 1.0, clock: RetentionClock | None = None) -> None:
        self.dir = Path(data_dir) / "audit"
        self.db_path = self.dir / "audit.db"
        # Retention's idea of now (capped by elapsed time: a forward clock step deletes nothing early);
        # its wall clock also stamps rotated names.
        self.clock = clock or RetentionClock(state=self.dir / ".retention-clock")
        self.file = JsonlFile(self.dir, max_bytes, file_name, wall=self.clock.wall)
        self.jsonl_path = self.file.path
        self.retention_days = retention_days
        self.on_error = on_error
        self.strict = durability == "strict"
        self.queue_max = queue_max
        self.queue_soft_max = queue_soft_max
        self._room_wait_s = room_wait_s
        self._progress = asyncio.Event()   # set (and at once cleared) after every batch written
        self.dropped_refusals = 0
        # False from a failed JSONL write until the next one succeeds; strict mode refuses meanwhile.
        self.healthy = True
        self._batch_size = batch_size
        self._retry = (retry_base_s, retry_max_s)
        self._fsync_interval = fsync_interval_s
        # Batched mode: how long a batch waits for company after its first record. At low concurrency
        # a write per record (a thread hand-off, a write(2), an index commit) costs more CPU than the
        # request it records; strict mode never waits, its callers are waiting already.
        self._linger = 0.0 if self.strict else max(0.0, min(batch_linger_s, fsync_interval_s))
        # Records; None: close; a Future: a flush() barrier, resolved once what precedes it is persisted.
        self._queue: asyncio.Queue[dict[str, Any] | None | asyncio.Future[None]] = asyncio.Queue()
        self._inflight: list[dict[str, Any]] = []
        self._waiters: dict[str, asyncio.Future[None]] = {}   # event_id -> durable-write future
        self._task: asyncio.Task[None] | None = None
        self._index: AuditIndex | None = AuditIndex(self.db_path)   # None once the index is the shared one
        # Records in audit.jsonl not yet in audit.db (the index was locked or failing), oldest first,
        # retried with backoff while the writer goes on: a locked index never holds the file back.
        self._unindexed: list[dict[str, Any]] = []
        self._index_attempt = 0
        self._index_retry_at = 0.0           # monotonic; no index attempt before it but a flush()'s
        self._index_barriers: list[asyncio.Future[None]] = []   # flush() calls waiting for the backlog
        self._unsynced_since: float | None = None   # monotonic time of the oldest unsynced write
        self._next_prune = 0.0
        self._closed = False
        # Set by the server when store.url is PostgreSQL: every replica's records, indexed off this loop.
        self.shared: SharedAuditIndex | None = None

    def share(self, pool: Any, replica: str) -> None:
        """Index into the shared PostgreSQL table instead of audit.db (before start()).

        Every reader of a replica on PostgreSQL (audit query, the admin search and usage, the leak
        report) reads the shared table, so a local audit.db would be written and never read: on the
        request loop's CPU, 13 us a record. The JSONL file stays the durable record and the shared
        index's catch-up source.
        """
        self._index = None
        # The catch-up after an outage re-reads the stream's last records, rotated files included: a long
        # outage rotates audit.jsonl, and the active file alone no longer holds what memory dropped.
        self.shared = SharedAuditIndex(pool, replica, reread=lambda n: [
            r for r in tail_stream([*rotated_of(self.dir, self.jsonl_path.name), self.jsonl_path], n)
            if "event_id" in r],
            mark=self.jsonl_path.with_name(self.jsonl_path.name + ".unindexed"))

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._index is not None:
            await asyncio.to_thread(self._index.open)   # a broken audit.db stops the start
        if self.shared is not None:
            self.shared.start()
        await self._recover()
        await self._prune_or_retry()   # a locked audit.db must not stop the start: its index catches up
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def backlogged(self) -> bool:
        """More records waiting than `queue_max`: the request path stops admitting (pipeline.audit_ready)."""
        return self.queue_max is not None and self.queue_depth() >= self.queue_max

    def behind(self) -> bool:
        """More than `queue_soft_max` records wait on a healthy log: a new request should wait for `room()`."""
        return bool(self.queue_soft_max) and self.queue_depth() >= self.queue_soft_max and self.healthy \
            and not self._closed

    async def room(self) -> None:
        """Backpressure: while the writer is `behind()`, return only once it caught up.

        A loop that outruns the writer (it shares the GIL with it) otherwise grows the queue until
        queue_max refuses requests, and RSS keeps the peak of every backlog. Waiting hands the writer
        the CPU it needs, so admissions settle at the rate the log can take. Never waits while the log
        is failing (the queue then fills up to queue_max, which refuses), nor longer than `room_wait_s`.
        """
        try:
            async with asyncio.timeout(self._room_wait_s):
                while self.behind():
                    await self._progress.wait()
        except TimeoutError:
            pass

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record; never blocks, never raises.

        Memory stays bounded when the log cannot keep up: once the backlog is over queue_max no
        request is admitted, so what still arrives is refusals, and past twice queue_max those
        are counted (`dropped_refusals`, logged) instead of queued. A served request's record is
        never dropped.
        """
        try:
            if self._closed:
                log.error("audit writer closed, record not persisted: %s", dumps(record))
                return
            if (self.queue_max is not None and record.get("status") != "allowed"
                    and self.queue_depth() >= 2 * self.queue_max):
                self.dropped_refusals += 1
                if self.dropped_refusals % 1000 == 1:
                    log.error("AUDIT BACKLOG: %d refusal records not kept so far (queue at %d)",
                              self.dropped_refusals, self.queue_depth())
                return
            self._queue.put_nowait(_complete(record))
        except Exception:  # the request path must not fail because of auditing
            log.exception("audit submit failed")

    def submit_durable(self, record: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a record; the future resolves once it is fsynced in audit.jsonl.

        It fails with AuditUnavailable when the writer is closed or the write fails: the caller
        refuses its response (fail closed) and the record is not kept, since the caller audits the
        refusal instead.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed or self._task is None:
            fut.set_exception(AuditUnavailable("audit_writer_closed"))
            return fut
        record = _complete(record)
        self._waiters[record["event_id"]] = fut
        self._queue.put_nowait(record)
        return fut

    async def flush(self) -> None:
        """Wait until every record submitted before this call is in audit.jsonl and its index.

        For readers of the index that must see the latest uses (the leak report). A failing write
        keeps the caller waiting while it is retried: bound the wait with asyncio.timeout.
        """
        if self._closed or self._task is None:
            return   # close() has drained everything, or nothing was ever written
        barrier: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(barrier)
        await barrier
        if self.shared is not None:
            await self.shared.flush()

    def queue_depth(self) -> int:
        """Records waiting to be written, including a batch being retried."""
        return self._queue.qsize() + len(self._inflight)

    async def close(self, timeout: float | None = 30.0) -> None:
        """Drain the queue, flush and fsync. After `timeout` give up and log what is left."""
        if self._closed:
            return
        self._closed = True
        left: list[dict[str, Any]] = []
        if self._task is None:
            left = self._records(self._drain_nowait())
        else:
            self._queue.put_nowait(None)  # FIFO: everything submitted before close goes first
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task})
                left = self._inflight + self._records(self._drain_nowait())
        self._resolve(left, AuditUnavailable("audit_writer_closed"))
        if self._unindexed:
            log.error("audit index: %d records in audit.jsonl not indexed at close; the next start re-indexes "
                      "the file's tail", len(self._unindexed))
        self._records(list(self._index_barriers))
        if left:
            log.error("audit writer could not persist %d records at close", len(left))
            for rec in left:  # last resort: the log is better than nowhere
                log.error("audit record not persisted: %s", dumps(rec))
        try:
            await asyncio.to_thread(self.file.close)
        except OSError:
            log.exception("audit file fsync/close failed")
        if self._index is not None:
            await asyncio.to_thread(self._index.close)
        if self.shared is not None:
            await self.shared.close()

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def prune(self, now: float | None = None) -> None:
        """Retention: drop rotated files and rows older than `retention_days`.

        Older by `self.clock` (never ahead of elapsed time), and a file by its newest record, not its name.
        """
        now = await asyncio.to_thread(self.clock.now) if now is None else now
        cutoff = now - self.retention_days * 86400
        await asyncio.to_thread(self._prune_files, cutoff, now)
        if self._index is not None:
            await asyncio.to_thread(self._index.prune, cutoff)
        self._next_prune = time.monotonic() + 3600
        if self.shared is not None:
            try:   # every replica may run it: it is idempotent, and serialised in PostgreSQL
                await shared_prune(self.shared.pool, cutoff)
            except Exception as exc:   # PostgreSQL away: the next hour's run catches up
                log.warning("shared audit retention failed: %s", exc)

    async def _prune_or_retry(self) -> None:
        """prune(); a failure (audit.db locked by another process) is logged and tried again in a minute,
        not after every batch: each try waits out the index's busy timeout on the writer's time."""
        try:
            await self.prune()
        except Exception:
            log.exception("audit retention failed")
            self._next_prune = time.monotonic() + 60

    # -- writer task -------------------------------------------------------------

    @staticmethod
    def _records(items: list[dict[str, Any] | None | asyncio.Future[None]]) -> list[dict[str, Any]]:
        """The records among drained queue items; flush barriers among them are released."""
        for item in items:
            if isinstance(item, asyncio.Future) and not item.done():
                item.set_exception(AuditUnavailable("audit_writer_closed"))
        return [item for item in items if isinstance(item, dict)]

    def _drain_nowait(self) -> list[dict[str, Any] | None | asyncio.Future[None]]:
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _next(self) -> dict[str, Any] | None | asyncio.Future[None]:
        """The next queued item; fsyncs an unsynced file when its window runs out while waiting, and
        retries an index backlog when its backoff does (an idle writer would otherwise hold it)."""
        while self._unsynced_since is not None or self._unindexed:
            sync_at = None if self._unsynced_since is None else self._unsynced_since + self._fsync_interval
            left = min(t for t in (sync_at, self._index_retry_at if self._unindexed else None)
                       if t is not None) - time.monotonic()
            if left > 0:
                try:
                    return await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    pass
            if sync_at is not None and time.monotonic() >= sync_at:
                try:
                    await asyncio.to_thread(self.file.fsync)
                    self._unsynced_since = None
                except OSError as exc:
                    self._failed(exc, 1, self._fsync_interval)
                    self._unsynced_since = time.monotonic()
            if self._unindexed and time.monotonic() >= self._index_retry_at:
                await self._index_backlog()
        return await self._queue.get()

    async def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[dict[str, Any]] = []
            barrier: asyncio.Future[None] | None = None
            item = await self._next()
            if self._linger and isinstance(item, dict) and self._queue.qsize() < self._batch_size:
                await asyncio.sleep(self._linger)
            while True:
                if item is None:
                    stop = True
                    break
                if isinstance(item, asyncio.Future):
                    barrier = item   # flush(): the batch ends here, released once it is persisted
                    break
                batch.append(item)
                if len(batch) >= self._batch_size or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                self._inflight = batch
                await self._persist(batch)
                self._inflight = []
                self._wake_room_waiters()
            if barrier is not None:
                self._index_barriers.append(barrier)
            if self._index_barriers:
                await self._index_backlog(force=barrier is not None)
            if self.file.rotated:
                self.file.rotated = False
                self._next_prune = 0.0  # a rotation is a good moment to apply retention
            if time.monotonic() >= self._next_prune:
                await self._prune_or_retry()
        while self._unindexed:   # close() drains the index too, retried until its timeout cancels this
            await asyncio.sleep(max(0.0, self._index_retry_at - time.monotonic()))
            await self._index_backlog(force=True)

    async def _persist(self, batch: list[dict[str, Any]]) -> None:
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self._append, batch)
                break
            except Exception as exc:  # disk full, I/O error: keep the batch
                attempt += 1
                delay = self._backoff(attempt)
                self.healthy = False
                # Strict callers refuse their responses now and audit the refusal instead,
                # so their records leave the batch; the rest are retried.
                failed = [r for r in batch if r["event_id"] in self._waiters]
                self._resolve(failed, AuditUnavailable(f"audit_write_failed: {exc}"))
                batch[:] = [r for r in batch if r not in failed]
                self._failed(exc, attempt, delay, len(batch))
                if not batch:
                    return
                await asyncio.sleep(delay)
        self.healthy = True
        self._resolve(batch, None)
        if self.shared is not None:
            self.shared.submit(batch)   # only what the JSONL holds; never waits for PostgreSQL
        if self._index is not None:
            self._unindexed.extend(batch)
            await self._index_backlog()

    async def _index_backlog(self, force: bool = False) -> None:
        """Index what audit.jsonl holds and audit.db does not yet; flush() callers are released once it is all in.

        A failure (another process holding audit.db's write lock, a broken index) keeps the records
        for a retry after a backoff and returns: retried in place, it held every later record out of
        audit.jsonl, so strict requests hung, neither served nor refused, and batched records piled up
        in memory where a kill -9 loses them. Past _UNINDEXED_MAX the oldest leave the backlog (they
        are in the file; a restart re-indexes its tail). `force`: try now, a flush() is waiting.
        """
        if self._index is not None and self._unindexed and (force or time.monotonic() >= self._index_retry_at):
            try:
                await self._insert_rows(self._unindexed)
            except Exception as exc:
                self._index_attempt += 1
                delay = self._backoff(self._index_attempt)
                self._index_retry_at = time.monotonic() + delay
                if len(self._unindexed) > _UNINDEXED_MAX:
                    log.error("audit index backlog over %d: %d records left to the next start's re-index",
                              _UNINDEXED_MAX, len(self._unindexed) - _UNINDEXED_MAX)
                    del self._unindexed[:-_UNINDEXED_MAX]
                self._failed(exc, self._index_attempt, delay, len(self._unindexed))
                return
            self._unindexed = []
            self._index_attempt = 0
            if self._index.replaced:
                # audit.db was deleted while open and a new, empty one made: give it what a start would,
                # the JSONL tail (rows already in are ignored), at once rather than after a restart.
                self._index.replaced = False
                self._unindexed = [r for r in await asyncio.to_thread(last_records, self.jsonl_path, _UNINDEXED_MAX)
                                   if "event_id" in r]
                self._index_retry_at = 0.0
                await self._index_backlog(force)
                return
        if not self._unindexed:
            barriers, self._index_barriers = self._index_barriers, []
            for barrier in barriers:
                if not barrier.done():   # done: its waiter gave up
                    barrier.set_result(None)

    def _backoff(self, attempt: int) -> float:
        """Seconds before retry `attempt` (1, 2, ...) of a file write or an index insert: doubling, capped."""
        return min(self._retry[1], self._retry[0] * 2 ** (attempt - 1))

    def _failed(self, exc: BaseException, attempt: int, delay: float, held: int = 0) -> None:
        # ERROR with a fixed prefix: an alert rule can match it as well as the metric.
        log.error("AUDIT WRITE FAILED (%s, attempt %d, %d records held); retry in %.2fs",
                  exc, attempt, held, delay)
        self._wake_room_waiters()   # they re-check: a failing log holds no request back
        if self.on_error is not None:
            try:
                self.on_error()
            except Exception:
                log.exception("audit on_error callback failed")

    def _append(self, batch: list[dict[str, Any]]) -> None:
        """Runs in a worker thread: the lines, and an fsync when strict or when the window is up."""
        now = time.monotonic()
        since = self._unsynced_since if self._unsynced_since is not None else now
        sync = self.strict or now - since >= self._fsync_interval
        self.file.append([line_of(r) for r in batch], fsync=sync)
        self._unsynced_since = None if sync else since

    def _wake_room_waiters(self) -> None:
        self._progress.set()   # clear() at once leaves the woken waiters woken
        self._progress.clear()

    def _resolve(self, records: list[dict[str, Any]], error: BaseException | None) -> None:
        for rec in records:
            fut = self._waiters.pop(rec["event_id"], None)
            if fut is None or fut.done():   # a caller that went away cancelled its future
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def _recover(self, lines: int = 10_000) -> None:
        """After a crash, lines fsynced to audit.jsonl may be missing from audit.db: index them again.

        INSERT OR IGNORE on event_id makes this a no-op for rows already there.
        """
        if self.jsonl_path.exists() and self._index is not None:
            recs = [r for r in await asyncio.to_thread(last_records, self.jsonl_path, lines) if "event_id" in r]
            self._unindexed.extend(recs)   # through the backlog: a locked audit.db must not stop the start
            await self._index_backlog()
        if self.shared is not None:
            # A crash between the file and PostgreSQL, or a stop while PostgreSQL was away: the records
            # the last process left unindexed (its mark) and the fixed tail on top, rotated files
            # included, are indexed now (no doubles).
            files = [*rotated_of(self.dir, self.jsonl_path.name), self.jsonl_path]
            recs = [r for r in await asyncio.to_thread(tail_stream, files, lines + self.shared.unindexed_at_start)
                    if "event_id" in r]
            self.shared.submit(recs)

    async def _insert_rows(self, batch: list[dict[str, Any]]) -> None:
        if self._index is not None:
            await asyncio.to_thread(self._index.insert, batch)

    def _prune_files(self, cutoff: float, now: float) -> None:
        for path in expired_files(self.dir, cutoff, now):
            path.unlink(missing_ok=True)


# The most records kept for a failing audit.db index: as many as start() re-indexes from the file's tail.
_UNINDEXED_MAX = 10_000


def _complete(record: dict[str, Any]) -> dict[str, Any]:
    """Every record carries every schema field (None where it has no value), so consumers never miss a key;
    the optional ones (openai, admin) only where they apply, as build_record writes them."""
    if "event_id" not in record or "timestamp" not in record:
        record = {"timestamp": _iso_utc(time.time()), "event_id": new_id(), **record}
    missing = [f for f in FIELDS if f not in record and f not in OPTIONAL_FIELDS]
    if missing:
        record = {**record, **dict.fromkeys(missing)}
    return record
