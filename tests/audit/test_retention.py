"""Tests for proxy.audit.retention and rotated names: wall-clock steps neither delete early nor misorder a stream."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.audit.jsonl import JsonlFile, rotated_files, rotated_of, tail_stream
from proxy.audit.retention import RetentionClock, expired_files, newest_epoch
from proxy.audit.writer import AuditWriter, _iso_utc, build_record
from proxy.context import RequestContext

DAY = 86400.0
T0 = 1_780_000_000.0   # 2026-05-28, a fixed "now" for the fake clocks


@dataclass
class FakeClock:
    """A wall clock and an elapsed-time clock the test steps independently."""

    wall: float = T0
    elapsed: float = 1000.0

    def retention(self) -> RetentionClock:
        return RetentionClock(wall=lambda: self.wall, elapsed=lambda: self.elapsed)


def _rec(i: int, at: float) -> dict[str, Any]:
    rec = build_record(RequestContext(request_id=f"req-{i}", client_ip="10.0.0.7", protocol="http",
                                      method="POST", path="/v2/models/deepseek/generate", started_wall=at),
                       duration_ms=1.0)
    return rec


def _write(path: Path, *stamps: float) -> Path:
    path.write_text("".join(json.dumps({"timestamp": _iso_utc(t), "event_id": f"e{t}"}) + "\n" for t in stamps))
    return path


def _ids(paths: list[Path]) -> list[str]:
    return [json.loads(line)["request_id"] for p in paths for line in p.read_text().splitlines()]


def test_clock_follows_the_wall_but_never_runs_ahead_of_elapsed_time() -> None:
    fake = FakeClock()
    clock = fake.retention()
    fake.wall += 60
    fake.elapsed += 60
    assert clock.now() == T0 + 60
    fake.wall += 365 * DAY          # a forward step: not believed past what has elapsed
    fake.elapsed += 60
    assert clock.now() == T0 + 120
    fake.wall = T0 - DAY            # a backward step: taken at once (it only keeps files longer)
    assert clock.now() == T0 - DAY
    fake.wall = T0 + 130            # stepped forward again: as unproven as the first forward step
    fake.elapsed += 10
    assert clock.now() == T0 - DAY + 10


def test_a_process_started_during_a_forward_step_prunes_by_the_view_of_those_before_it(tmp_path: Path) -> None:
    # `seekgate keys ...` runs its own audit writer, and a restart makes a new one: their first reading of
    # the wall clock is the stepped one. The offset the server recorded for this boot is theirs too.
    state = tmp_path / ".retention-clock"
    fake = FakeClock()
    server = RetentionClock(wall=lambda: fake.wall, elapsed=lambda: fake.elapsed, state=state,
                            boot_id=lambda: "boot-1")
    assert server.now() == T0
    fake.wall += 365 * DAY
    fake.elapsed += 60
    cli = RetentionClock(wall=lambda: fake.wall, elapsed=lambda: fake.elapsed, state=state,
                         boot_id=lambda: "boot-1")
    assert cli.now() == T0 + 60
    # After a reboot the boot clock starts again and the recorded offset means nothing: the wall is taken.
    rebooted = RetentionClock(wall=lambda: fake.wall, elapsed=lambda: 5.0, state=state, boot_id=lambda: "boot-2")
    assert rebooted.now() == fake.wall


def test_rotated_names_sort_in_rotation_order_after_a_backward_step(tmp_path: Path) -> None:
    fake = FakeClock()
    file = JsonlFile(tmp_path, max_bytes=64, wall=lambda: fake.wall)
    for i in range(6):
        if i == 3:
            fake.wall -= 3600       # NTP steps the clock back an hour between rotations
        file.append([json.dumps({"request_id": f"req-{i}"}).encode() + b"\n" for _ in range(2)], fsync=False)
    file.close()
    rotated = rotated_files(tmp_path)
    assert len(rotated) == 5
    # Name order is rotation order: reading the stream in name order gives the records as written.
    assert _ids([*rotated, tmp_path / "audit.jsonl"]) == [f"req-{i}" for i in range(6) for _ in range(2)]


def test_a_worker_stream_is_ordered_on_its_own(tmp_path: Path) -> None:
    # audit.jsonl's newest rotated file is far ahead; audit.w2.jsonl's names follow only its own files.
    _write(tmp_path / "audit-20990101T000000.000000Z.jsonl", T0)
    fake = FakeClock()
    w2 = JsonlFile(tmp_path, max_bytes=8, name="audit.w2.jsonl", wall=lambda: fake.wall)
    w2.append([b'{"request_id":"req-0"}\n'], fsync=False)
    w2.append([b'{"request_id":"req-1"}\n'], fsync=False)
    w2.close()
    [rotated] = rotated_of(tmp_path, "audit.w2.jsonl")
    assert rotated.name == "audit-20260528T202640.000000Z.w2.jsonl"


def test_a_file_is_as_old_as_its_newest_record_not_its_name(tmp_path: Path) -> None:
    named_old = _write(tmp_path / "audit-20000101T000000.000000Z.jsonl", T0 - 40 * DAY, T0 - 2 * DAY)
    assert newest_epoch(named_old) == T0 - 2 * DAY
    (tmp_path / "audit-20000102T000000.000000Z.jsonl").write_text("{}\n")   # no timestamp: its name's
    assert newest_epoch(tmp_path / "audit-20000102T000000.000000Z.jsonl") == 946771200.0
    # The first file is within 30 days by its records: kept, and so is everything after it.
    assert expired_files(tmp_path, T0 - 30 * DAY) == []
    assert expired_files(tmp_path, T0 - DAY) == [named_old, tmp_path / "audit-20000102T000000.000000Z.jsonl"]


def test_retention_deletes_only_a_leading_run_of_each_stream(tmp_path: Path) -> None:
    a = _write(tmp_path / "audit-20260101T000000.000000Z.jsonl", T0 - 90 * DAY)
    b = _write(tmp_path / "audit-20260102T000000.000000Z.jsonl", T0 - DAY)
    # Rotated after a backward clock step: records older than b's, but b is kept, so c is too.
    c = _write(tmp_path / "audit-20260102T000000.000001Z.jsonl", T0 - 90 * DAY)
    w = _write(tmp_path / "audit-20260103T000000.000000Z.w2.jsonl", T0 - 90 * DAY)
    assert sorted(expired_files(tmp_path, T0 - 30 * DAY)) == [a, w]
    assert b.exists() and c.exists()


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]


def test_a_file_stamped_in_the_future_is_as_old_as_the_files_after_it(tmp_path: Path) -> None:
    a = _write(tmp_path / "audit-20260101T000000.000000Z.jsonl", T0 - 60 * DAY)
    typo = _write(tmp_path / "audit-20260102T000000.000000Z.jsonl", T0 + 3650 * DAY)   # the clock ten years ahead
    c = _write(tmp_path / "audit-20360101T000000.000001Z.jsonl", T0 - 50 * DAY)   # corrected: its name still after
    d = _write(tmp_path / "audit-20360101T000000.000002Z.jsonl", T0 - DAY)
    assert expired_files(tmp_path, T0 - 30 * DAY, now=T0) == [a, typo, c]
    # Without retention's now nothing tells the typo from the truth: kept, and all after it.
    assert expired_files(tmp_path, T0 - 30 * DAY) == [a]
    # A future file last in its stream has nothing after it to be aged by: kept.
    d.unlink()
    c.unlink()
    assert expired_files(tmp_path, T0 - 30 * DAY, now=T0) == [a]


async def test_writer_prunes_files_written_while_the_clock_stood_years_ahead(tmp_path: Path) -> None:
    fake = FakeClock()
    audit_dir = tmp_path / "audit"
    writer = AuditWriter(tmp_path, max_bytes=1500, retention_days=1, batch_size=2, clock=fake.retention())
    await writer.start()
    for n in range(36):
        if n == 12:
            fake.wall += 3650 * DAY    # a typo: ten years ahead ...
        if n == 24:
            fake.wall -= 3650 * DAY    # ... corrected twelve records later
        writer.submit(_rec(n, fake.wall))
        fake.wall += 1
        fake.elapsed += 1
        await writer.flush()
    written = rotated_files(audit_dir)
    assert len(written) >= 6
    fake.elapsed += 2 * DAY        # two days really pass: every record so far is out of retention
    fake.wall += 2 * DAY
    await writer.prune()
    assert rotated_files(audit_dir) == [], "files kept for ten years by a typo corrected at once"
    await writer.close()


async def test_writer_on_real_files_survives_clock_steps_both_ways(tmp_path: Path) -> None:
    fake = FakeClock()
    audit_dir = tmp_path / "audit"
    writer = AuditWriter(tmp_path, max_bytes=1500, retention_days=1, batch_size=2, clock=fake.retention())
    await writer.start()
    n = 0

    async def write(count: int) -> None:
        nonlocal n
        for _ in range(count):
            writer.submit(_rec(n, fake.wall))
            n += 1
            fake.wall += 1
            fake.elapsed += 1
            await writer.flush()   # one batch at a time: the rotations happen at the clock's times

    await write(12)
    fake.wall -= 3600              # stepped back an hour: the next rotations' names must still sort last
    await write(12)
    before_jump = rotated_files(audit_dir)
    assert len(before_jump) >= 6
    # The stream in name order is the order written, and so is its tail.
    assert _ids([*before_jump, audit_dir / "audit.jsonl"]) == [f"req-{i}" for i in range(24)]
    assert [r["request_id"] for r in tail_stream([*before_jump, audit_dir / "audit.jsonl"], 24)] == \
        [f"req-{i}" for i in range(24)]

    fake.wall += 10 * DAY          # a forward step far past retention; the rotations it causes prune too
    await write(12)
    await writer.prune()
    assert set(before_jump) <= set(rotated_files(audit_dir)), "files within retention deleted by a clock step"
    assert _rows(audit_dir / "audit.db") == 36

    fake.elapsed += 2 * DAY        # now two days have really passed: the first 24 records are out of retention
    fake.wall += 2 * DAY
    await writer.prune()
    left = rotated_files(audit_dir)
    assert not set(before_jump) & set(left)
    assert _ids([*left, audit_dir / "audit.jsonl"])[-12:] == [f"req-{i}" for i in range(24, 36)]
    await writer.close()


def test_a_recorded_offset_that_is_no_number_is_ignored_and_replaced(tmp_path: Path) -> None:
    # float() reads "-inf" and "nan": a state file holding "-inf" put now() at minus infinity, so nothing
    # expired again until the next boot, and "nan" was never replaced.
    state = tmp_path / ".retention-clock"
    fake = FakeClock()
    for corrupt in ("-inf", "nan", "inf"):
        state.write_text(f"boot-1 {corrupt}\n")
        clock = RetentionClock(wall=lambda: fake.wall, elapsed=lambda: fake.elapsed, state=state,
                               boot_id=lambda: "boot-1")
        assert clock.now() == T0, corrupt
        assert state.read_text().split() == ["boot-1", repr(T0 - fake.elapsed)], corrupt


def test_a_state_file_not_replaced_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    # Here the state's path is taken by a directory, so the rename over it fails; a full disk fails the write.
    # Either way the process's .retention-clock.<pid> stayed in the audit directory, one more per process.
    state = tmp_path / ".retention-clock"
    (state / "in-the-way").mkdir(parents=True)
    fake = FakeClock()
    clock = RetentionClock(wall=lambda: fake.wall, elapsed=lambda: fake.elapsed, state=state,
                           boot_id=lambda: "boot-1")
    assert clock.now() == T0   # its own view stands
    assert sorted(p.name for p in tmp_path.iterdir()) == [".retention-clock"]
