"""What one process of `seekgate serve --workers N` is told by its supervisor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerRole:
    index: int              # 1..N; names its audit file (audit.w<index>.jsonl)
    limiter_socket: Path    # the supervisor's LimiterServer: one set of counters for all workers
