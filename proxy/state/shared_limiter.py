"""One node's limits shared by its worker processes: counters in the supervisor, workers ask over a Unix socket.

Per-process counters would multiply every limit by the worker count (the most reported
bug in LiteLLM's and Kong's trackers). Instead the supervisor runs `LimiterServer` over
one `LocalLimiter`, and each worker's `SocketLimiter` sends it every admission. One
process decides, so the limits are exactly those of a single process.

Wire format: one JSON object per line.
  worker -> server  {"a": id, "s": [[key_id, inherited, [rpm, tpm, conc, day, month]], ...], "t": tokens}
                    {"settle": id, "t": tokens}                  (no answer)
  server -> worker  {"a": id, "w": [limit, remaining, reset] | null}
                    {"a": id, "over": [kind, key_id, inherited, limit, remaining, reset_s, retry_after]}
A worker that dies holds nothing: its connection's open grants are settled when it drops.
Unreachable server: the request is refused with 503 (fail closed), never let through unmetered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreUnavailable
from ..quotas import LIMIT_FIELDS, Limits
from .limits import Grant, Limiter, LocalLimiter, OverLimit, Scope

log = logging.getLogger(__name__)

# A worker waits this long for an answer; the server answers from memory in microseconds.
ANSWER_TIMEOUT_S = 5.0


def _encode_scope(scope: Scope) -> list[Any]:
    return [scope.key_id, scope.inherited, [getattr(scope.limits, f) for f in LIMIT_FIELDS]]


def _decode_scope(raw: list[Any]) -> Scope:
    key_id, inherited, values = raw
    return Scope(str(key_id), Limits(**dict(zip(LIMIT_FIELDS, (int(v) for v in values), strict=True))), bool(inherited))


@dataclass(eq=False)
class _Connection:
    """One worker's connection and the grants it holds, settled if it drops."""

    writer: asyncio.StreamWriter
    grants: dict[int, Grant] = field(default_factory=dict)


class LimiterServer:
    """Serves one `LocalLimiter` to the workers on a Unix socket (in the supervisor)."""

    def __init__(self, limiter: LocalLimiter, path: Path) -> None:
        self.limiter = limiter
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        self.path.chmod(0o600)   # only this user's processes may spend another key's quota

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in list(self._connections):
            conn.writer.close()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        self._connections.add(conn)
        try:
            while line := await reader.readline():
                answer = self._handle(conn, json.loads(line))
                if answer is not None:
                    writer.write(answer)
        except (ConnectionError, ValueError, KeyError, TypeError) as exc:
            log.warning("limiter: dropping a worker connection: %s", exc)
        finally:
            self._connections.discard(conn)
            for grant in conn.grants.values():   # the worker is gone: its requests are over
                self.limiter.settle(grant, grant.tokens)
            writer.close()

    def _handle(self, conn: _Connection, msg: dict[str, Any]) -> bytes | None:
        if "settle" in msg:
            grant = conn.grants.pop(int(msg["settle"]), None)
            if grant is not None:
                self.limiter.settle(grant, int(msg["t"]))
            return None
        request_id = int(msg["a"])
        scopes = [_decode_scope(s) for s in msg["s"]]
        try:
            grant = self.limiter.acquire_now(scopes, int(msg["t"]))
        except OverLimit as over:
            return _line({"a": request_id, "over": [over.kind, over.scope.key_id, over.scope.inherited,
                                                    over.limit, over.remaining, over.reset_s, over.retry_after]})
        if grant.key_ids:   # an unlimited request holds nothing to settle
            conn.grants[request_id] = grant
        return _line({"a": request_id, "w": list(grant.rpm_window) if grant.rpm_window else None,
                      "held": bool(grant.key_ids)})


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


@dataclass(eq=False)
class RemoteGrant(Grant):
    remote_id: int = 0
    held: bool = True


class SocketLimiter(Limiter):
    """A worker's view of the supervisor's `LimiterServer`; connects lazily and reconnects after a loss."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._connecting: asyncio.Lock | None = None

    async def acquire(self, scopes: Sequence[Scope], tokens: int) -> Grant:
        bound = [s for s in scopes if not s.limits.unlimited()]
        if not bound:
            return Grant((), tokens)   # nothing to count: no round trip
        self._next_id += 1
        request_id = self._next_id
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            writer = await self._connection()
            writer.write(_line({"a": request_id, "s": [_encode_scope(s) for s in bound], "t": tokens}))
            msg = await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(f"limiter_unavailable: {exc or type(exc).__name__}") from exc
        finally:
            self._pending.pop(request_id, None)
        if "over" in msg:
            kind, key_id, inherited, limit, remaining, reset_s, retry_after = msg["over"]
            raise OverLimit(kind, Scope(key_id, Limits(), inherited), limit, remaining, reset_s, retry_after)
        window = msg.get("w")
        return RemoteGrant(tuple(s.key_id for s in bound), tokens,
                           rpm_window=tuple(window) if window else None,
                           remote_id=request_id, held=bool(msg.get("held")))

    def settle(self, grant: Grant, tokens: int) -> None:
        if grant.settled:
            return
        grant.settled = True
        if not isinstance(grant, RemoteGrant) or not grant.held:
            return
        writer = self._writer
        if writer is not None and not writer.is_closing():
            # Fire and forget: the write is queued now, in order after the acquire it settles.
            writer.write(_line({"settle": grant.remote_id, "t": tokens}))
        # Otherwise the connection is gone, and the server settled this grant when it dropped.

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                self._reader_task = asyncio.create_task(self._read_answers(reader, self._writer))
        return self._writer

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                waiter = self._pending.get(int(msg["a"]))
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        except (ConnectionError, ValueError) as exc:
            log.warning("limiter connection lost: %s", exc)
        finally:
            writer.close()
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("limiter connection lost"))
