"""Audit trail: one record per request, appended off the hot path to JSONL and SQLite."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiosqlite

from .context import RequestContext

log = logging.getLogger(__name__)

# Order is the JSONL key order and the SQLite column order; never add a credential here.
FIELDS: tuple[str, ...] = (
    "timestamp", "event_id", "request_id", "actor", "key_id", "tier", "action", "resource",
    "model", "status", "http_status", "reason", "client_ip", "duration_ms", "upstream_ms",
    "input_tokens", "output_tokens", "protocol", "method", "path", "rule",
)
_INT_FIELDS = {"http_status", "input_tokens", "output_tokens"}
_REAL_FIELDS = {"duration_ms", "upstream_ms"}
_ROTATED_FMT = "%Y%m%dT%H%M%S.%fZ"

_COLUMNS = ", ".join(
    f"{f} {'INTEGER' if f in _INT_FIELDS else 'REAL' if f in _REAL_FIELDS else 'TEXT'}"
    + (" PRIMARY KEY" if f == "event_id" else "")
    for f in FIELDS
)
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS audit (ts REAL NOT NULL, {_COLUMNS})",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts)",
    "CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, ts)",
    "CREATE INDEX IF NOT EXISTS audit_key_id ON audit (key_id, ts)",
)
# OR IGNORE makes a retried batch idempotent: event_id is the primary key.
_INSERT = (f"INSERT OR IGNORE INTO audit (ts, {', '.join(FIELDS)}) "
           f"VALUES ({', '.join('?' * (len(FIELDS) + 1))})")


def _iso_utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _epoch(iso: str) -> float:
    # fromisoformat only accepts "Z" from 3.11; the project still declares 3.10.
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def build_record(ctx: RequestContext, duration_ms: float | None = None) -> dict[str, Any]:
    """The audit record for a finished request. `duration_ms` defaults to time since start."""
    p, r = ctx.principal, ctx.resource
    elapsed = ctx.elapsed_ms() if duration_ms is None else duration_ms
    return {
        "timestamp": _iso_utc(ctx.started_wall),
        "event_id": uuid.uuid4().hex,
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
    }


def _row(rec: dict[str, Any]) -> tuple[Any, ...]:
    def cell(v: Any) -> Any:
        return v if v is None or isinstance(v, (str, int, float)) else json.dumps(v, default=str)
    try:
        ts = _epoch(str(rec["timestamp"]))
    except (KeyError, ValueError):  # a malformed record must not wedge the writer in retries
        ts = time.time()
    return (ts, *(cell(rec.get(f)) for f in FIELDS))


def _dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":"), default=str, skipkeys=True)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked; loop until everything is down."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class AuditWriter:
    """Single background task: batches queued records into audit.jsonl and audit.db.

    A failed write keeps its batch and retries with backoff (calling `on_error` per
    failure), so records are delayed, never dropped. `close()` drains everything.
    """

    def __init__(self, data_dir: Path, max_bytes: int = 100 * 1024 * 1024,
                 retention_days: int = 180, on_error: Callable[[], None] | None = None,
                 *, batch_size: int = 512, retry_base_s: float = 0.1, retry_max_s: float = 5.0,
                 fsync_interval_s: float = 1.0) -> None:
        self.dir = Path(data_dir) / "audit"
        self.jsonl_path = self.dir / "audit.jsonl"
        self.db_path = self.dir / "audit.db"
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self.on_error = on_error
        self._batch_size = batch_size
        self._retry = (retry_base_s, retry_max_s)
        self._fsync_interval = fsync_interval_s
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._inflight: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._db: aiosqlite.Connection | None = None
        self._fd: int | None = None
        self._last_fsync = 0.0
        self._next_prune = 0.0
        self._closed = False

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._connect()
        await self.prune()
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record; never blocks, never raises."""
        try:
            if self._closed:
                log.error("audit writer closed, record not persisted: %s", _dumps(record))
                return
            if "event_id" not in record or "timestamp" not in record:
                record = {"timestamp": _iso_utc(time.time()), "event_id": uuid.uuid4().hex,
                          **record}
            self._queue.put_nowait(record)
        except Exception:  # the request path must not fail because of auditing
            log.exception("audit submit failed")

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
            left = [r for r in self._drain_nowait() if r is not None]
        else:
            self._queue.put_nowait(None)  # FIFO: everything submitted before close goes first
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task})
                left = self._inflight + [r for r in self._drain_nowait() if r is not None]
        if left:
            log.error("audit writer could not persist %d records at close", len(left))
            for rec in left:  # last resort: the log is better than nowhere
                log.error("audit record not persisted: %s", _dumps(rec))
        try:
            await asyncio.to_thread(self._close_file)
        except OSError:
            log.exception("audit file fsync/close failed")
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def prune(self, now: float | None = None) -> None:
        """Retention: drop rotated files and rows older than `retention_days`."""
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        await asyncio.to_thread(self._prune_files, cutoff)
        if self._db is not None:
            await self._db.execute("DELETE FROM audit WHERE ts < ?", (cutoff,))
            await self._db.commit()
        self._next_prune = time.monotonic() + 3600

    # -- writer task -------------------------------------------------------------

    def _drain_nowait(self) -> list[dict[str, Any] | None]:
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[dict[str, Any]] = []
            item = await self._queue.get()
            while True:
                if item is None:
                    stop = True
                    break
                batch.append(item)
                if len(batch) >= self._batch_size or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                self._inflight = batch
                await self._persist(batch)
                self._inflight = []
            if time.monotonic() >= self._next_prune:
                try:
                    await self.prune()
                except Exception:
                    log.exception("audit retention failed")

    async def _persist(self, batch: list[dict[str, Any]]) -> None:
        file_done = db_done = False
        attempt = 0
        while True:
            try:
                if not file_done:
                    await asyncio.to_thread(self._append_jsonl, batch)
                    file_done = True
                if not db_done:
                    await self._insert_rows(batch)
                    db_done = True
                return
            except Exception as exc:  # disk full, I/O error, locked db: keep the batch
                attempt += 1
                delay = min(self._retry[1], self._retry[0] * 2 ** (attempt - 1))
                log.error("audit write failed (%s, attempt %d, %d records held); retry in %.2fs",
                          exc, attempt, len(batch), delay)
                if self.on_error is not None:
                    try:
                        self.on_error()
                    except Exception:
                        log.exception("audit on_error callback failed")
                await asyncio.sleep(delay)

    async def _connect(self) -> None:
        db = await aiosqlite.connect(self.db_path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            for stmt in _SCHEMA:
                await db.execute(stmt)
            await db.commit()
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def _insert_rows(self, batch: list[dict[str, Any]]) -> None:
        if self._db is None:
            await self._connect()
        assert self._db is not None
        try:
            await self._db.executemany(_INSERT, [_row(r) for r in batch])
            await self._db.commit()
        except sqlite3.Error:
            try:
                await self._db.rollback()
            except sqlite3.Error:  # connection unusable: reconnect on the next attempt
                await self._db.close()
                self._db = None
            raise

    # -- file side (runs in a worker thread, one call at a time) -------------------

    def _append_jsonl(self, batch: list[dict[str, Any]]) -> None:
        data = "".join(_dumps(r) + "\n" for r in batch).encode()
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        size = os.fstat(self._fd).st_size
        if size and size + len(data) > self.max_bytes:
            self._rotate()
            size = 0
        assert self._fd is not None
        try:
            _write_all(self._fd, data)
        except OSError:
            # Cut a half-written batch so the retry doesn't leave a torn line behind.
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                self._close_file()
            raise
        now = time.monotonic()
        if now - self._last_fsync >= self._fsync_interval:
            os.fsync(self._fd)
            self._last_fsync = now

    def _rotate(self) -> None:
        self._close_file()
        stamp = datetime.now(timezone.utc)
        target = self.dir / f"audit-{stamp.strftime(_ROTATED_FMT)}.jsonl"
        os.rename(self.jsonl_path, target)
        self._fd = os.open(self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._next_prune = 0.0  # a rotation is a good moment to apply retention

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _prune_files(self, cutoff: float) -> None:
        for path in rotated_files(self.dir):
            if _rotated_epoch(path) < cutoff:
                path.unlink(missing_ok=True)


def _rotated_epoch(path: Path) -> float:
    try:
        stamp = datetime.strptime(path.stem[len("audit-"):], _ROTATED_FMT)
        return stamp.replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return path.stat().st_mtime


def rotated_files(audit_dir: Path) -> list[Path]:
    """Rotated JSONL files, oldest first (the timestamp format sorts lexically)."""
    return sorted(audit_dir.glob("audit-*.jsonl"))


def _last_lines(path: Path, n: int, block: int = 65536) -> list[bytes]:
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        buf = b""
        while end > 0 and buf.count(b"\n") <= n:
            start = max(0, end - block)
            f.seek(start)
            buf = f.read(end - start) + buf
            end = start
    lines = [ln for ln in buf.split(b"\n") if ln.strip()]
    return lines[-n:] if end == 0 else lines[1:][-n:]  # first chunk line may be partial


def tail_audit(data_dir: Path, n: int) -> list[dict[str, Any]]:
    """The last `n` records, oldest first; reaches into rotated files when needed."""
    audit_dir = Path(data_dir) / "audit"
    files = [*rotated_files(audit_dir), audit_dir / "audit.jsonl"]
    out: list[dict[str, Any]] = []
    for path in reversed(files):
        if len(out) >= n:
            break
        if not path.exists():
            continue
        chunk = []
        for line in _last_lines(path, n - len(out)):
            try:
                chunk.append(json.loads(line))
            except ValueError:  # a torn line from a crash: skip rather than fail the CLI
                continue
        out = chunk + out
    return out[-n:] if n > 0 else []


async def query_audit(data_dir: Path, actor: str | None = None, key_id: str | None = None,
                      since: float | None = None, until: float | None = None,
                      status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Records matching every given filter, newest first. `since`/`until` are epoch seconds."""
    db_path = Path(data_dir) / "audit" / "audit.db"
    if not db_path.exists():
        return []
    where, args = [], []
    for clause, value in (("actor = ?", actor), ("key_id = ?", key_id), ("ts >= ?", since),
                          ("ts < ?", until), ("status = ?", status)):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = (f"SELECT {', '.join(FIELDS)} FROM audit"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + " ORDER BY ts DESC, rowid DESC LIMIT ?")
    async with aiosqlite.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True) as db:
        async with db.execute(sql, (*args, max(0, limit))) as cur:
            return [dict(zip(FIELDS, row)) for row in await cur.fetchall()]
