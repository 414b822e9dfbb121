"""A byte-level TCP relay between seekgate and the real Triton, recording what crossed it.

Tests use it to prove a refused request never reached Triton: the bytes of that
request must not appear in what the relay saw. It also lets a test cut Triton off, hold
Triton's answers back mid-stream, break one connection off mid-answer, hold one request of seekgate's (by a tag in its bytes) so it
stays in flight, and see when seekgate closed a given upstream connection. Byte-level, it relays
any backend: with Redis behind it, a test can lose the answer to one command after Redis ran it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class _UnitEnds:
    """Where the units of Triton's answers end on one connection, so a hold never splits one.

    A unit is an HTTP/2 frame (gRPC), or over HTTP/1.1 an SSE event: up to its blank line, with
    the chunk's closing CRLF when it follows at once. Fed every byte of the connection in order.
    """

    def __init__(self) -> None:
        self._http2: bool | None = None
        self._header = b""      # HTTP/2: the bytes of a frame header read so far
        self._left = 0          # HTTP/2: payload bytes of the current frame still to come
        self._last = b""        # HTTP/1.1: the byte before this read

    def ends(self, data: bytes) -> list[int]:
        """Offsets into `data` just past each unit that ends in it."""
        if self._http2 is None:
            self._http2 = not data.startswith(b"HTTP/")
        return self._frames(data) if self._http2 else self._events(data)

    def _events(self, data: bytes) -> list[int]:
        seen, self._last = self._last + data, data[-1:]
        ends, at = [], seen.find(b"\n\n")
        while at != -1:
            end = at + 2 + (2 if seen.startswith(b"\r\n", at + 2) else 0)
            ends.append(end - (len(seen) - len(data)))
            at = seen.find(b"\n\n", end)
        return [e for e in ends if e > 0]

    def _frames(self, data: bytes) -> list[int]:
        ends, i = [], 0
        while i < len(data):
            if self._left == 0 and len(self._header) < 9:
                take = data[i:i + 9 - len(self._header)]
                self._header += take
                i += len(take)
                if len(self._header) == 9:
                    self._left = int.from_bytes(self._header[:3], "big")
                    if self._left == 0:
                        ends.append(i)
                        self._header = b""
                continue
            step = min(self._left, len(data) - i)
            i += step
            self._left -= step
            if self._left == 0:
                ends.append(i)
                self._header = b""
        return ends


class RequestHold:
    """One request of seekgate's kept from Triton (`TcpRelay.hold_requests`): `held` is set once it
    arrived; it goes on to Triton at `release()`, or by itself `limit_s` after it arrived, so a test
    that fails before releasing it never leaves a request hanging."""

    def __init__(self, relay: TcpRelay, tag: bytes, limit_s: float) -> None:
        self.tag, self.limit_s = tag, limit_s
        self.held = threading.Event()
        self._relay = relay
        self._released = asyncio.Event()   # waited on and set in the relay's loop only

    def release(self) -> None:
        try:
            self._relay._loop.call_soon_threadsafe(self._released.set)
        except RuntimeError:   # the relay has stopped: nothing waits any more
            pass

    async def wait(self) -> None:
        """In the relay's loop: until released, or limit_s."""
        self.held.set()
        try:
            await asyncio.wait_for(self._released.wait(), self.limit_s)
        except TimeoutError:
            pass


@dataclass
class RelayedConnection:
    """One connection from seekgate to Triton: what seekgate sent on it, and whether seekgate closed it."""
    seen: bytearray = field(default_factory=bytearray)
    closed: threading.Event = field(default_factory=threading.Event)
    ends: tuple[asyncio.StreamWriter, ...] = ()   # seekgate's side, Triton's side: what cut() closes
    answer_lost: threading.Event | None = None     # set: the next answer on it is thrown away (lose_answer)


class TcpRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._seen = bytearray()
        self._lock = threading.Lock()
        self._grew = threading.Condition(self._lock)   # notified whenever seekgate sends more
        self.port = 0
        self.blocked = False
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections: list[RelayedConnection] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._hold_marker: bytes | None = None
        self.holding = threading.Event()   # set while hold_after's hold is in force
        self._request_holds: dict[bytes, RequestHold] = {}   # tag -> its hold, until a request carries it
        self._answer_losses: dict[bytes, threading.Event] = {}   # tag -> lose_answer's event, likewise
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
                    conn: RelayedConnection | None, answers_of: RelayedConnection | None = None) -> None:
        """Copies one direction; `conn` for seekgate's side (recorded), None for Triton's answers
        (those to `answers_of`'s requests)."""
        units = _UnitEnds() if conn is None else None
        cut_at_next_end = False   # the marker was seen, but its unit goes on in the next read
        tail = b""                # seekgate's side: the end of the previous read, for a tag split across two
        try:
            while data := await reader.read(65536):
                if conn is not None:
                    with self._lock:
                        self._seen += data
                        conn.seen += data
                        self._grew.notify_all()
                        hold = next((h for t, h in self._request_holds.items() if t in tail + data), None)
                        if hold is not None:
                            del self._request_holds[hold.tag]
                        lost = next((t for t in self._answer_losses if t in tail + data), None)
                        if lost is not None:   # marked before it goes on: its answer cannot come first
                            conn.answer_lost = self._answer_losses.pop(lost)
                    tail = data[-256:]
                    if hold is not None:   # kept from Triton (this connection only) until released
                        await hold.wait()
                    writer.write(data)
                    await writer.drain()
                    continue
                assert units is not None
                if answers_of is not None and (lost_event := answers_of.answer_lost) is not None:
                    # The backend has acted on the request and answered: its answer is dropped and the
                    # connection cut both ways, so the client sees it break with no answer.
                    answers_of.answer_lost = None
                    for end in answers_of.ends:
                        end.close()
                    lost_event.set()
                    return
                await self._flowing.wait()
                ends = units.ends(data)
                marker = self._hold_marker
                if not cut_at_next_end and marker is not None and (at := data.find(marker)) != -1:
                    self._hold_marker = None
                    ends = [e for e in ends if e >= at + len(marker)]
                    cut_at_next_end = True
                if cut_at_next_end and ends:
                    # The unit that carried the marker goes through whole; what follows it in this
                    # read waits with everything later, however Triton's bytes were batched.
                    cut_at_next_end = False
                    writer.write(data[:ends[0]])
                    await writer.drain()
                    data = data[ends[0]:]
                    self._flowing.clear()
                    self.holding.set()
                    await self._flowing.wait()
                    self.holding.clear()
                writer.write(data)
                await writer.drain()
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
        conn = RelayedConnection(ends=(writer, up_writer))
        with self._lock:
            self.connections.append(conn)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, conn),
                                 self._pipe(up_reader, writer, None, answers_of=conn))
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
        """Triton's answers stop flowing (held, not dropped) right after the unit carrying `marker`.

        The unit (an SSE event, an HTTP/2 frame) goes through whole and nothing after it does, even
        when Triton's next events arrived in the same read: on a busy machine they often do.
        """
        self._loop.call_soon_threadsafe(setattr, self, "_hold_marker", marker)

    def hold_requests(self, tag: bytes, limit_s: float = 60.0) -> RequestHold:
        """The next request seekgate sends carrying `tag` (up to 256 bytes) waits here, not forwarded to Triton,
        until the hold's `release()` or `limit_s` after it arrived: seekgate sees a slow Triton on that one
        connection, and everything else flows. Tags should be unique per request."""
        hold = RequestHold(self, tag, limit_s)
        with self._lock:
            self._request_holds[tag] = hold
        return hold

    def lose_answer(self, tag: bytes) -> threading.Event:
        """The next request carrying `tag` (up to 256 bytes) goes through to the backend, which acts on it;
        its answer is thrown away and that connection cut both ways as the answer arrives: the client
        sees its connection drop after the backend ran the request (an answer lost on the way). The
        event is set once that happened."""
        lost = threading.Event()
        with self._lock:
            self._answer_losses[tag] = lost
        return lost

    def cut(self, conn: RelayedConnection) -> None:
        """That one connection broken off in both directions, mid-answer: seekgate sees Triton's answer
        end before it is complete (as when Triton crashes), Triton sees its client go."""
        def close() -> None:
            for w in conn.ends:
                w.close()
        self._loop.call_soon_threadsafe(close)

    def let_flow(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def connection_carrying(self, marker: bytes) -> RelayedConnection | None:
        """The upstream connection that carried `marker` from seekgate to Triton, if one did."""
        with self._lock:
            return next((c for c in self.connections if marker in c.seen), None)

    def wait_seen(self, check: Callable[[bytes], bool], timeout: float) -> bool:
        """Waits until what seekgate sent satisfies `check`; woken by each new byte, not by polling.

        `timeout` bounds only a failure: a test passes as soon as the bytes arrive, however loaded
        the machine, so make it generous.
        """
        with self._grew:
            return self._grew.wait_for(lambda: check(bytes(self._seen)), timeout)

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
