"""The audit JSONL files: append + fsync, size rotation, torn-tail repair, and reading the last records."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

ROTATED_FMT = "%Y%m%dT%H%M%S.%fZ"


def line_of(rec: dict[str, Any]) -> bytes:
    """One JSONL line, newline included. orjson: a tenth of json's CPU, and this runs per request."""
    try:
        return orjson.dumps(rec, default=str, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        # A lone surrogate (undecodable bytes in a path or header): escaped by json, never dropped.
        return json.dumps(rec, ensure_ascii=True, separators=(",", ":"), default=str, skipkeys=True).encode() + b"\n"


def dumps(rec: dict[str, Any]) -> str:
    """The record as its audit line reads, without the newline (for logs and tests)."""
    return line_of(rec)[:-1].decode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked; loop until everything is down."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


ACTIVE = "audit.jsonl"


def active_name(worker: int) -> str:
    """The file a process appends to: one per worker, since appends from several processes could interleave."""
    return ACTIVE if worker == 0 else f"audit.w{worker}.jsonl"


class JsonlFile:
    """One process's active audit file, opened for appending. Not thread-safe: one writer thread at a time."""

    def __init__(self, directory: Path, max_bytes: int, name: str = ACTIVE,
                 wall: Callable[[], float] = time.time) -> None:
        self.dir = directory
        self._wall = wall           # the clock rotated names are stamped with
        self.path = directory / name
        # audit.jsonl rotates to audit-<stamp>.jsonl, audit.w2.jsonl to audit-<stamp>.w2.jsonl.
        self._rotated_suffix = name[len("audit"):]
        self.max_bytes = max_bytes
        self.rotated = False        # set by a rotation; the writer applies retention then
        self._fd: int | None = None
        self._dirty = False         # written since the last fsync

    def append(self, lines: list[bytes], fsync: bool) -> None:
        """Appends whole lines (each ending in a newline, as line_of makes them); on error nothing of
        this call stays in the file."""
        data = b"".join(lines)
        if self._fd is not None and self._moved():
            # Deleted or renamed away under us (an operator, logrotate without copytruncate): lines
            # written to that inode would be in no file seekgate or its readers know, so a strict
            # record would be acknowledged as durable and be gone. Start a new file at the path.
            log.warning("audit file %s was deleted or moved while open; reopening it", self.path)
            self.close()
        if self._fd is None:
            self._open()
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size and size + len(data) > self.max_bytes:
            self._rotate()
            size = 0
        try:
            _write_all(self._fd, data)
        except OSError:
            # Cut a half-written batch so the retry doesn't leave a torn line behind.
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                self.close()
            raise
        self._dirty = True
        if fsync:
            self.fsync()

    def _moved(self) -> bool:
        """The path no longer names the open file. One stat per batch written."""
        assert self._fd is not None
        held = os.fstat(self._fd)
        return not names_file(self.path, (held.st_dev, held.st_ino))

    def fsync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            self._end_torn_line()
        except OSError:
            # Not kept open: the retry would write its batch straight onto the torn line, one unparseable
            # line with the first record in it. Closed, the next append opens again and ends the line first.
            fd, self._fd = self._fd, None
            os.close(fd)
            raise

    def _end_torn_line(self) -> None:
        """A crash mid-write can leave a partial last line; end it so the next record starts on its own line.

        The partial bytes are kept (evidence of the crash, and readers skip lines that do not parse)
        rather than truncated: an audit file is never shortened.
        """
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            log.warning("audit file %s ended in a torn line (crash?); terminating it", self.path)
            _write_all(self._fd, b"\n")
            os.fsync(self._fd)

    def _rotate(self) -> None:
        self.close()
        stamp = _next_stamp(self.dir, self.path.name, datetime.fromtimestamp(self._wall(), timezone.utc))
        os.rename(self.path, self.dir / f"audit-{stamp.strftime(ROTATED_FMT)}{self._rotated_suffix}")
        self._open()
        self.rotated = True


def _next_stamp(audit_dir: Path, active: str, now: datetime) -> datetime:
    """The stamp for the stream's next rotated file: now, or just after its newest rotated file's stamp.

    Readers take a stream's files in name order (tail, the shared index's catch-up, retention): after a
    backward step of the wall clock a name stamped with plain `now` sorted before older files, and the
    stream read out of order. The stamp is a name, not a time: retention reads the records' own
    timestamps (retention.newest_epoch).
    """
    for path in reversed(rotated_of(audit_dir, active)):
        prev = _name_stamp(path)
        if prev is not None:
            return max(now, prev + timedelta(microseconds=1))
    return now


def _name_stamp(path: Path) -> datetime | None:
    """The stamp in audit-<stamp>[.wN].jsonl, or None for a name seekgate did not make."""
    try:
        stamp = datetime.strptime(path.name[len("audit-"):].split("Z", 1)[0] + "Z", ROTATED_FMT)
    except ValueError:
        return None
    return stamp.replace(tzinfo=timezone.utc)


def names_file(path: Path, file_id: tuple[int, int]) -> bool:
    """Whether `path` still names the file whose (st_dev, st_ino) is `file_id`: not once deleted, renamed
    away or replaced (an operator freeing space, logrotate, a restore). Writers check it before writing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == file_id


def rotated_epoch(path: Path) -> float:
    """The stamp in a rotated file's name (audit-<stamp>.jsonl, a worker's audit-<stamp>.w2.jsonl), else its mtime."""
    stamp = _name_stamp(path)
    return path.stat().st_mtime if stamp is None else stamp.timestamp()


def stream_suffix(path: Path) -> str:
    """Which stream a rotated file belongs to: `.jsonl` for audit.jsonl's, `.w2.jsonl` for audit.w2.jsonl's."""
    return path.name[len("audit-"):].split("Z", 1)[-1]


def rotated_files(audit_dir: Path) -> list[Path]:
    """Rotated JSONL files, oldest first (the timestamp format sorts lexically)."""
    return sorted(audit_dir.glob("audit-*.jsonl"))


def active_files(audit_dir: Path) -> list[Path]:
    """The files being appended to: audit.jsonl, and one per worker under `serve --workers N`."""
    return sorted(p for p in audit_dir.glob("audit*.jsonl") if not p.name.startswith("audit-"))


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


def last_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The last `n` parseable records of one file, oldest first; torn or corrupt lines are skipped."""
    out = []
    for line in _last_lines(path, n):
        try:
            rec = json.loads(line)
        except ValueError:  # a torn line from a crash: skip rather than fail the reader
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def tail_audit(data_dir: Path, n: int) -> list[dict[str, Any]]:
    """The last `n` records, oldest first; reaches into rotated files when needed.

    With several workers each file is one worker's stream; their tails are merged by time.
    """
    audit_dir = Path(data_dir) / "audit"
    streams = [[*rotated_of(audit_dir, path.name), path] for path in active_files(audit_dir)]
    if len(streams) == 1:
        return tail_stream(streams[0], n)
    merged = [rec for files in streams for rec in tail_stream(files, n)]
    merged.sort(key=lambda r: str(r.get("timestamp", "")))   # ISO-8601 UTC sorts as text
    return merged[-n:] if n > 0 else []


def rotated_of(audit_dir: Path, active: str) -> list[Path]:
    """The rotated files of one stream, oldest first: audit.w2.jsonl's are audit-<stamp>.w2.jsonl."""
    suffix = active[len("audit"):]
    return [p for p in rotated_files(audit_dir) if stream_suffix(p) == suffix]


def tail_stream(files: list[Path], n: int) -> list[dict[str, Any]]:
    """The last `n` records of one stream (its rotated files oldest first, then the active one)."""
    out: list[dict[str, Any]] = []
    for path in reversed(files):
        if len(out) >= n:
            break
        if path.exists():
            out = last_records(path, n - len(out)) + out
    return out[-n:] if n > 0 else []
