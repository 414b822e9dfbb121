"""A cross-process "the key store changed" signal that costs a memory read instead of a database query.

Every process that opens the store maps the same 8-byte file (`<db>.rev`). A writer puts fresh
random bytes there after each committed change, before the change is reported done; a reader
that sees the same bytes as at its last store read knows nothing has committed since. Reading
the revision from SQLite goes through aiosqlite's thread (about 100 µs); this is a load from
shared memory (well under 1 µs), so the key cache can check it on every request.

Exact for every change a writer reported done: the new bytes are in place before it returns, and
random 64-bit values never repeat in practice. A writer that dies between its commit and the
signal leaves a change unsignalled; the key cache's periodic revision read (revision_check_ms)
bounds how long that can go unnoticed.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_SIZE = 8
_WORD = struct.Struct("=Q")


class ChangeSignal:
    """The mapped file. `value()` for readers, `changed()` for writers; `close()` when done."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.pwrite(fd, os.urandom(_SIZE), 0)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)   # the mapping keeps the file

    @classmethod
    def beside(cls, db_path: Path) -> ChangeSignal:
        return cls(db_path.with_name(db_path.name + ".rev"))

    def value(self) -> int | None:
        """The current word; None once closed (a reader then falls back to the revision query)."""
        try:
            return _WORD.unpack_from(self._map)[0]
        except ValueError:   # mmap closed
            return None

    def changed(self) -> None:
        self._map[:_SIZE] = os.urandom(_SIZE)

    def close(self) -> None:
        self._map.close()
