"""Audit retention that survives wall-clock jumps: a clock that never runs ahead of elapsed time, and file ages by content."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from .jsonl import last_records, rotated_epoch, rotated_files, stream_suffix

log = logging.getLogger(__name__)

# Linux's CLOCK_BOOTTIME counts a suspended VM's sleep, CLOCK_MONOTONIC does not: after a resume the wall
# clock is then not mistaken for a forward jump (which would only delay retention, but needlessly).
_BOOT = getattr(time, "CLOCK_BOOTTIME", None)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# A smaller offset is written to the shared state only when it is smaller by this much: NTP's slewing
# moves both clocks alike, so anything finer is noise not worth a file write.
_RECORD_STEP_S = 1.0
# A rotated file's newest record this far past retention's now was stamped by a clock standing ahead
# (expired_files); an hour covers the skew between retention's view and this host's wall clock.
FUTURE_SLACK_S = 3600.0


def _elapsed() -> float:
    return time.clock_gettime(_BOOT) if _BOOT is not None else time.monotonic()


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class RetentionClock:
    """`now()`: the elapsed-time (boot) clock plus the smallest wall-minus-elapsed offset seen since boot.

    A forward step of the wall clock (a bad NTP source, an operator's typo) would otherwise make every
    rotated file look expired at the next prune, and the deletion cannot be undone once the clock is set
    back. Here a forward step raises no offset, so retention runs no earlier than elapsed time allows; a
    backward step lowers it at once (that too only keeps files longer). The offset is shared through
    `state` (a small file in the audit directory) by every process of this boot, so a CLI command or a
    restart during a forward step, whose own first reading is already wrong, prunes by the same view.
    After a genuine forward correction retention runs that much late until the next boot: files are
    kept longer, never deleted early. With no boot id (not Linux) the view is this process's own.
    """

    def __init__(self, wall: Callable[[], float] = time.time, elapsed: Callable[[], float] = _elapsed,
                 state: Path | None = None, boot_id: Callable[[], str | None] = _boot_id) -> None:
        self.wall = wall
        self.elapsed = elapsed
        self.state = state
        self._boot = boot_id() if state is not None else None
        self._offset = wall() - elapsed()

    def now(self) -> float:
        """Retention's idea of the current time (epoch seconds); reads and may write `state` (call off the loop)."""
        elapsed = self.elapsed()
        self._offset = min(self._offset, self.wall() - elapsed)
        if self.state is not None and self._boot is not None:
            self._offset = self._shared(self._offset)
        return elapsed + self._offset

    def _shared(self, offset: float) -> float:
        """The smaller of `offset` and the one recorded for this boot, recording ours if it is smaller.

        A failure to read or write only loses the sharing: this process's own view stands.
        """
        assert self.state is not None
        recorded: float | None = None
        try:
            boot, value = self.state.read_text().split()
            if boot == self._boot and math.isfinite(float(value)):   # float() also reads "-inf" and "nan"
                recorded = float(value)
        except (OSError, ValueError):
            pass   # missing, another boot's, or unreadable: ours starts it
        if recorded is not None and recorded <= offset:
            return recorded
        if recorded is None or recorded - offset >= _RECORD_STEP_S:
            tmp = self.state.with_name(f"{self.state.name}.{os.getpid()}")
            try:
                tmp.write_text(f"{self._boot} {offset!r}\n")
                os.replace(tmp, self.state)   # whole or not at all, for a reader in another process
            except OSError as exc:
                log.warning("retention clock state %s not written: %s", self.state, exc)
                with contextlib.suppress(OSError):   # a full disk or a failed rename left it: one more file a process
                    tmp.unlink()
        return offset


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


def expired_files(audit_dir: Path, cutoff: float, now: float | None = None) -> list[Path]:
    """The rotated files to delete: per stream, oldest (by name) first, up to the first one still in retention.

    Only a leading run is ever deleted, so a stream never gets a hole: a file whose records look old
    (written while the clock stood back) is kept while an earlier one is kept, and readers that walk
    a stream in name order (tail, the shared index's catch-up) find everything after the oldest file left.

    Given `now` (retention's clock), a file whose records are stamped over FUTURE_SLACK_S past it was
    written while the wall clock stood ahead (a typo of years, corrected a minute later): it is as old
    as the files rotated after it at most, since its records came before theirs. Without that it, and
    every later file of its stream, would be kept until its future time plus retention. A file stamped
    in the past is never aged by later ones: they may be the wrong ones (a backward step), and an
    audit file is kept too long rather than deleted early.
    """
    streams: dict[str, list[Path]] = {}
    for path in rotated_files(audit_dir):   # name order: rotation order within a stream
        streams.setdefault(stream_suffix(path), []).append(path)
    out: list[Path] = []
    for files in streams.values():
        aged: list[tuple[Path, float]] = []
        for path in files:
            try:
                aged.append((path, newest_epoch(path)))
            except FileNotFoundError:   # deleted by hand, or by another worker's prune of a shared stream
                continue
        if now is not None:
            later = math.inf   # the least age of the files after this one
            for i in range(len(aged) - 1, -1, -1):
                path, age = aged[i]
                if age > now + FUTURE_SLACK_S:
                    aged[i] = (path, min(age, later))
                later = min(later, aged[i][1])
        for path, age in aged:
            if age >= cutoff:
                break
            out.append(path)
    return out
