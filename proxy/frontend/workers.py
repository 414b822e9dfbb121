"""`seekgate serve --workers N`: N server processes on the same ports, and a supervisor holding what they share.

Each worker is a full seekgate (proxy.frontend.http.run) binding the HTTP and gRPC ports with
SO_REUSEPORT, so the kernel spreads connections across them. What must be one thing for the
node stays in the supervisor:
- the limit counters (`LimiterServer`): limits are exact, never multiplied by N;
- /metrics: the workers write prometheus_client's multi-process files, the supervisor sums them.
Everything else is already shared through files: keys and revocations through the SQLite store
(a change bumps its revision, which every worker checks before trusting its cache), policies
through the policy directory (each worker's watcher reloads within `policy.reload_interval_s`),
and the audit log (one JSONL file per worker, one shared audit.db index).

A worker that dies is restarted; its open grants are released when its limiter connection drops.
SIGTERM/SIGINT: every worker drains (see run()), then the supervisor exits 0 if all of them did.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from ..settings import Settings, SettingsError
from ..state.limits import LocalLimiter
from ..state.shared_limiter import LimiterServer
from ..store.budgets import BudgetStore, budget_store_path
from .http import install_uvloop, run
from .http_guard import name_the_server
from .tls import ServerTls, plaintext_refusal, tls_enabled
from .tls_site import listener_site
from .worker_role import WorkerRole

log = logging.getLogger("seekgate.workers")

_SPAWN = multiprocessing.get_context("spawn")   # no fork: a forked event loop or SQLite handle is unsafe
_WORKER_START_S = 60.0
_CHECK_INTERVAL_S = 0.5
_STABLE_S = 60.0        # a worker up this long that dies is restarted at once
_BACKOFF_MAX_S = 30.0


def worker_main(settings: Settings, role: WorkerRole, started: ProcessEvent) -> None:
    """A worker process: one seekgate sharing the ports; `started` is set once it listens."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s w{role.index} %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; the supervisor's SIGTERM is what stops a worker,
    # so a terminal's SIGINT doesn't cut the drain short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_uvloop()

    async def main() -> None:
        ready = asyncio.Event()
        server = asyncio.create_task(run(settings, ready, worker=role, freeze_heap=True))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            started.set()
        waiter.cancel()
        await server

    asyncio.run(main())


class Supervisor:
    """Starts, watches, restarts and finally drains the workers."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.metrics_dir = run_dir / "metrics"
        self.limiter_socket = run_dir / "limiter.sock"
        self.workers: dict[int, SpawnProcess] = {}
        self._stopping = False
        # index -> (restarts in a row, loop time of the last start): a worker that keeps dying at
        # start (a port taken, a broken config) is retried ever more slowly, not in a hot loop.
        self._restarts: dict[int, tuple[int, float]] = {}

    def _spawn(self, index: int) -> tuple[SpawnProcess, ProcessEvent]:
        started = _SPAWN.Event()
        proc = _SPAWN.Process(target=worker_main, name=f"seekgate-worker-{index}", daemon=False,
                              args=(self.settings, WorkerRole(index, self.limiter_socket), started))
        proc.start()
        self.workers[index] = proc
        return proc, started

    async def start_workers(self) -> None:
        """All workers listening, or an error naming the first that did not come up."""
        pending = [(i, *self._spawn(i)) for i in range(1, self.settings.server.workers + 1)]
        deadline = asyncio.get_running_loop().time() + _WORKER_START_S
        for index, proc, started in pending:
            while not started.is_set():
                if proc.exitcode is not None or asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"worker {index} did not start (exit code {proc.exitcode}); "
                                       "its log above says why")
                await asyncio.sleep(0.05)

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart a worker that died while not stopping; a crash must not shrink the pool for good."""
        while not stop.is_set():
            now = asyncio.get_running_loop().time()
            for index, proc in list(self.workers.items()):
                if proc.exitcode is None or self._stopping:
                    continue
                streak, started = self._restarts.get(index, (0, float("-inf")))
                if now - started > _STABLE_S:
                    streak = 0   # it ran a good while: a fresh crash, restart at once
                if now - started < min(_BACKOFF_MAX_S, 2.0 ** streak) - 1.0:
                    continue
                log.error("worker %d (pid %s) exited with %s; restarting it", index, proc.pid, proc.exitcode)
                multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))
                self._spawn(index)
                self._restarts[index] = (streak + 1, now)
            try:
                await asyncio.wait_for(stop.wait(), _CHECK_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    async def drain(self) -> bool:
        """SIGTERM to every worker, wait for them to drain; True if every one exited 0."""
        self._stopping = True
        s = self.settings.server
        for proc in self.workers.values():
            if proc.exitcode is None:
                proc.terminate()
        deadline = s.shutdown_delay_s + s.drain_timeout_s + 15.0   # + start-up of the drain and the audit flush
        loop = asyncio.get_running_loop()
        ok = True
        for index, proc in self.workers.items():
            await loop.run_in_executor(None, proc.join, deadline)
            if proc.exitcode is None:
                log.error("worker %d did not finish draining in %.0f s; killing it", index, deadline)
                proc.kill()
                await loop.run_in_executor(None, proc.join, 5.0)
            ok = ok and proc.exitcode == 0
        return ok

    def metrics_app(self) -> web.Application:
        async def handler(_: web.Request) -> web.Response:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))
            body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.on_response_prepare.append(name_the_server)   # its 404s too
        app.router.add_get("/metrics", handler)
        return app


