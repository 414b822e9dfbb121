"""The PostgreSQL change channel: NOTIFY moves the word; a listener killed server-side degrades safely and resyncs."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.store.pg_changes import application_name
from proxy.store.postgres import PostgresStore
from tests.store.test_backend import rec


async def wait_for(cond: object, timeout_s: float = 5.0) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():  # type: ignore[operator]
        assert loop.time() - start < timeout_s, "condition not met in time"
        await asyncio.sleep(0.005)
    return loop.time() - start


async def test_a_listener_killed_server_side_reads_through_until_it_is_back(pg_url: str) -> None:
    async with await PostgresStore.open(pg_url, auto_migrate=True) as writer, \
            await PostgresStore.open(pg_url) as replica:
        assert replica.listener.connected
        steady = replica.change_signal()
        assert replica.change_signal() == steady

        # Both stores run in this process: pick the replica's listener by its backend pid.
        pid = replica.listener.server_pid()
        admin = await asyncpg.connect(pg_url)
        try:
            name = await admin.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
            assert name == application_name()
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        # Lost: every read of the word is new, so the key cache re-reads the change sequence each request.
        await wait_for(lambda: not replica.listener.connected, 1.0)
        assert replica.change_signal() != replica.change_signal()
        # Back within the reconnect backoff, with the word moved once more (the resync).
        await wait_for(lambda: replica.listener.connected, 3.0)
        assert replica.listener.reconnects >= 1
        resumed = replica.change_signal()
        assert replica.change_signal() == resumed and resumed != steady
        await writer.create_key(rec("k"))
        took = await wait_for(lambda: replica.change_signal() != resumed, 1.0)
        assert took < 1.0


async def test_a_ping_failing_with_an_unnamed_error_marks_the_channel_lost_and_the_loop_lives_on(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen under a PostgreSQL shutting down: the ping raised asyncpg's InternalClientError, which the
    # loop did not expect; it died, and the channel (so readiness) stayed "up" with the server gone.
    async with await PostgresStore.open(pg_url, auto_migrate=True) as store:
        assert store.listener.connected
        real = asyncpg.connection.Connection.fetchval

        async def caught_mid_shutdown(self: asyncpg.Connection, query: str, *args: object, **kw: object) -> object:
            if query == "SELECT 1":
                raise asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
            return await real(self, query, *args, **kw)

        monkeypatch.setattr(asyncpg.connection.Connection, "fetchval", caught_mid_shutdown)
        await wait_for(lambda: not store.listener.connected, 2.0)
        monkeypatch.setattr(asyncpg.connection.Connection, "fetchval", real)
        await wait_for(lambda: store.listener.connected, 3.0)   # the loop reconnected: it did not die
        assert store.listener.reconnects >= 1
