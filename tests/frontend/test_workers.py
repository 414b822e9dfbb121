"""`seekgate serve --workers 2` against the real Triton: shared ports, exact limits, changes seen by every worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import yaml

from proxy.cli.devcert import make_dev_certs
from proxy.local.triton import TritonProcess
from tests.conftest import REPO, free_ports
from tests.frontend.test_tls import fingerprint, https_call, s_client, served_fingerprint
from tests.gateway import Gateway, metric, wait_for


class Workers:
    """A `seekgate serve --workers 2` subprocess over its own data dir and policy copy."""

    def __init__(self, root: Path, triton: TritonProcess, **server: Any) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        self.gw = Gateway(root, triton.http_url, [self.http, self.grpc, self.metrics])   # issues keys, no server
        self.data_dir = self.gw.data_dir
        self.policy_dir = self.gw.policy_dir
        self.config = root / "seekgate.yaml"
        self.config.write_text(yaml.safe_dump({
            "data_dir": str(self.data_dir),
            "server": {"http_port": self.http, "grpc_port": self.grpc, "metrics_port": self.metrics,
                       "shutdown_delay_s": 1.0, "drain_timeout_s": 10.0, **server},
            "upstream": {"http_url": triton.http_url, "grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"},
            "policy": {"directory": str(self.policy_dir), "reload_interval_s": 0.2},
        }))
        self.url = f"http://127.0.0.1:{self.http}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics}/metrics"
        self.log = root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Workers:
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(self.config),
                                      "--workers", "2"], cwd=REPO, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        # The supervisor logs this line once every worker listens.
        assert wait_for(lambda: "2 workers on" in self.log.read_text() or self.proc.poll() is not None, 60), \
            self.log.read_text()[-3000:]   # once seen in a full CI run (not reproduced): what the supervisor said
        assert self.proc.poll() is None, self.log.read_text()
        assert len(self.listening()) == 2
        return self

    def listening(self) -> list[int]:
        """The worker processes' pids (multiprocessing's resource tracker is a child too, and not one)."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except FileNotFoundError:
            return []
        pids = []
        for pid in children:
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except FileNotFoundError:
                pass
        return pids

    def request(self, method: str, path: str, key: str | None = None, body: Any = None) -> tuple[int, dict[str, str]]:
        """One request on a fresh connection (urllib never reuses one), so SO_REUSEPORT picks a worker each time."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    def get(self, path: str, key: str | None = None) -> tuple[int, dict[str, str]]:
        try:
            return self.request("GET", path, key)
        except (urllib.error.URLError, OSError):
            return 0, {}

    def audit_by_file(self) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for path in sorted((self.data_dir / "audit").glob("audit*.jsonl")):
            out[path.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return out

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def workers(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    w = Workers(tmp_path_factory.mktemp("workers"), triton, status_listen=f"127.0.0.1:{free_ports(1)[0]}").start()
    yield w
    w.stop()


def test_both_workers_serve_and_audit_into_their_own_files(workers: Workers) -> None:
    assert len(workers.listening()) == 2
    _, key = workers.gw.key()
    ids = set()
    for _ in range(30):
        status, headers = workers.request("GET", "/v2/models/deepseek", key)
        assert status == 200
        ids.add(headers["X-Request-Id"])
    assert wait_for(lambda: ids <= {r["request_id"] for recs in workers.audit_by_file().values() for r in recs}, 5)
    files = workers.audit_by_file()
    assert {"audit.w1.jsonl", "audit.w2.jsonl"} <= set(files)
    served = {name: len(ids & {r["request_id"] for r in recs}) for name, recs in files.items()}
    assert served["audit.w1.jsonl"] > 0 and served["audit.w2.jsonl"] > 0, served   # both took connections
    # `seekgate audit tail` merges the workers' files by time.
    out = subprocess.run([sys.executable, "-m", "proxy", "audit", "tail", "-n", "200", "--config",
                          str(workers.config)], cwd=REPO, capture_output=True, text=True, check=True).stdout
    tailed = [json.loads(line) for line in out.splitlines()]
    assert ids <= {r["request_id"] for r in tailed}
    assert [r["timestamp"] for r in tailed] == sorted(r["timestamp"] for r in tailed)


def test_every_worker_answers_on_the_status_listener(workers: Workers) -> None:
    """`server.status_listen` under --workers: each worker binds it (SO_REUSEPORT, like the API port) and answers
    the probes from its own state, audited in its own file; nothing else is served there."""
    url = "http://" + yaml.safe_load(workers.config.read_text())["server"]["status_listen"]

    def probes_by_file() -> dict[str, int]:
        return {name: sum(r["action"] == "health" for r in recs) for name, recs in workers.audit_by_file().items()}
    before = probes_by_file()
    for _ in range(20):   # a fresh connection each: the kernel picks a worker each time
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=30) as r:
            assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as not_served:
        urllib.request.urlopen(url + "/v2/models/deepseek", timeout=30)
    assert not_served.value.code == 404

    def both_answered() -> bool:
        after = probes_by_file()
        grown = [after[name] - before.get(name, 0) for name in after]
        return sum(grown) == 20 and len(grown) == 2 and min(grown) > 0
    assert wait_for(both_answered, 10), (before, probes_by_file())


def test_supervisor_serves_the_sum_of_the_workers_metrics(workers: Workers) -> None:
    _, key = workers.gw.key(owner="metrics-check")
    count = lambda: metric(workers, "seekgate_requests_total", model="deepseek", action="read", code="200")  # noqa: E731
    # Workers hand their counts to the supervisor about once a second: the earlier tests' requests
    # may still be on their way, so the baseline is a value that held over two hand-overs.
    previous, before = None, count()
    for _ in range(8):
        if before == previous:
            break
        time.sleep(1.2)
        previous, before = before, count()
    assert before == previous, "the supervisor's request count never settled"
    for _ in range(20):
        assert workers.request("GET", "/v2/models/deepseek", key)[0] == 200
    assert wait_for(lambda: count() - before == 20, 5)
    # Gauges fold per their mode: both workers see Triton up, so the min is 1.
    assert wait_for(lambda: metric(workers, "seekgate_upstream_up") == 1, 10)


def test_supervisor_metrics_answers_do_not_name_aiohttp(workers: Workers) -> None:
    for path, status in (("/metrics", 200), ("/nope", 404)):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{workers.metrics}{path}", timeout=30) as r:
                got = r.status, r.headers["Server"]
        except urllib.error.HTTPError as e:
            got = e.code, e.headers["Server"]
        assert got == (status, "seekgate")


def test_rate_limit_is_exact_across_workers(workers: Workers) -> None:
    _, key = workers.gw.key(owner="limited", limits={"rpm": 10})
    codes = [workers.request("GET", "/v2/models/deepseek", key)[0] for _ in range(30)]
    assert codes.count(200) == 10 and codes.count(429) == 20   # not 10 per worker
    refusals = [r for recs in workers.audit_by_file().values() for r in recs
                if r.get("actor") == "limited" and r.get("http_status") == 429]
    assert wait_for(lambda: len([r for recs in workers.audit_by_file().values() for r in recs
                                 if r.get("actor") == "limited" and r.get("http_status") == 429]) == 20, 5), refusals


def test_grpc_is_served_by_the_workers(workers: Workers) -> None:
    _, key = workers.gw.key(owner="grpc-user")
    for _ in range(6):   # a new channel each time: a new connection, any worker
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{workers.grpc}")
        try:
            assert client.is_model_ready("deepseek", headers={"authorization": f"Bearer {key}"})
        finally:
            client.close()


def test_revocation_through_one_worker_counts_on_the_next_request_in_every_worker(workers: Workers) -> None:
    _, admin = workers.gw.key(owner="ops", roles=("admin",))
    victim_id, victim = workers.gw.key(owner="victim")
    assert all(workers.request("GET", "/v2/models/deepseek", victim)[0] == 200 for _ in range(10))
    status, _ = workers.request("POST", f"/admin/v1/keys/{victim_id}/revoke", admin, {})
    assert status == 200
    # No waiting: every worker reads the store's change signal on each request (key_cache.py),
    # so once the revocation is reported done, the very next request anywhere is refused.
    assert [workers.request("GET", "/v2/models/deepseek", victim)[0] for _ in range(20)] == [401] * 20


def test_cli_revocation_and_policy_change_reach_every_worker(workers: Workers) -> None:
    key_id, key = workers.gw.key(owner="bob")

    def every_worker_answers(status: int) -> bool:
        # 20 fresh connections: SO_REUSEPORT spreads them over both workers.
        return all(workers.request("GET", "/v2/models/deepseek", key)[0] == status for _ in range(20))
    started = time.monotonic()
    assert every_worker_answers(200)
    probe_s = time.monotonic() - started   # one round of probes, on this machine as loaded as it is now
    deny = workers.policy_dir / "zz-deny-deepseek.yaml"
    deny.write_text(yaml.safe_dump({"rules": [{"id": "freeze-deepseek", "effect": "deny",
                                              "resources": ["model:deepseek"], "actions": ["*"]}]}))
    changed_at = time.monotonic()
    assert wait_for(lambda: every_worker_answers(403), 60)   # the event: both workers reloaded
    # Each worker polls the directory every 0.2 s, so the edit counts within a second (README);
    # seen through probes, plus the round under way when the last worker reloaded and the one
    # that saw it, each as long as the round measured above.
    assert time.monotonic() - changed_at < 1.0 + 2 * probe_s + 0.1
    deny.unlink()
    assert wait_for(lambda: every_worker_answers(200), 60)
    subprocess.run([sys.executable, "-m", "proxy", "keys", "revoke", key_id, "--config", str(workers.config)],
                   cwd=REPO, capture_output=True, check=True)
    assert every_worker_answers(401)   # the CLI's revocation: on the next request, as through a worker


def test_a_killed_worker_is_replaced(workers: Workers) -> None:
    _, key = workers.gw.key(owner="survivor")
    victim = workers.listening()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(workers.listening()) == 2 and victim not in workers.listening(), 30), \
        workers.log.read_text()[-2000:]

    def all_served() -> bool:
        try:
            return all(workers.request("GET", "/v2/models/deepseek", key)[0] == 200 for _ in range(20))
        except (urllib.error.URLError, OSError):
            return False
    assert wait_for(all_served, 30)


def test_sigterm_fails_readiness_then_drains_and_exits_0(triton: TritonProcess, tmp_path: Path) -> None:
    w = Workers(tmp_path, triton).start()
    try:
        _, key = w.gw.key()
        assert w.get("/v2/health/ready")[0] == 200
        assert w.proc is not None
        w.proc.send_signal(signal.SIGTERM)
        # shutdown_delay_s = 1: readiness fails at once while requests are still taken.
        assert wait_for(lambda: w.get("/v2/health/ready")[0] == 503, 1.0)
        assert w.request("GET", "/v2/models/deepseek", key)[0] == 200
        assert w.proc.wait(60) == 0
    finally:
        w.stop()
    assert "exited with" not in w.log.read_text()   # no worker died instead of draining


def test_double_colon_is_dual_stack_on_every_worker_and_the_supervisor_metrics(triton: TritonProcess,
                                                                               tmp_path: Path) -> None:
    """server.host "::" under --workers: each worker binds it with SO_REUSEPORT (else the second fails to bind)
    and IPV6_V6ONLY off, so IPv4 and IPv6 clients reach the workers, and the supervisor's metrics too."""
    w = Workers(tmp_path, triton, host="::", insecure_plaintext=True).start()
    try:
        _, key = w.gw.key(owner="dual")
        for client_host in ("127.0.0.1", "[::1]"):
            w.url = f"http://{client_host}:{w.http}"
            assert all(w.request("GET", "/v2/models/deepseek", key)[0] == 200 for _ in range(6))
            with urllib.request.urlopen(f"http://{client_host}:{w.metrics}/metrics", timeout=30) as r:
                assert r.status == 200
        assert wait_for(lambda: sum(len(v) for v in w.audit_by_file().values()) >= 12, 10)
        records = [r for v in w.audit_by_file().values() for r in v if r.get("actor") == "dual"]
        assert {r["client_ip"] for r in records} == {"127.0.0.1", "::1"}
        assert len(w.listening()) == 2
    finally:
        w.stop()


