"""Real PostgreSQL for tests: the running server if one answers, else a private one started here.

`SEEKGATE_TEST_POSTGRES_URL` (default postgresql://postgres@127.0.0.1:5432/postgres) names an
admin connection to a server that tests may create databases on; each test gets a fresh
database with a random name, dropped afterwards. When nothing answers there, a private server
is made with Debian's `initdb` + `pg_ctl` in a temporary directory on a free port (as the
`postgres` user when running as root, which initdb refuses). Tests that stop a server always
use a `PrivatePostgres` of their own, never the shared one.
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from proxy.local.triton import free_ports

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run scripts/system-packages")
    return found


async def answers(url: str, timeout_s: float = 2.0) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=timeout_s)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
    await conn.close()
    return True


class PrivatePostgres:
    """A PostgreSQL server of this test run alone: `start()`, `stop()` (fast), `start()` again, `destroy()`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="seekgate-pg-"))
        self.port = free_ports(1)[0]
        self.data = self.root / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:   # initdb and postgres refuse to run as root
            shutil.chown(self.root, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._as, *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass   # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


async def create_database(admin_url: str) -> str:
    """A new empty database on the server of `admin_url`; its URL."""
    name = "seekgate_test_" + secrets.token_hex(6)
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + "/" + name


async def drop_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def admin_url_or_private() -> tuple[str, PrivatePostgres | None]:
    """The shared server's admin URL if it answers, else a private server's (started; destroy it after)."""
    url = os.environ.get("SEEKGATE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    if asyncio.run(answers(url)):
        return url, None
    private = PrivatePostgres()
    private.start()
    return private.url, private


# ------------------------------------------------------------------ Redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


class PrivateRedis:
    """A redis-server of this test alone, on a free port: `start()`, `stop()`, `start()` again.

    No persistence (a restart is an empty Redis) unless `persistent`: then every write is in its
    append-only file before it answers, and a restart has the data (keys whose expiry passed while
    it was stopped gone). DEBUG (SLEEP) is allowed from loopback.
    """

    def __init__(self, *, persistent: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="seekgate-redis-"))
        self.port = free_ports(1)[0]
        self.persistent = persistent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed: run scripts/system-packages")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self._proc = subprocess.Popen([server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                       *persistence, "--dir", str(self.root), "--enable-debug-command", "local"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if redis_answers(self.url):
                return
            time.sleep(0.05)
        raise RuntimeError(f"private redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def redis_url_or_private() -> tuple[str, PrivateRedis | None]:
    """The shared Redis if it answers (SEEKGATE_TEST_REDIS_URL or the default), else a private one started here."""
    url = os.environ.get("SEEKGATE_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    if redis_answers(url):
        return url, None
    private = PrivateRedis()
    private.start()
    return private.url, private


class PrivateRedisCluster:
    """A Redis Cluster of this test run alone: `masters` masters (`redis-server --cluster-enabled yes`), each
    with `replicas` replicas, on free ports in a temporary directory, joined with `redis-cli --cluster
    create`; `destroy()` ends them. `node_timeout_ms` is `cluster-node-timeout`: how long a master may be
    unreachable before the others mark it failed and a replica takes its slots."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="seekgate-redis-cluster-"))
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        nodes = masters * (1 + replicas)
        # Each node's cluster bus on a port of its own (by default port + 10000, past 65535 for an
        # ephemeral port).
        ports = free_ports(2 * nodes)
        self.ports, self.bus_ports = ports[:nodes], ports[nodes:]
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The URL seekgate is configured with: the cluster scheme and one node (the rest are discovered)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server or redis-cli is not installed: run scripts/system-packages")
        for port in self.ports:
            (self.root / str(port)).mkdir()
            self.start_node(port, joined=False)
        # redis-cli makes the first `masters` nodes the masters and the rest their replicas.
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        if not _wait(self._ready, tries=600):
            raise RuntimeError("the private Redis Cluster did not reach cluster_state:ok")

    def start_node(self, port: int, *, joined: bool = True) -> None:
        """Starts the node of `port` (again: with its nodes.conf it rejoins with its slots, its data gone)."""
        node = self.root / str(port)
        bus = self.bus_ports[self.ports.index(port)]
        self._procs[port] = subprocess.Popen(
            [str(shutil.which("redis-server")), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", str(node / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no",
             "--dir", str(node), "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _wait(lambda: redis_answers(f"redis://127.0.0.1:{port}/0")):
            raise RuntimeError(f"cluster node on port {port} did not answer")
        if joined and not _wait(self._ready, tries=600):
            raise RuntimeError("the private Redis Cluster did not reach cluster_state:ok again")

    def stop_node(self, port: int) -> None:
        proc = self._procs.pop(port)
        proc.terminate()
        proc.wait(timeout=10)

    def kill_node(self, port: int) -> None:
        """SIGKILLs the node of `port`: no shutdown, no goodbye to the cluster (a crash, a lost machine)."""
        proc = self._procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def live_ports(self) -> list[int]:
        return [port for port in self.ports if port in self._procs]

    def port_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot (as a running node sees it)."""
        import redis
        from redis.crc import key_slot
        slot = key_slot(key.encode())
        client = redis.Redis(port=self.live_ports()[0], socket_timeout=2)
        try:
            for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    return int(master[1])
        finally:
            client.close()
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, port: int) -> int:
        """The port of a replica of the master on `port` whose link to it is up (data in sync)."""
        import redis
        client = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
        try:
            for name, value in client.info("replication").items():
                if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online":
                    return int(value["port"])
        finally:
            client.close()
        raise RuntimeError(f"the master on port {port} has no replica online")

    def wait_replicated(self, port: int, timeout_ms: int = 5000) -> int:
        """WAIT on the master of `port`: returns once its replicas acknowledged every write so far
        (how many did); Redis Cluster replicates asynchronously, so a write not yet acknowledged may be
        lost when a replica takes over."""
        import redis
        client = redis.Redis(port=port, socket_timeout=timeout_ms / 1000 + 2)
        try:
            return int(client.execute_command("WAIT", self.replicas, timeout_ms))
        finally:
            client.close()

    def failed_over(self, port: int) -> bool:
        """Whether every running node sees the slots of the (dead) master of `port` served by another."""
        return self._every_live_node(lambda client: not any(
            int(master[1]) == port for _, _, master, *_ in client.execute_command("CLUSTER", "SLOTS")))

    def _ready(self) -> bool:
        def ready(client: Any) -> bool:
            ranges = client.execute_command("CLUSTER", "SLOTS")
            if len(ranges) != self.masters:   # every node knows every master's slots
                return False
            if any(len(r) < 3 + self.replicas for r in ranges):   # ... and their replicas
                return False
            info = client.info("replication")
            return not (info.get("role") == "slave" and info.get("master_link_status") != "up")
        return self._every_live_node(ready, decode_responses=True)

    def _every_live_node(self, check: Callable[[Any], bool], **options: Any) -> bool:
        """Whether every running node says its cluster is ok and passes `check` (a client to it); False on any error."""
        import redis
        for port in self.live_ports():
            client = redis.Redis(port=port, socket_timeout=2, **options)
            try:
                if client.cluster("info").get("cluster_state") != "ok" or not check(client):
                    return False
            except (redis.RedisError, OSError):
                return False
            finally:
                client.close()
        return True

    def destroy(self) -> None:
        for proc in self._procs.values():
            proc.terminate()
        for proc in self._procs.values():
            proc.wait(timeout=10)
        self._procs = {}
        shutil.rmtree(self.root, ignore_errors=True)


def _wait(ready: Callable[[], bool], tries: int = 100) -> bool:
    for _ in range(tries):
        if ready():
            return True
        time.sleep(0.05)
    return False
