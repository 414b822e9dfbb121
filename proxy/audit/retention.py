"""Audit retention that survives wall-clock jumps: a clock that never runs ahead of elapsed time, and file ages by content."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from .jsonl import last_records, rotated_epoch, rotated_files, stream_suffix

# Linux's CLOCK_BOOTTIME counts a suspended VM's sleep, CLOCK_MONOTONIC does not: after a resume the wall
# clock is then not mistaken for a forward jump (which would only delay retention, but needlessly).
_BOOT = getattr(time, "CLOCK_BOOTTIME", None)


def _elapsed() -> float:
    return time.clock_gettime(_BOOT) if _BOOT is not None else time.monotonic()


class RetentionClock:
    """`now()`: the wall clock, but never further past the first reading than the elapsed-time clock has run.

    A forward step of the wall clock (a bad NTP source, an operator's typo) would otherwise make every
    rotated file look expired at the next prune, and the deletion cannot be undone once the clock is set
    back. Capped, retention runs no earlier than real elapsed time allows; after a genuine forward
    correction it runs late until the next restart re-reads the wall clock (files kept longer, never
    deleted early). A backward step is taken at once: it too only keeps files longer.
    """

    def __init__(self, wall: Callable[[], float] = time.time, elapsed: Callable[[], float] = _elapsed) -> None:
        self.wall = wall
        self.elapsed = elapsed
        self._wall0 = wall()
        self._elapsed0 = elapsed()

    def now(self) -> float:
        return min(self.wall(), self._wall0 + (self.elapsed() - self._elapsed0))


def newest_epoch(path: Path, lines: int = 64) -> float:
    """When a rotated file's newest record was written: the latest `timestamp` among its last lines.

    The record times, not the file name: a name made after a backward clock step is stamped later than
    its records (names must sort in rotation order, jsonl._next_stamp). Without a parseable record
    (an empty or hand-made file), the name's stamp, or the file's mtime.
    """
    newest: float | None = None
    for rec in last_records(path, lines):
        stamp = rec.get("timestamp")
        if not isinstance(stamp, str):
            continue
        try:
            at = datetime.fromisoformat(stamp)
        except ValueError:
            continue
        epoch = (at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)).timestamp()
        newest = epoch if newest is None else max(newest, epoch)
    return rotated_epoch(path) if newest is None else newest


def expired_files(audit_dir: Path, cutoff: float) -> list[Path]:
    """The rotated files to delete: per stream, oldest (by name) first, up to the first one still in retention.

    Only a leading run is ever deleted, so a stream never gets a hole: a file whose records look old
    (written while the clock stood back) is kept while an earlier one is kept, and readers that walk
    a stream in name order (tail, the shared index's catch-up) find everything after the oldest file left.
    """
    streams: dict[str, list[Path]] = {}
    for path in rotated_files(audit_dir):   # name order: rotation order within a stream
        streams.setdefault(stream_suffix(path), []).append(path)
    out: list[Path] = []
    for files in streams.values():
        for path in files:
            try:
                if newest_epoch(path) >= cutoff:
                    break
            except FileNotFoundError:   # deleted by hand, or by another worker's prune of a shared stream
                continue
            out.append(path)
    return out
