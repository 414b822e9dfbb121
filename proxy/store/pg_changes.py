"""The PostgreSQL change signal: LISTEN on a dedicated connection, a word that moves on every NOTIFY.

Each committed change bumps the `revision` row (the change sequence number) and sends
`NOTIFY seekgate_changes` in the same transaction, so PostgreSQL delivers the notification to
every listening replica exactly when the change becomes visible, and never for a rolled-back one.
The key cache reads `value()` on every request (a memory read) and re-reads the revision only
when it moved: the same contract as the SQLite store's shared-memory word (change_signal.py).

Losing the channel must not lose a revocation. While the listening connection is down (killed
server-side, network gone, PostgreSQL restarting), `value()` returns a new number on every call,
so the cache re-reads the revision on every request: cached credentials are revalidated against
the sequence number (or, with the store unreachable too, serve out their bounded TTL), and
uncached ones go to the store and fail closed. A reconnect moves the word once more, which is
the resync: whatever was missed is covered by the revision read that follows. A connection that
dies silently (no FIN) is found by a ping every `ping_interval_s`, which bounds that case.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from typing import Any

import asyncpg

CHANNEL = "seekgate_changes"

log = logging.getLogger("seekgate.store")


def application_name(pid: int | None = None) -> str:
    return f"seekgate-listen-{os.getpid() if pid is None else pid}"


class ChangeListener:
    """Use `await ChangeListener.start(dsn)`; `value()` for readers, `close()` when done."""

    def __init__(self, dsn: str, *, timeout_s: float, ping_interval_s: float) -> None:
        self._dsn, self._timeout_s, self._ping_s = dsn, timeout_s, ping_interval_s
        self._conn: Any = None
        self._word = 0
        self._fresh = itertools.count(1 << 62)   # values the word never takes while connected
        self._up = False
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0   # for tests and logs: how often the channel was re-established

    @classmethod
    async def start(cls, dsn: str, *, timeout_s: float = 2.0, ping_interval_s: float = 0.25) -> ChangeListener:
        self = cls(dsn, timeout_s=timeout_s, ping_interval_s=ping_interval_s)
        with contextlib.suppress(Exception):
            await self._connect()   # a store down at start: the loop below keeps trying
        self._task = asyncio.create_task(self._run())
        return self

    @property
    def connected(self) -> bool:
        return self._up

    def server_pid(self) -> int | None:
        """The listening connection's backend pid (pg_stat_activity.pid); None while disconnected."""
        return int(self._conn.get_server_pid()) if self._up and self._conn is not None else None

    def value(self) -> int:
        """Moves whenever a change may have committed since the last call; a fresh value while disconnected."""
        return self._word if self._up else next(self._fresh)

    def _notified(self, *_: object) -> None:
        self._word += 1

    def _lost(self, *_: object) -> None:
        if self._up:
            log.warning("store change channel lost; re-reading the change sequence on every request until it is back")
        self._up = False

    async def _connect(self) -> None:
        # Named after this process, so an operator (or a test) can find one replica's listener in pg_stat_activity.
        conn = await asyncpg.connect(self._dsn, timeout=self._timeout_s,
                                     server_settings={"application_name": application_name()})
        try:
            conn.add_termination_listener(self._lost)
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._word += 1   # the resync: the next request re-reads the revision and drops a stale cache
        self._up = True

    async def _run(self) -> None:
        # Any failure counts as a lost channel, not only the errors asyncpg names: a ping caught by a
        # server shutting down raises its InternalClientError ("another operation is in progress"), and
        # a loop that died of it would leave the channel marked up, readiness green, for good.
        delay = 0.05
        while True:
            if self._up and self._conn is not None:
                try:
                    await self._conn.fetchval("SELECT 1", timeout=self._timeout_s)
                    delay = 0.05
                except Exception as exc:
                    log.debug("store change channel ping failed: %r", exc)
                    self._lost()
                await asyncio.sleep(self._ping_s)
                continue
            await self._drop()
            try:
                await self._connect()
                self.reconnects += 1
                log.warning("store change channel re-established (reconnect %d)", self.reconnects)
            except Exception as exc:
                log.debug("store change channel reconnect failed: %r", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()   # no goodbye over a connection that may be half dead

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._up = False
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 1.0)
            self._conn = None