async def supervise(settings: Settings, ready: asyncio.Event | None = None,
                    stop: asyncio.Event | None = None) -> bool:
    """Runs the workers until `stop` or SIGINT/SIGTERM; True if they all drained cleanly."""
    run_dir = Path(settings.data_dir) / "run"
    # Read by prometheus_client when a worker imports it: values go to files the supervisor sums.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prepare_metrics_dir(run_dir))
    sup = Supervisor(settings, run_dir)
    # The one process that counts also keeps the day/month budgets on disk across restarts.
    counters = LocalLimiter(budgets=await BudgetStore.open(budget_store_path(Path(settings.data_dir))))
    await counters.start()
    limiter = LimiterServer(counters, sup.limiter_socket)
    await limiter.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):   # not the main thread: the caller sets `stop`
            pass
    metrics_runner = web.AppRunner(sup.metrics_app(), access_log=None)
    await metrics_runner.setup()
    # The workers reload their own TLS files; the supervisor's metrics listener watches the same files
    # itself, so a renewal reaches :8002 too (errors are logged by ServerTls; counted by the workers).
    metrics_tls = ServerTls(settings.server) if tls_enabled(settings.server) else None
    reload_tls = asyncio.create_task(metrics_tls.watch()) if metrics_tls else None
    try:
        await listener_site(metrics_runner, settings.server.host, settings.server.metrics_port,
                            metrics_tls.context if metrics_tls else None, settings.server.read_timeout_s).start()
        await sup.start_workers()
        log.info("seekgate: %d workers on %s://%s:%d, grpc :%d, metrics :%d", settings.server.workers,
                 "https" if metrics_tls else "http",
                 settings.server.host, settings.server.http_port, settings.server.grpc_port,
                 settings.server.metrics_port)
        if ready is not None:
            ready.set()
        await sup.watch(stop)
    finally:
        if reload_tls is not None:
            reload_tls.cancel()
        clean = await sup.drain()
        # After the workers: a request still draining may settle its grant until the end.
        await limiter.close()
        await counters.close()
        await metrics_runner.cleanup()
    return clean


def prepare_metrics_dir(run_dir: Path) -> Path:
    """An empty directory for this run's metric files (old ones would add a dead run's counts)."""
    metrics_dir = run_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, mode=0o700)
    return metrics_dir


def serve_workers(settings: Settings) -> None:
    """Blocking entry point for `seekgate serve --workers N` (N > 1); exits non-zero if a worker failed."""
    if not asyncio.run(supervise(settings)):
        raise SystemExit(1)


def serve(settings: Settings) -> None:
    """Blocking entry point for `seekgate serve`; `server.workers` > 1 hands over to the supervisor."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    refusal = plaintext_refusal(settings.server)
    if refusal is not None:   # secure by default, before any worker starts
        raise SettingsError([refusal])
    if settings.server.workers > 1:
        serve_workers(settings)
        return
    install_uvloop()
    asyncio.run(run(settings, freeze_heap=True))
