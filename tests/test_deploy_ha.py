"""The high-availability deployment: the three-replica Kubernetes overlay (deploy/k8s-ha) and Compose's `ha` profile.

Rendered with `kubectl kustomize deploy/k8s-ha` (offline) and parsed; the HAProxy config is
checked by `haproxy -c`. Nothing is applied, built or started here: there is no cluster,
Docker engine or GPU on the test machines. tests/test_deploy_scan.py runs checkov and
kubernetes-validate over the same rendered set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli.devcert import make_dev_certs
from proxy.settings import Settings, load_settings
from tests.conftest import REPO
from tests.test_deploy_manifests import CONTAINERS as BASE_CONTAINERS
from tests.test_deploy_manifests import (
    assert_dns_egress_reaches_kube_dns_and_nodelocal_dnscache,
    assert_probes_are_the_kubelets_on_the_status_listener,
    assert_refuses_without_tls,
    assert_serves_tls,
    compose_env,
    container_here,
    dockerfile_instructions,
    image_env,
    pod_env,
)

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
HA = {name: svc for name, svc in SERVICES.items() if "ha" in svc.get("profiles", [])}
HA_SEEKGATES = ("seekgate-a", "seekgate-b")


def _render(directory: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl missing: scripts/system-packages installs Debian's kubernetes-client"
    out = subprocess.run([kubectl, "kustomize", directory], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "KUBECONFIG": os.devnull})
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


RENDERED = _render("deploy/k8s-ha")


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in RENDERED if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


DEPLOYMENT = one("Deployment")
POD = DEPLOYMENT["spec"]["template"]["spec"]
CONTAINERS = {c["name"]: c for c in POD["containers"] + POD.get("initContainers", [])}
VOLUMES = {v["name"]: v for v in POD["volumes"]}
BASE_SEEKGATE = BASE_CONTAINERS["seekgate"]
# A stand-in for the Secret's value: what matters is that every replica reads the same Secret key.
SECRET_STAND_IN = {("seekgate-backends", "store-url"): "postgresql://seekgate@postgres.seekgate-backends:5432/seekgate",
                   ("seekgate-backends", "redis-url"): "redis://redis.seekgate-backends:6379/0"}


def env_of(container: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in CONTAINERS[container].get("env", [])}


def pod_settings(tmp_path: Path, container: str = "seekgate") -> Settings:
    """The settings a pod's container starts with: the ConfigMap, its env, Secret refs resolved to stand-ins."""
    (tmp_path / "seekgate.yaml").write_text(one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"])
    env = {}
    for name, e in env_of(container).items():
        if "value" in e:
            env[name] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[name] = SECRET_STAND_IN[(ref["name"], ref["key"])]
    return load_settings(tmp_path / "seekgate.yaml", env={"SEEKGATE_DATA_DIR": "/data", **env})


# ------------------------------------------------------------------ Kubernetes: replicas on one store

def test_three_replicas_only_on_a_shared_store_and_one_root_key(tmp_path: Path) -> None:
    settings = pod_settings(tmp_path)
    assert DEPLOYMENT["spec"]["replicas"] == 3
    # More than one replica needs the shared PostgreSQL store and one root key all of them read.
    assert settings.store.url.startswith("postgresql://")
    assert settings.crypto.provider == "file" and settings.crypto.root_key_file == "/data/secrets/root.key"
    assert settings.store.auto_migrate is False   # the migrate init container does it, serve never
    assert settings.crypto.root_rotation_days == 0   # a scheduled root would live only in the memory volume


def test_every_replica_reads_the_same_backend_urls_from_one_secret() -> None:
    for container in ("seekgate", "migrate"):
        store = env_of(container)["SEEKGATE_STORE_URL"]
        assert "value" not in store, container        # never a URL (with its password) in a manifest
        assert store["valueFrom"]["secretKeyRef"] == {"name": "seekgate-backends", "key": "store-url"}
    redis = env_of("seekgate")["SEEKGATE_REDIS_URL"]
    assert redis["valueFrom"]["secretKeyRef"] == {"name": "seekgate-backends", "key": "redis-url"}
    assert "SEEKGATE_REDIS_URL" not in env_of("migrate")   # the migrator needs the store alone
    # One Deployment template: the three pods cannot differ in what they read.
    assert len([d for d in RENDERED if d["kind"] in ("Deployment", "StatefulSet")]) == 1


def test_one_mounted_root_key_and_no_disk_for_keys() -> None:
    kek = VOLUMES["seekgate-secret-mount"]["projected"]["sources"]
    assert {"name": "seekgate-kek", "items": [{"key": "root.key", "path": "seekgate_kek"}]} in [s["secret"] for s in kek]
    mounts = {m["mountPath"]: m["name"] for m in CONTAINERS["seekgate"]["volumeMounts"]}
    assert mounts["/run/secrets"] == "seekgate-secret-mount"
    # The entrypoint's copy of that one Secret: memory, not a volume of the pod's own.
    assert VOLUMES[mounts["/data/secrets"]]["emptyDir"]["medium"] == "Memory"
    # No PVC of one replica's: nothing a second replica would need is kept per pod.
    assert not [d for d in RENDERED if d["kind"] == "PersistentVolumeClaim"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in POD["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"deepseek-checkpoint"}   # the read-only checkpoint, shared ReadOnlyMany
    data = VOLUMES["data"]
    assert set(data) == {"name", "emptyDir"} and "medium" not in data["emptyDir"]   # audit spool, disk-backed


def test_migrations_run_first_and_only_from_the_init_container() -> None:
    init = [c["name"] for c in POD["initContainers"]]
    assert init[0] == "migrate"     # before Triton loads the checkpoint: a bad URL fails in seconds
    migrate = CONTAINERS["migrate"]
    assert migrate["args"][:3] == ["seekgate", "db", "migrate"] and "restartPolicy" not in migrate
    assert migrate["image"] == CONTAINERS["seekgate"]["image"]   # the schema this release's serve expects
    # The migrator sees the store URL and the config; not the KEK, the Triton key, or Redis.
    mounted = {m["name"] for m in migrate["volumeMounts"]}
    assert "seekgate-secret-mount" not in mounted and "seekgate-secrets" not in mounted
    assert not [d for d in RENDERED if d["kind"] == "Job"]


def test_pdb_and_spread_fit_three() -> None:
    replicas = DEPLOYMENT["spec"]["replicas"]
    selector = DEPLOYMENT["spec"]["selector"]["matchLabels"]
    pdb = one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == selector and "minAvailable" not in pdb
    # One voluntary eviction at a time, and never all: two replicas serve through a drain.
    assert pdb["maxUnavailable"] == 1 < replicas
    rolling = DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}   # no spare GPU to surge onto
    anti = POD["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname" and anti[0]["labelSelector"]["matchLabels"] == selector
    [zone] = POD["topologySpreadConstraints"]
    assert zone["topologyKey"] == "topology.kubernetes.io/zone" and zone["maxSkew"] == 1
    assert zone["whenUnsatisfiable"] == "DoNotSchedule" and zone["labelSelector"]["matchLabels"] == selector


def test_no_autoscaler_with_inconsistent_bounds() -> None:
    # None ships (kustomization.yaml says why); one added later must not go below the PDB's floor.
    for hpa in (d for d in RENDERED if d["kind"] == "HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] >= DEPLOYMENT["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert not [d for d in RENDERED if d["kind"] == "HorizontalPodAutoscaler"]


def test_egress_opens_postgresql_and_redis_only() -> None:
    policy = one("NetworkPolicy")["spec"]
    by_port = {p["port"]: r for r in policy["egress"] for p in r["ports"]}
    assert set(by_port) == {53, 9200, 5432, 6379}   # the base's DNS and Elasticsearch, plus the backends
    for port, app in ((5432, "postgresql"), (6379, "redis")):
        rule = by_port[port]
        assert [p["port"] for p in rule["ports"]] == [port]
        [peer] = rule["to"]
        assert "ipBlock" not in peer and peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": app}
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "seekgate-backends"}


def test_dns_egress_survives_the_overlay() -> None:
    # The overlay appends its backends' rules: the base's DNS rule, NodeLocal DNSCache included, stays.
    assert_dns_egress_reaches_kube_dns_and_nodelocal_dnscache(one("NetworkPolicy")["spec"])


def test_readiness_goes_through_seekgate() -> None:
    # The status listener's readiness is the client port's: forwarded to Triton, 503 while draining.
    assert CONTAINERS["seekgate"]["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "status",
                                                                   "scheme": "HTTP"}


def test_ha_probes_are_the_bases_on_the_status_listener_the_overlays_config_opens(tmp_path: Path) -> None:
    # config-ha.yaml replaces the base's seekgate.yaml whole: without its own server.status_listen every
    # replica's probes would ask a closed port and no pod would ever start. test_deploy_manifests runs the
    # probes under mTLS (test_with_mtls_on_the_pods_kubelet_probes_pass_without_a_certificate).
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert CONTAINERS["seekgate"][name] == BASE_SEEKGATE[name], name
    stand_ins = {("seekgate-backends", "store-url"): "postgresql://stand-in/seekgate",
                 ("seekgate-backends", "redis-url"): "redis://stand-in:6379/0"}
    assert_probes_are_the_kubelets_on_the_status_listener(RENDERED, tmp_path, stand_ins)
    sources = VOLUMES["seekgate-secret-mount"]["projected"]["sources"]
    assert {s["secret"]["name"] for s in sources if s["secret"].get("optional")} == {"seekgate-client-ca"}


def test_a_headless_service_for_per_request_grpc_balancing() -> None:
    headless = one("Service", "seekgate-grpc")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in headless["ports"]] == [8001]


def test_store_connections_fit_the_documented_budget(tmp_path: Path) -> None:
    # deploy/README.md: each replica holds store.pool_size + 1 (the LISTEN connection).
    settings = pod_settings(tmp_path)
    per_replica = settings.store.pool_size + 1
    readme = (REPO / "deploy/README.md").read_text()
    assert "store.pool_size + 1" in readme
    total = DEPLOYMENT["spec"]["replicas"] * per_replica + 1   # + the migrator
    assert f"{DEPLOYMENT['spec']['replicas']} × {per_replica} + 1 = {total}" in readme


# ------------------------------------------------------------------ Compose: the `ha` profile

def test_ha_profile_has_the_backends_two_pairs_and_a_balancer() -> None:
    assert set(HA) == {"postgres", "redis", "seekgate-migrate", "triton-a", "triton-b",
                       "seekgate-a", "seekgate-b", "seekgate-lb"}
    for name, svc in HA.items():
        if svc.get("restart") == "no":
            continue
        test = svc["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    for pair, triton in (("seekgate-a", "triton-a"), ("seekgate-b", "triton-b")):
        deps = HA[pair]["depends_on"]
        assert deps[triton]["condition"] == "service_healthy" and deps["redis"]["condition"] == "service_healthy"
        assert deps["seekgate-migrate"]["condition"] == "service_completed_successfully"
    assert {d: c["condition"] for d, c in HA["seekgate-lb"]["depends_on"].items()} == {
        "seekgate-a": "service_healthy", "seekgate-b": "service_healthy"}


@pytest.mark.parametrize("name", sorted(HA))
def test_ha_service_is_non_root_and_unprivileged(name: str) -> None:
    svc = HA[name]
    uid = str(svc["user"]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, name
    assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc, name
    assert "no-new-privileges:true" in svc["security_opt"], name
    assert svc["read_only"] is True, name


def test_ha_pairs_share_store_redis_and_root_key_and_nothing_else() -> None:
    envs = [HA[name]["environment"] for name in HA_SEEKGATES]
    for key in ("SEEKGATE_STORE_URL", "SEEKGATE_REDIS_URL", "SEEKGATE_CRYPTO_ROOT_KEY_FILE", "PGPASSFILE"):
        assert envs[0][key] == envs[1][key], key
    assert envs[0]["SEEKGATE_STORE_URL"].startswith("postgresql://") and "@postgres:" in envs[0]["SEEKGATE_STORE_URL"]
    assert ":" not in envs[0]["SEEKGATE_STORE_URL"].split("@")[0].removeprefix("postgresql://")   # no password
    assert str(envs[0]["SEEKGATE_STORE_AUTO_MIGRATE"]) == "false"
    assert HA["seekgate-migrate"]["environment"]["SEEKGATE_STORE_URL"] == envs[0]["SEEKGATE_STORE_URL"]
    for name in HA_SEEKGATES:
        assert set(HA[name]["secrets"]) == {"seekgate_kek", "triton_internal_key", "postgres_pgpass",
                                            "seekgate_tls_cert", "seekgate_tls_key"}
        assert any(t.startswith("/data/secrets:") for t in HA[name]["tmpfs"])   # the KEK copy in memory
        # Each pair reaches its own Triton only.
        own = "a" if name.endswith("-a") else "b"
        assert f"ha-inference-{own}" in HA[name]["networks"]
        assert not {n for n in HA[name]["networks"] if n.startswith("ha-inference-")} - {f"ha-inference-{own}"}
        triton_ip = HA[f"triton-{own}"]["networks"][f"ha-inference-{own}"]["ipv4_address"]
        assert HA[name]["environment"]["SEEKGATE_UPSTREAM_HTTP_URL"] == f"http://{triton_ip}:8000"
        assert HA[f"triton-{own}"]["environment"]["TRITON_BIND_ADDRESS"] == triton_ip
    # Distinct data volumes: each replica's own audit spool.
    volumes = [next(v for v in HA[n]["volumes"] if v.endswith(":/data")) for n in HA_SEEKGATES]
    assert volumes[0] != volumes[1]
    assert set(HA["triton-a"]["secrets"]) == set(HA["triton-b"]["secrets"]) == {"triton_internal_key"}


def test_ha_publishes_only_the_balancer_on_loopback_by_default() -> None:
    published = {name for name, svc in HA.items() if svc.get("ports")}
    assert published == {"seekgate-lb"}
    for port in HA["seekgate-lb"]["ports"]:
        m = re.fullmatch(r"(\$\{[^}]*\}):(\$\{[^}]*\}):(\d+)", port)
        assert m, port
        host, container = m.group(1), m.group(3)
        assert host == "${SEEKGATE_HA_BIND:-127.0.0.1}" and container in ("8000", "8001"), port
    env_example = (REPO / ".env.example").read_text()
    assert re.search(r"^SEEKGATE_HA_BIND=127\.0\.0\.1$", env_example, re.M)
    nets = COMPOSE["networks"]
    for net in ("backends", "ha-inference-a", "ha-inference-b", "ha-frontend"):
        assert nets[net]["internal"] is True, net
    assert set(HA["postgres"]["networks"]) == set(HA["redis"]["networks"]) == {"backends"}


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    assert found, "haproxy missing: scripts/system-packages installs Debian's haproxy"
    return found


HAPROXY_CA = "/run/secrets/seekgate_tls_ca"   # the Compose secret seekgate-lb mounts


def _haproxy_cfg(tmp_path: Path, text: str | None = None) -> Path:
    """The balancer's config with the mounted CA's path pointing at a CA made here (haproxy -c loads it)."""
    ca = make_dev_certs(tmp_path / "certs")["ca"]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text((text or (REPO / "config/haproxy/haproxy.cfg").read_text()).replace(HAPROXY_CA, str(ca)))
    return cfg


def test_haproxy_config_is_valid_and_balances_both_replicas_per_request(tmp_path: Path) -> None:
    cfg = _haproxy_cfg(tmp_path)
    out = subprocess.run([_haproxy(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # The only warnings allowed: the replicas' names do not resolve outside Compose's network.
    for line in (out.stdout + out.stderr).splitlines():
        if "[WARNING]" in line or "[ALERT]" in line:
            assert "could not resolve address 'seekgate-" in line, line
    text = (REPO / "config/haproxy/haproxy.cfg").read_text()
    lb = HA["seekgate-lb"]
    assert "./config/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    for backend in ("seekgate_http", "seekgate_grpc"):
        block = text.split(f"backend {backend}\n", 1)[1].split("\n\n", 1)[0]
        servers = re.findall(r"^\s+server (\S+) (\S+):(\d+)", block, re.M)
        port = "8000" if backend == "seekgate_http" else "8001"
        assert servers == [(n, n, port) for n in HA_SEEKGATES], servers
        assert "http-check send meth GET uri /v2/health/ready" in block and "balance roundrobin" in block
    # gRPC is HTTP/2 both ways, so calls (not connections) are balanced.
    assert re.search(r"bind :8001 proto h2", text) and "default-server proto h2" in text
    # The seekgates serve TLS only: traffic and checks go over TLS, their certificate verified.
    for backend in ("seekgate_http", "seekgate_grpc"):
        block = text.split(f"backend {backend}\n", 1)[1].split("\n\n", 1)[0]
        [default] = re.findall(r"^\s+default-server (.*)$", block, re.M)
        words = default.split()
        assert "ssl" in words and words[words.index("verify") + 1] == "required", backend
        assert words[words.index("ca-file") + 1] == HAPROXY_CA and "verifyhost" in words, backend
        assert "check-port" not in words and ("port" not in words or "check-ssl" in words), backend
    assert "alpn h2" in text.split("backend seekgate_grpc\n", 1)[1]


def test_haproxy_check_catches_a_broken_config(tmp_path: Path) -> None:
    bad = _haproxy_cfg(tmp_path, (REPO / "config/haproxy/haproxy.cfg").read_text()
                       .replace("balance roundrobin", "balance nosuch", 1))
    out = subprocess.run([_haproxy(), "-c", "-f", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "balance only supports" in out.stdout + out.stderr


# ------------------------------------------------------------------ TLS: each replica starts

def test_ha_pods_mount_the_tls_pair() -> None:
    [tls] = [s["secret"] for s in VOLUMES["seekgate-secret-mount"]["projected"]["sources"]
             if "secret" in s and s["secret"]["name"] == "seekgate-tls"]
    assert {i["path"] for i in tls["items"]} == {"seekgate_tls_cert", "seekgate_tls_key"}
    assert "insecure_plaintext" not in one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"]


def test_ha_compose_replicas_mount_the_tls_pair_and_check_over_https() -> None:
    for name in HA_SEEKGATES:
        assert {"seekgate_tls_cert", "seekgate_tls_key"} <= set(HA[name]["secrets"]), name
        assert HA[name]["healthcheck"]["test"][3] == "https://127.0.0.1:8002/metrics", name
    assert "seekgate_tls_ca" in HA["seekgate-lb"]["secrets"]


def test_ha_pod_serves_tls_on_the_shared_store_and_its_probes_pass(tmp_path: Path, pg_url: str,
                                                                     redis_server_url: str) -> None:
    # The pod as the overlay renders it: `migrate` first (its init container), then seekgate, on a
    # fresh PostgreSQL database and the test Redis standing in for the Secret seekgate-backends.
    stand_ins = {("seekgate-backends", "store-url"): pg_url, ("seekgate-backends", "redis-url"): redis_server_url}
    entrypoint = json.loads(dockerfile_instructions("ENTRYPOINT")[0])
    config = one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"]
    sg, migrate = CONTAINERS["seekgate"], CONTAINERS["migrate"]
    env = {**image_env(), **pod_env(sg, stand_ins)}
    c = container_here(tmp_path / "tls", env, config, [*entrypoint, *sg["args"]], pod_container=sg)
    migrated = c.run([*entrypoint, *migrate["args"]])
    assert migrated.returncode == 0, migrated.stderr
    # The kubelet's probes for real; readiness needs Triton, which is not there.
    assert_serves_tls(c, {p: sg[p] for p in ("startupProbe", "livenessProbe")})
    assert_refuses_without_tls(tmp_path / "plain", env, config, [*entrypoint, *sg["args"]])


def test_ha_compose_replica_serves_tls_and_its_healthcheck_passes(tmp_path: Path, pg_url: str,
                                                                  redis_server_url: str) -> None:
    env = {**image_env(), **compose_env("seekgate-a"), "SEEKGATE_STORE_URL": pg_url,
           "SEEKGATE_REDIS_URL": redis_server_url, "SEEKGATE_STORE_AUTO_MIGRATE": "true"}
    env.pop("PGPASSFILE")   # the stand-in URL needs no password file
    config = (REPO / "config/seekgate.yaml").read_text()
    c = container_here(tmp_path / "tls", env, config)
    assert_serves_tls(c, {"compose healthcheck": HA["seekgate-a"]["healthcheck"]["test"][1:]})
