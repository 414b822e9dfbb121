"""A byte-level TCP relay between seekgate and the real Triton, recording what crossed it.

Tests use it to prove a refused request never reached Triton: the bytes of that
request must not appear in what the relay saw. It also lets a test cut Triton off, hold
Triton's answers back mid-stream, and see when seekgate closed a given upstream connection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class RelayedConnection:
    """One connection from seekgate to Triton: what seekgate sent on it, and whether seekgate closed it."""
    seen: bytearray = field(default_factory=bytearray)
    closed: threading.Event = field(default_factory=threading.Event)


class TcpRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._seen = bytearray()
        self._lock = threading.Lock()
        self.port = 0
        self.blocked = False
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections: list[RelayedConnection] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._hold_marker: bytes | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TcpRelay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: RelayedConnection | None) -> None:
        """Copies one direction; `conn` for seekgate's side (recorded), None for Triton's answers."""
        try:
            while data := await reader.read(65536):
                if conn is not None:
                    with self._lock:
                        self._seen += data
                        conn.seen += data
                else:
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
                if conn is None and self._hold_marker is not None and self._hold_marker in data:
                    self._hold_marker = None
                    self._flowing.clear()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if conn is not None:   # seekgate's side ended (EOF or reset): it closed the connection
                conn.closed.set()
            try:
                writer.close()
            except RuntimeError:  # the relay's loop is already stopping
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:  # Triton "down": refuse like a closed port would
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        conn = RelayedConnection()
        with self._lock:
            self.connections.append(conn)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, conn), self._pipe(up_reader, writer, None))
        except asyncio.CancelledError:   # stop(): asyncio logs a handler task that ends cancelled
            pass

    def block(self, blocked: bool = True) -> None:
        """Triton unreachable: new connections refused, pooled ones cut."""
        self.blocked = blocked
        if blocked:
            def cut() -> None:
                for w in list(self._writers):
                    w.close()
                self._writers.clear()
            self._loop.call_soon_threadsafe(cut)

    def hold_after(self, marker: bytes) -> None:
        """Triton's answers stop flowing (held, not dropped) right after the next chunk holding `marker`."""
        self._loop.call_soon_threadsafe(setattr, self, "_hold_marker", marker)

    def let_flow(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def connection_carrying(self, marker: bytes) -> RelayedConnection | None:
        """The upstream connection that carried `marker` from seekgate to Triton, if one did."""
        with self._lock:
            return next((c for c in self.connections if marker in c.seen), None)

    def seen(self) -> bytes:
        with self._lock:
            return bytes(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            for conn in self.connections:
                conn.seen.clear()

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)


@contextmanager
def relays_to(*ports: int) -> Iterator[tuple[TcpRelay, ...]]:
    """A started relay to 127.0.0.1:<port> for each port (Triton's HTTP, gRPC), stopped at exit."""
    relays = tuple(TcpRelay("127.0.0.1", port).start() for port in ports)
    try:
        yield relays
    finally:
        for relay in relays:
            relay.stop()