def test_tls_on_every_worker_and_the_supervisor_metrics_follow_rotation(triton: TritonProcess, tmp_path: Path) -> None:
    """`serve --workers 2` with TLS: every worker's HTTP and gRPC listener refuses TLS 1.2 and serves 1.3, and
    a renewed certificate reaches the workers' listeners and the supervisor's metrics listener alike."""
    first, second = make_dev_certs(tmp_path / "first"), make_dev_certs(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server_cert", "server_key"):
        shutil.copy(first[name], live / first[name].name)
    w = Workers(tmp_path / "w", triton)
    config = yaml.safe_load(w.config.read_text())
    config["server"].update({"tls_cert_file": str(live / "server.pem"), "tls_key_file": str(live / "server-key.pem"),
                             "tls_reload_interval_s": 0.2})
    w.config.write_text(yaml.safe_dump(config))
    w.start()
    try:
        _, key = w.gw.key(owner="tls-workers")
        for port, alpn in ((w.http, ()), (w.grpc, ("-alpn", "h2")), (w.metrics, ())):
            assert s_client(port, "tls1_2", first["ca"], *alpn).returncode != 0
            assert s_client(port, "tls1_3", first["ca"], *alpn).returncode == 0
        ctx = ssl.create_default_context(cafile=str(first["ca"]))
        for _ in range(8):   # a new connection each time: SO_REUSEPORT spreads them over both workers
            assert https_call(w.http, ctx, "/v2/models/deepseek", key)[0] == 200
            client = grpcclient.InferenceServerClient(f"localhost:{w.grpc}", ssl=True, root_certificates=str(first["ca"]))
            try:
                assert client.is_model_ready("deepseek", headers={"authorization": f"Bearer {key}"})
            finally:
                client.close()
        # Both workers answered over TLS: each writes its own audit file.
        assert wait_for(lambda: sum(1 for records in w.audit_by_file().values()
                                    if any(r["actor"] == "tls-workers" for r in records)) == 2, 10)

        for name in ("server_cert", "server_key"):
            tmp = live / (second[name].name + ".new")
            shutil.copy(second[name], tmp)
            tmp.replace(live / second[name].name)
        want = fingerprint(second["server_cert"])
        # The supervisor's metrics listener, and every worker's listeners (several fresh connections each).
        assert wait_for(lambda: served_fingerprint(w.metrics) == want, 10)
        for port in (w.http, w.grpc):
            assert wait_for(lambda: all(served_fingerprint(port) == want for _ in range(8)), 10)   # noqa: B023
        status, _, body = https_call(w.metrics, ssl.create_default_context(cafile=str(second["ca"])), "/metrics")
        assert status == 200 and b"seekgate_requests" in body
    finally:
        assert w.stop() == 0
