"""What the rendered Kubernetes set and the Compose file promise about secrets, privileges, rollouts, alerts and the supply chain.

Rendered with `kubectl kustomize deploy/k8s` (offline), parsed; nothing is applied or built
here (no cluster, no Docker engine, no GPU). tests/test_deploy_scan.py runs the policy
scanners over the same set.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from proxy.cli.devcert import make_dev_certs
from proxy.local.triton import free_ports
from proxy.settings import load_settings
from tests.conftest import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# The Pod Security "restricted" profile's allowed volume types.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _render() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl missing: scripts/system-packages installs Debian's kubernetes-client"
    out = subprocess.run([kubectl, "kustomize", "deploy/k8s"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "KUBECONFIG": os.devnull})
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


RENDERED = _render()


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in RENDERED if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


POD = one("Deployment")["spec"]["template"]["spec"]
CONTAINERS = {c["name"]: c for c in POD["containers"] + POD.get("initContainers", [])}
VOLUMES = {v["name"]: v for v in POD["volumes"]}


def mounts(container: str) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in CONTAINERS[container].get("volumeMounts", [])}


def secret_names(volume: dict[str, Any]) -> set[str]:
    if "secret" in volume:
        return {volume["secret"]["secretName"]}
    return {s["secret"]["name"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s}


def pod_settings(tmp_path: Path) -> Any:
    (tmp_path / "seekgate.yaml").write_text(one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"])
    env = {e["name"]: e["value"] for e in CONTAINERS["seekgate"]["env"]}
    return load_settings(tmp_path / "seekgate.yaml", env={"SEEKGATE_DATA_DIR": "/data", **env})


# ------------------------------------------------------------------ secrets

def test_triton_mounts_no_kek_pepper_or_store() -> None:
    # Triton runs user-supplied Python: only its own header secret, the checkpoint, scratch space.
    for path, mount in mounts("triton").items():
        volume = VOLUMES[mount["name"]]
        assert "seekgate-kek" not in secret_names(volume), path
        assert "persistentVolumeClaim" not in volume or volume["persistentVolumeClaim"]["claimName"] != "seekgate-data", path
        assert mount["name"] != "seekgate-secrets", path
    secrets = {n for m in mounts("triton").values() for n in secret_names(VOLUMES[m["name"]])}
    assert secrets == {"seekgate-triton-internal"}


def test_the_kek_is_only_in_seekgate_and_only_in_memory() -> None:
    holders = {name for name, c in CONTAINERS.items() for m in c.get("volumeMounts", [])
               if "seekgate-kek" in secret_names(VOLUMES[m["name"]])}
    assert holders == {"seekgate"}
    # The entrypoint copies it into <data_dir>/secrets: that mount must be memory.
    data_dir = "/data"
    copy = mounts("seekgate")[f"{data_dir}/secrets"]
    assert VOLUMES[copy["name"]]["emptyDir"]["medium"] == "Memory"
    # And no other container can see that memory volume, the store or the pepper.
    for name in CONTAINERS:
        if name in ("seekgate", "prepare-data"):
            continue
        for m in mounts(name).values():
            assert m["name"] != "seekgate-secrets", name
            if m["name"] == "data":   # the data volume: the audit directory alone, read-only
                assert m.get("subPath") == "audit" and m.get("readOnly") is True, (name, m)


def test_the_pod_data_dir_matches_the_image(tmp_path: Path) -> None:
    assert pod_settings(tmp_path).data_dir == "/data"
    assert "/data" in mounts("seekgate") and mounts("seekgate")["/data"]["name"] == "data"


def test_where_keys_are_written_by_default_is_never_committed_nor_in_the_build_context() -> None:
    # The README's secret files, Compose's .env, the data dir (KEK, pepper, key store) and the
    # private keys `seekgate tls dev-cert` writes into the working tree by default.
    from proxy.cli.main import build_parser
    from proxy.settings import Settings
    dev_cert_dir = build_parser().parse_args(["tls", "dev-cert"]).dir
    dockerignore = {line.strip().strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    for path in ("secrets/root.key", ".env", f"{Settings().data_dir}/secrets/root.key", f"{dev_cert_dir}/ca-key.pem"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path}: not in .gitignore"
        assert path.split("/")[0] in dockerignore, f"{path}: not in .dockerignore"


# ------------------------------------------------------------------ Pod Security "restricted"

def test_every_container_meets_pod_security_restricted() -> None:
    pod_sc = POD.get("securityContext", {})
    assert not any(POD.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert set().union(*(set(v) - {"name"} for v in POD["volumes"])) <= RESTRICTED_VOLUMES
    for name, c in CONTAINERS.items():
        sc = c.get("securityContext", {})
        assert sc.get("privileged") is not True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
        assert sc["capabilities"]["drop"] == ["ALL"] and set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert not any("hostPort" in p for p in c.get("ports", [])), name
    assert one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_guaranteed_resources_and_gpu_scheduling() -> None:
    for name, c in CONTAINERS.items():
        r = c["resources"]
        assert r["requests"] == r["limits"], name   # Guaranteed QoS for the whole pod
    assert CONTAINERS["triton"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in POD["tolerations"])
    assert POD["nodeSelector"] and POD["priorityClassName"] == one("PriorityClass")["metadata"]["name"]


# ------------------------------------------------------------------ network and RBAC

def test_network_policy_restricts_egress() -> None:
    policy = one("NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"], "an empty egress list would deny DNS too"
    for rule in policy["egress"]:
        assert rule.get("to") and rule.get("ports"), rule    # no rule open to everywhere or every port
    ports = {p["port"] for r in policy["egress"] for p in r["ports"]}
    assert ports == {53, 9200}
    open_ingress = [r for r in policy["ingress"] if "from" not in r]
    assert {p["port"] for r in open_ingress for p in r["ports"]} == {8000, 8001}


# The resolvers a pod may be pointed at: the kube-dns (CoreDNS) pods, and NodeLocal DNSCache's
# link-local address (a hostNetwork DaemonSet: no pod selector matches it, only an ipBlock).
KUBE_DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
NODELOCAL_DNS_PEER = {"ipBlock": {"cidr": "169.254.20.10/32"}}


def assert_dns_egress_reaches_kube_dns_and_nodelocal_dnscache(policy: dict[str, Any]) -> None:
    """Both resolvers get UDP and TCP 53 (answers over 512 bytes retry over TCP), and port 53 goes nowhere else."""
    reach: dict[str, set[tuple[int, str]]] = {}
    for rule in policy["egress"]:
        dns = {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"] if p["port"] == 53}
        if not dns:
            continue
        assert {p["port"] for p in rule["ports"]} == {53}, rule   # a DNS rule opens nothing but DNS
        for peer in rule["to"]:
            assert peer in (KUBE_DNS_PEER, NODELOCAL_DNS_PEER), peer   # no wider ipBlock, no other pods
            reach.setdefault(json.dumps(peer, sort_keys=True), set()).update(dns)
    both = {(53, "UDP"), (53, "TCP")}
    assert reach == {json.dumps(KUBE_DNS_PEER, sort_keys=True): both,
                     json.dumps(NODELOCAL_DNS_PEER, sort_keys=True): both}, reach


def test_dns_egress_reaches_kube_dns_and_nodelocal_dnscache() -> None:
    assert_dns_egress_reaches_kube_dns_and_nodelocal_dnscache(one("NetworkPolicy")["spec"])


def test_operator_role_grants_no_way_around_seekgate() -> None:
    forbidden = {"pods/exec", "pods/attach", "pods/portforward", "pods/ephemeralcontainers", "secrets", "*"}
    for role in (d for d in RENDERED if d["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            assert not forbidden & set(rule.get("resources", [])), (role["metadata"]["name"], rule)
            assert "*" not in rule.get("verbs", []) and "*" not in rule.get("apiGroups", [])
            # Writing a pod (template) runs any command with the KEK mounted; pods/log reads it back.
            templated = {"pods", "deployments", "replicasets", "statefulsets", "daemonsets", "jobs", "cronjobs",
                         "podtemplates", "replicationcontrollers"}
            writes = {"create", "update", "patch"}
            assert not (templated & set(rule.get("resources", [])) and writes & set(rule.get("verbs", []))), \
                (role["metadata"]["name"], rule)


# ------------------------------------------------------------------ replicas, rollout, shutdown

def test_replicas_and_autoscaling_fit_the_per_pod_store(tmp_path: Path) -> None:
    # With the store per pod (store.url empty: SQLite under /data) a second replica would refuse
    # the first one's keys, so one replica and no HPA. More are allowed only once the pod's config
    # names a shared PostgreSQL store and one root key every replica mounts (crypto.root_key_file).
    settings = pod_settings(tmp_path)
    shared = settings.store.url.startswith(("postgresql://", "postgres://")) and (
        settings.crypto.provider != "file" or bool(settings.crypto.root_key_file))
    if not shared:
        assert one("Deployment")["spec"]["replicas"] == 1
    assert not [d for d in RENDERED if d["kind"] == "HorizontalPodAutoscaler"]
    assert VOLUMES["data"]["persistentVolumeClaim"]["claimName"] == one("PersistentVolumeClaim")["metadata"]["name"]


def test_pdb_spread_and_a_gpu_fit_rolling_update() -> None:
    deployment = one("Deployment")["spec"]
    selector = deployment["selector"]["matchLabels"]
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    strategy = deployment["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    anti = POD["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname" and anti[0]["labelSelector"]["matchLabels"] == selector
    assert POD["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == selector
    # Longer than Triton's startup budget plus an image pull.
    startup = CONTAINERS["triton"]["startupProbe"]
    assert deployment["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"] + 600


def test_compose_gives_triton_the_same_load_time_as_the_pod_and_the_image() -> None:
    # seekgate waits for `service_healthy`: a Triton marked unhealthy while it still loads the
    # checkpoint fails `docker compose up` ("dependency failed to start") instead of waiting.
    startup = CONTAINERS["triton"]["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    dockerfile = (REPO / "deploy/docker/triton.Dockerfile").read_text()
    image = re.search(r"HEALTHCHECK .*--start-period=(\d+)s", dockerfile)
    assert image, "triton.Dockerfile: no HEALTHCHECK start period"
    assert int(image.group(1)) >= budget
    for name in ("triton", "triton-a", "triton-b"):
        check = SERVICES[name]["healthcheck"]
        assert int(check["start_period"].removesuffix("s")) >= budget, name


def test_shutdown_order_covers_the_longest_stream(tmp_path: Path) -> None:
    settings = pod_settings(tmp_path)
    s = settings.server
    assert s.drain_timeout_s > settings.upstream.request_timeout_s and s.shutdown_delay_s > 0
    pre_stop = int(CONTAINERS["seekgate"]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert POD["terminationGracePeriodSeconds"] > pre_stop + s.shutdown_delay_s + s.drain_timeout_s
    # Native sidecars: started before seekgate (Triton gated by its startupProbe), stopped after it.
    init = [c["name"] for c in POD["initContainers"]]
    assert init.index("fluent-bit") < init.index("triton")
    for name in ("triton", "fluent-bit"):
        assert CONTAINERS[name]["restartPolicy"] == "Always" and "startupProbe" in CONTAINERS[name], name
    # A file KEK rotated on a schedule would live only in the memory volume.
    assert settings.crypto.provider != "file" or settings.crypto.root_rotation_days == 0


# ------------------------------------------------------------------ Triton's restricted APIs

def test_triton_restricts_every_api_but_health_to_seekgates_header() -> None:
    entry = (REPO / "deploy/docker/triton-entrypoint.sh").read_text()
    default = re.search(r'restricted="\$\{TRITON_RESTRICTED_API:-([a-z,-]+)\}"', entry)
    assert default, "triton-entrypoint.sh: no TRITON_RESTRICTED_API default"
    # seekgate sends the header with every forwarded request (tests/upstream/test_restricted_triton.py
    # proves it against a Triton restricted this way), so only the probes' health stays open.
    assert set(default.group(1).split(",")) == {"shared-memory", "model-repository", "trace", "logging", "inference",
                                                "metadata", "model-config", "statistics"}
    for env in (CONTAINERS["triton"]["env"], [{"name": k} for k in SERVICES["triton"]["environment"]]):
        assert "TRITON_RESTRICTED_API" not in {e["name"] for e in env}   # the default applies


# ------------------------------------------------------------------ monitoring

def test_prometheus_rule_is_the_alert_files() -> None:
    rule = one("PrometheusRule")
    groups = [g for f in ("alerts.yml", "alerts_ops.yml")
              for g in yaml.safe_load((REPO / "config/prometheus" / f).read_text())["groups"]]
    assert rule["spec"]["groups"] == groups
    exprs = {r["alert"]: r["expr"] for g in groups for r in g["rules"]}
    assert exprs["SeekgateDown"] == 'up{job="seekgate"} == 0'
    assert exprs["SeekgateTargetMissing"] == 'absent(up{job="seekgate"})'
    for kind in ("PrometheusRule", "PodMonitor"):
        assert "release" in one(kind)["metadata"]["labels"], kind


def test_fluent_bit_configmap_is_the_config_files() -> None:
    data = one("ConfigMap", "seekgate-fluent-bit")["data"]
    for name in ("fluent-bit.yaml", "parsers.conf"):
        assert data[name] == (REPO / "config/fluent-bit" / name).read_text(), name
    assert "-debug" not in CONTAINERS["fluent-bit"]["image"] and "-debug" not in SERVICES["fluent-bit"]["image"]
    secret_file = mounts("fluent-bit")["/run/secrets/elasticsearch"]
    assert secret_names(VOLUMES[secret_file["name"]]) == {"seekgate-elasticsearch"}


def test_policies_configmap_is_the_policy_files() -> None:
    # configmaps.yaml says it is a copy of policies/*.yaml: the same text, its documentation of the
    # rule format (resources, per-rule limits) included, not only the same file names.
    data = one("ConfigMap", "seekgate-policies")["data"]
    assert data == {p.name: p.read_text() for p in sorted((REPO / "policies").glob("*.yaml"))}


def test_fluent_bit_tails_every_active_audit_file_the_code_writes() -> None:
    # The server's workers and the CLI (keys create/revoke, db migrate, crypto rotate) each append to
    # their own active file; one the tail misses never reaches Elasticsearch. Rotated files
    # (audit-<stamp>...) are followed by inode and must not match, or they would be read twice.
    from fnmatch import fnmatch

    from proxy.audit.jsonl import active_name
    from proxy.cli.audit import CLI_AUDIT_FILE
    config = yaml.safe_load((REPO / "config/fluent-bit/fluent-bit.yaml").read_text())
    [tail] = [i for i in config["pipeline"]["inputs"] if i["name"] == "tail"]
    globs = tail["path"].split(",")
    for name in (active_name(0), active_name(1), active_name(7), CLI_AUDIT_FILE):
        assert any(fnmatch(f"/data/audit/{name}", g) for g in globs), name
    for rotated in ("audit-20261207T000000Z.jsonl", "audit-20261207T000000Z.w2.jsonl",
                    "audit-20261207T000000Z.cli.jsonl"):
        assert not any(fnmatch(f"/data/audit/{rotated}", g) for g in globs), rotated


# ------------------------------------------------------------------ compose

@pytest.mark.parametrize("name", ["triton", "fluent-bit", "seekgate", "prometheus", "alertmanager"])
def test_compose_service_is_non_root_and_unprivileged(name: str) -> None:
    svc = SERVICES[name]
    uid = str(svc["user"]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, name
    assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc, name
    assert "no-new-privileges:true" in svc["security_opt"], name
    assert svc["read_only"] is True, name


def test_compose_every_service_drops_capabilities() -> None:
    for name, svc in SERVICES.items():
        assert svc.get("cap_drop") == ["ALL"] and "no-new-privileges:true" in svc.get("security_opt", []), name
        assert set(svc.get("cap_add", [])) <= {"CHOWN"} and (not svc.get("cap_add") or svc.get("network_mode") == "none")


def test_compose_publishes_only_seekgate_client_ports_on_a_configurable_address() -> None:
    published = {name: svc.get("ports", []) for name, svc in SERVICES.items() if svc.get("ports")}
    for name, ports in published.items():
        for port in ports:
            m = re.fullmatch(r"(\$\{[^}]*\}|[\d.]+):(\$\{[^}]*\}|\d+):(\d+)", port)
            assert m, (name, port)   # always HOST:PORT:PORT, never every interface by default
            host = m.group(1)
            if name == "seekgate":
                assert host == "${SEEKGATE_BIND:-127.0.0.1}", port
            elif name == "seekgate-lb":   # the `ha` profile's entry point (tests/test_deploy_ha.py)
                assert host == "${SEEKGATE_HA_BIND:-127.0.0.1}", port
            else:
                assert host == "127.0.0.1", (name, port)
    assert sorted(p.rsplit(":", 1)[1] for p in published["seekgate"]) == ["8000", "8001"]


def test_compose_secrets_reach_only_their_users() -> None:
    def secrets_of(svc: dict[str, Any]) -> set[str]:
        return {s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])}
    assert secrets_of(SERVICES["triton"]) == {"triton_internal_key"}
    holders = {name for name, svc in SERVICES.items() if "seekgate_kek" in secrets_of(svc)}
    assert holders == {"seekgate", "seekgate-a", "seekgate-b"}   # the single node, or the `ha` profile's pair
    # The KEK copy is in a tmpfs; the data volume (store, pepper) is seekgate's alone.
    for name in holders:
        assert any(t.startswith("/data/secrets:") for t in SERVICES[name]["tmpfs"]), name
    for name, svc in SERVICES.items():
        if name != "seekgate":
            assert not any(str(v).startswith("seekgate-data:") for v in svc.get("volumes", [])), name
    assert SERVICES["fluent-bit"]["volumes"][0] == "seekgate-audit:/data/audit:ro"


def test_compose_alerts_reach_an_alertmanager() -> None:
    prom = yaml.safe_load((REPO / "config/prometheus/prometheus.yml").read_text())
    [target] = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert target.split(":")[0] in SERVICES and set(prom["rule_files"]) == {"alerts.yml", "alerts_ops.yml"}
    am = yaml.safe_load((REPO / "config/alertmanager/alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in am["receivers"]}
    assert am["route"]["receiver"] in receivers
    for route in am["route"].get("routes", []):
        assert route["receiver"] in receivers
    [hook] = receivers[am["route"]["receiver"]]["webhook_configs"]
    assert hook["url_file"].startswith("/run/secrets/") and "url" not in hook


# ------------------------------------------------------------------ supply chain

def _lock() -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes) from deploy/docker/requirements.lock."""
    text = (REPO / "deploy/docker/requirements.lock").read_text()
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z])", text):
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;\\]+)", block)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = (m.group(2), block.count("--hash=sha256:"))
    return pins


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _lock()
    assert pins and all(n > 0 for _, n in pins.values())
    env = {"sys_platform": "linux", "python_version": "3.11", "platform_system": "Linux"}
    for line in project["dependencies"]:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate(env):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: regenerate it (its header)"
        assert req.specifier.contains(pins[name][0], prereleases=True), (name, pins[name][0], str(req.specifier))
    triton = next(Requirement(d) for d in project["dependencies"] if d.startswith("tritonclient"))
    assert triton.extras == {"http", "grpc"}


def test_the_image_installs_the_lock_before_the_source() -> None:
    lines = [line.strip() for line in (REPO / "deploy/docker/seekgate.Dockerfile").read_text().splitlines()]
    lock = next(i for i, line in enumerate(lines) if "--require-hashes" in line and "requirements.lock" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY proxy"))
    assert lock < source
    assert any("--no-deps" in line for line in lines[source:])   # nothing resolved after the lock


# ------------------------------------------------------------------ TLS: each shipped deployment starts
# What every container would run (the image's ENTRYPOINT + CMD, or the pod's args), with the
# environment it would get (the image's ENV, then Compose's environment or the pod's env), run
# here for real: the container paths (/run/secrets, /data, the config file and policy directory)
# moved under tmp_path, with a freshly made certificate and key where the mounted Secret would be,
# and free ports. It must listen over TLS; without the TLS env it must refuse to start, as
# `serve` does on a non-loopback address in plaintext.

DOCKERFILE = (REPO / "deploy/docker/seekgate.Dockerfile").read_text()
PLAINTEXT_REFUSAL = "is not a loopback address and no TLS certificate is set"
TLS_ENV = ("SEEKGATE_SERVER_TLS_CERT_FILE", "SEEKGATE_SERVER_TLS_KEY_FILE")


def dockerfile_instructions(keyword: str) -> list[str]:
    """The seekgate image's `keyword` instructions, continuation lines joined, keyword stripped."""
    found, current = [], ""
    for line in DOCKERFILE.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            if current.split(None, 1)[0] == keyword:
                found.append(current.split(None, 1)[1].strip())
            current = ""
    return found


def image_env() -> dict[str, str]:
    return {k: v for line in dockerfile_instructions("ENV") for k, v in re.findall(r"(\w+)=(\S+)", line)}


def image_command() -> list[str]:
    [entrypoint], [cmd] = dockerfile_instructions("ENTRYPOINT"), dockerfile_instructions("CMD")
    return [*json.loads(entrypoint), *json.loads(cmd)]


def image_healthcheck() -> list[str]:
    [healthcheck] = dockerfile_instructions("HEALTHCHECK")
    return list(json.loads(healthcheck.split(" CMD ", 1)[1]))


def interpolate(value: Any) -> str:
    """A Compose value with its `${VAR:-default}` at their defaults (no .env on the test machine)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def compose_env(service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in SERVICES[service].get("environment", {}).items()}


def pod_env(container: dict[str, Any], stand_ins: dict[tuple[str, str], str] | None = None) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = (stand_ins or {})[(ref["name"], ref["key"])]
    return env


@dataclass
class Container:
    """A deployment's seekgate container, run as a local process on free ports."""

    root: Path
    env: dict[str, str]
    command: list[str]
    ports: dict[str, int]
    ca: Path
    # The pod container's named ports (name -> containerPort), for its httpGet probes.
    declared: dict[str, int] = field(default_factory=dict)
    status_in_pod: int | None = None   # the status listener's port in the config; here on ports["status"]

    def run(self, command: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.localize(command or self.command), env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def localize(self, command: list[str]) -> list[str]:
        """The command as this machine runs it: this Python, the repository's entrypoint, the venv's seekgate."""
        exe = {"python": sys.executable, "python3": sys.executable,
               "/usr/local/bin/seekgate-entrypoint": str(REPO / "deploy/docker/seekgate_entrypoint.py"),
               "/usr/local/bin/seekgate-probe": str(REPO / "deploy/docker/seekgate_probe.py"),
               "seekgate": str(Path(sys.executable).with_name("seekgate"))}
        ports = {"8000": self.ports["http"], "8001": self.ports["grpc"], "8002": self.ports["metrics"]}
        out = [exe.get(c, self.moved(c)) for c in command]
        # A probe's port is the container's: the same port, here.
        return [re.sub(r"127\.0\.0\.1:(800[012])\b", lambda m: f"127.0.0.1:{ports[m.group(1)]}", c) for c in out]

    def moved(self, value: str) -> str:
        return move_paths(value, self.root)

    def start(self) -> subprocess.Popen[str]:
        log = open(self.root / "serve.log", "w")
        proc = subprocess.Popen(self.localize(self.command), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        log.close()
        return proc

    def log(self) -> str:
        return (self.root / "serve.log").read_text()[-3000:]

    def check(self, check: list[str] | dict[str, Any]) -> tuple[bool, str]:
        """Whether a health check passes, as its runner judges it, and why not: a command (Docker's
        healthchecks, an exec probe) exits 0; the kubelet's httpGet gets a status of 200-399."""
        if isinstance(check, dict) and "httpGet" in check:
            return kubelet_http_get(self, check["httpGet"])
        out = self.run(check if isinstance(check, list) else probe_command(check), timeout=30)
        return out.returncode == 0, out.stderr


def kubelet_http_get(c: Container, get: dict[str, Any]) -> tuple[bool, str]:
    """The kubelet's httpGet probe: plain HTTP (scheme HTTP) to the pod's address, here loopback, on the
    container port it names; no client certificate, no credential. A status of 200-399 passes."""
    assert get.get("scheme", "HTTP") == "HTTP" and "host" not in get, get
    container_port = c.declared[get["port"]] if isinstance(get["port"], str) else get["port"]
    here = {8000: c.ports["http"], 8001: c.ports["grpc"], 8002: c.ports["metrics"]}
    if c.status_in_pod is not None:
        here[c.status_in_pod] = c.ports["status"]
    port = here[container_port]   # a port the container does not serve here is a KeyError: the test is wrong
    request = urllib.request.Request(f"http://127.0.0.1:{port}{get['path']}", headers={"User-Agent": "kube-probe/1.29"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return 200 <= r.status < 400, f"HTTP {r.status}"
    except urllib.error.HTTPError as err:
        return 200 <= err.code < 400, f"HTTP {err.code}"
    except OSError as err:
        return False, str(err)


# Where a container finds what is mounted into it; moved under the test's root.
CONTAINER_PATHS = ("/run/secrets", "/data", "/etc/seekgate")


def move_paths(text: str, root: Path) -> str:
    pattern = r"(?<![\w./])(" + "|".join(map(re.escape, CONTAINER_PATHS)) + r")(?=[/\s'\"]|$)"
    return re.sub(pattern, lambda m: str(root) + m.group(1), text)


def container_here(tmp_path: Path, env: dict[str, str], config: str, command: list[str] | None = None,
                   pod_container: dict[str, Any] | None = None) -> Container:
    """The container's filesystem under tmp_path/root: mounted secrets (a new TLS pair among them), config, policies.

    `pod_container`: the Deployment's container, whose named ports its httpGet probes use."""
    root = tmp_path / "root"
    secrets_dir = root / "run/secrets"
    secrets_dir.mkdir(parents=True)
    certs = make_dev_certs(tmp_path / "certs")
    shutil.copy(certs["server_cert"], secrets_dir / "seekgate_tls_cert")
    shutil.copy(certs["server_key"], secrets_dir / "seekgate_tls_key")
    (secrets_dir / "seekgate_kek").write_bytes(os.urandom(32))
    (secrets_dir / "triton_internal_key").write_text("test-internal-key")
    (root / "data/audit").mkdir(parents=True)
    (root / "etc/seekgate").mkdir(parents=True)
    shutil.copytree(REPO / "policies", root / "etc/seekgate/policies")
    (root / "etc/seekgate/seekgate.yaml").write_text(move_paths(config, root))
    http, grpc_, metrics, dead, status = free_ports(5)
    ports = {"http": http, "grpc": grpc_, "metrics": metrics}
    status_in_pod = None
    status_listen = (yaml.safe_load(config).get("server") or {}).get("status_listen")
    if status_listen:   # the config's status listener, its host kept, on a free port
        host, _, in_pod = status_listen.rpartition(":")
        env = {**env, "SEEKGATE_SERVER_STATUS_LISTEN": f"{host}:{status}"}
        ports["status"], status_in_pod = status, int(in_pod)
    full = {
        # Only what a container has: no SEEKGATE_* of the test run leaks in.
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8",
        # This checkout's proxy package, not the one the venv's editable install points at (a shared venv).
        "PYTHONPATH": str(REPO),
        **{k: move_paths(v, root) for k, v in env.items()},
        # The entrypoint reads the mounted secrets here; /data/secrets is a tmpfs in every shipped
        # deployment (tested above), not on this machine, hence its documented override.
        "SEEKGATE_SECRETS_MOUNT": str(secrets_dir), "SEEKGATE_SECRETS_ON_DISK": "1",
        "SEEKGATE_SERVER_HTTP_PORT": str(http), "SEEKGATE_SERVER_GRPC_PORT": str(grpc_),
        "SEEKGATE_SERVER_METRICS_PORT": str(metrics),
        # Triton is not started here: a port nothing listens on (seekgate's own health does not need it).
        "SEEKGATE_UPSTREAM_HTTP_URL": f"http://127.0.0.1:{dead}", "SEEKGATE_UPSTREAM_GRPC_TARGET": f"127.0.0.1:{dead}",
    }
    declared = {p["name"]: p["containerPort"] for p in (pod_container or {}).get("ports", [])}
    return Container(root, full, command or image_command(), ports, certs["ca"], declared, status_in_pod)


def https_status(url: str, ca: Path) -> int:
    """The status of a GET over TLS, the certificate verified against `ca` (its SANs hold 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return err.code


def assert_serves_tls(c: Container, probes: dict[str, list[str] | dict[str, Any]]) -> None:
    """Starts the container's command; its listeners answer over TLS and every probe passes; then it stops."""
    proc = c.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"exited {proc.returncode}: {c.log()}"
            try:
                if https_status(f"https://127.0.0.1:{c.ports['metrics']}/metrics", c.ca) == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not listening over TLS after 60 s: {c.log()}"
            time.sleep(0.3)
        # The client port too: any answer over a verified TLS connection (Triton is not there).
        assert https_status(f"https://127.0.0.1:{c.ports['http']}/v2/health/live", c.ca) in (200, 502, 503, 504)
        for where, probe in probes.items():
            passed, why = c.check(probe)
            assert passed, (where, why)
    finally:
        stop(proc)
    for where, probe in probes.items():   # a probe that passes with seekgate gone proves nothing
        assert not c.check(probe)[0], where


def assert_refuses_without_tls(tmp_path: Path, env: dict[str, str], config: str,
                               command: list[str] | None = None) -> None:
    c = container_here(tmp_path, {k: v for k, v in env.items() if k not in TLS_ENV}, config, command)
    out = c.run(timeout=60)
    assert out.returncode == 2 and PLAINTEXT_REFUSAL in out.stdout + out.stderr, (out.returncode, out.stderr)


def probe_command(probe: dict[str, Any]) -> list[str]:
    assert "exec" in probe, probe
    return list(probe["exec"]["command"])


def test_the_cli_in_the_container_reads_the_mounted_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `docker compose exec seekgate seekgate keys create ...` (deploy/README.md) passes no --config:
    # the CLI then reads config/seekgate.yaml under its working directory, the image's WORKDIR. It must
    # find the file Compose and the pod mount, or every exec'd command runs on the defaults.
    import argparse

    from proxy.cli.common import DEFAULT_CONFIG, load
    final_stage = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", final_stage, re.M)
    assert workdirs, "seekgate.Dockerfile: the final stage has no WORKDIR (the CLI would run in /)"
    mounted = "/etc/seekgate/seekgate.yaml"
    assert mounted in image_command() and mounts("seekgate")[mounted]["subPath"] == "seekgate.yaml"
    assert f"./config/seekgate.yaml:{mounted}:ro" in SERVICES["seekgate"]["volumes"]
    root = tmp_path / "image"
    for target, link in re.findall(r"ln -s (\S+) (\S+)", final_stage):   # the image's links, under root
        (root / link.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / link.lstrip("/")).symlink_to(target)
    (root / mounted.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / mounted.lstrip("/")).write_text(one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"])
    cwd = root / workdirs[-1].lstrip("/")
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    for var in [v for v in os.environ if v.startswith("SEEKGATE_")]:
        monkeypatch.delenv(var)
    assert (cwd / DEFAULT_CONFIG).resolve() == (root / mounted.lstrip("/")).resolve()
    settings = load(argparse.Namespace(config=None, data_dir=None))
    assert settings.server.drain_timeout_s == 310 and settings.crypto.root_rotation_days == 0   # the pod's, not defaults


def test_the_image_listens_on_every_interface_with_tls_only() -> None:
    env = image_env()
    assert env["SEEKGATE_SERVER_HOST"] == "0.0.0.0"
    assert env["SEEKGATE_SERVER_TLS_CERT_FILE"] == "/run/secrets/seekgate_tls_cert"
    assert env["SEEKGATE_SERVER_TLS_KEY_FILE"] == "/run/secrets/seekgate_tls_key"
    assert not any("INSECURE_PLAINTEXT" in k for k in env) and "--insecure-plaintext" not in image_command()
    for check in (image_healthcheck(), SERVICES["seekgate"]["healthcheck"]["test"][1:]):
        assert check[:3] == ["python", PROBE_SCRIPT, "https://127.0.0.1:8002/metrics"], check


def test_services_do_not_advertise_cleartext_on_tls_ports() -> None:
    # appProtocol tells meshes, Gateways and cloud load balancers how to speak to the port:
    # `http` / `grpc` / `kubernetes.io/h2c` mean cleartext, which a TLS-only listener answers with a
    # handshake failure. Every seekgate port the Services name serves TLS (the image's env above).
    env = image_env()
    assert env["SEEKGATE_SERVER_TLS_CERT_FILE"] and env["SEEKGATE_SERVER_TLS_KEY_FILE"]
    cleartext = {"http", "grpc", "h2c", "kubernetes.io/h2c", "kubernetes.io/ws", "tcp"}
    ports = [p for f in ("deploy/k8s/service.yaml", "deploy/k8s-ha/service-grpc-headless.yaml")
             for p in yaml.safe_load((REPO / f).read_text())["spec"]["ports"]]
    assert {p["targetPort"] for p in ports} == {"http", "grpc"}
    for port in ports:
        assert port.get("appProtocol", "").lower() not in cleartext | {""}, port

def test_compose_mounts_the_tls_pair_where_the_image_reads_it() -> None:
    def secrets_of(svc: dict[str, Any]) -> set[str]:
        return {s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])}
    for name in ("seekgate", "seekgate-a", "seekgate-b"):
        assert {"seekgate_tls_cert", "seekgate_tls_key"} <= secrets_of(SERVICES[name]), name
        assert not any("INSECURE" in k for k in SERVICES[name].get("environment", {})), name
    # Short syntax: each lands in /run/secrets/<name>, the image's SEEKGATE_SERVER_TLS_*_FILE.
    assert {"seekgate_tls_cert", "seekgate_tls_key", "seekgate_tls_ca"} <= set(COMPOSE["secrets"])
    prom = yaml.safe_load((REPO / "config/prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "seekgate")
    assert job["scheme"] == "https" and job["tls_config"]["ca_file"] == "/run/secrets/seekgate_tls_ca"
    assert not job["tls_config"].get("insecure_skip_verify")
    assert "seekgate_tls_ca" in secrets_of(SERVICES["prometheus"])


def test_the_image_with_compose_env_serves_tls_and_its_healthchecks_pass(tmp_path: Path) -> None:
    env = {**image_env(), **compose_env("seekgate")}
    config = (REPO / "config/seekgate.yaml").read_text()   # ./config/seekgate.yaml, mounted read-only
    c = container_here(tmp_path / "tls", env, config)
    assert_serves_tls(c, {"Dockerfile HEALTHCHECK": image_healthcheck(),
                          "compose healthcheck": SERVICES["seekgate"]["healthcheck"]["test"][1:]})
    assert_refuses_without_tls(tmp_path / "plain", env, config)


def test_k8s_mounts_the_tls_secret_where_the_image_reads_it() -> None:
    mount = mounts("seekgate")["/run/secrets"]
    sources = VOLUMES[mount["name"]]["projected"]["sources"]
    [tls] = [s["secret"] for s in sources if "secret" in s and s["secret"]["name"] == "seekgate-tls"]
    assert {i["key"]: i["path"] for i in tls["items"]} == {"tls.crt": "seekgate_tls_cert", "tls.key": "seekgate_tls_key"}
    env = {**image_env(), **pod_env(CONTAINERS["seekgate"])}
    assert not any("INSECURE" in k for k in env)
    assert "insecure_plaintext" not in one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"]
    # Kubernetes' TLS Secret keys, and Prometheus over HTTPS (the probes: the status listener, below).
    [endpoint] = [e for e in one("PodMonitor")["spec"]["podMetricsEndpoints"] if e["port"] == "metrics"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"] == {"name": "seekgate-tls",
                                                                                        "key": "ca.crt"}
    assert endpoint["tlsConfig"]["serverName"] and not endpoint["tlsConfig"].get("insecureSkipVerify")


def test_the_pod_serves_tls_and_its_probes_pass(tmp_path: Path) -> None:
    sg = CONTAINERS["seekgate"]
    env = {**image_env(), **pod_env(sg)}
    config = one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"]
    command = [*json.loads(dockerfile_instructions("ENTRYPOINT")[0]), *sg["args"]]   # args replace the CMD
    c = container_here(tmp_path / "tls", env, config, command, pod_container=sg)
    # Readiness needs Triton, which is not there: startup and liveness are seekgate's alone.
    assert_serves_tls(c, {p: sg[p] for p in ("startupProbe", "livenessProbe")})
    assert_refuses_without_tls(tmp_path / "plain", env, config, command)


# ------------------------------------------------------------------ probes under mTLS

SEEKGATE_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_SCRIPT = "/usr/local/bin/seekgate-probe"
MTLS_CLIENT_CA = "/run/secrets/seekgate_client_ca"   # server.tls_client_ca_file with mTLS on (deploy/README.md)
# What each seekgate probe asks the status listener: liveness and startup seekgate's own, readiness Triton's too.
PROBE_PATHS = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
               "readinessProbe": "/v2/health/ready"}


def projected_items(secret: str) -> dict[str, str]:
    """Where seekgate's /run/secrets volume puts each key of `secret` (the path inside the container)."""
    mount = mounts("seekgate")["/run/secrets"]
    [source] = [s["secret"] for s in VOLUMES[mount["name"]]["projected"]["sources"]
                if "secret" in s and s["secret"]["name"] == secret]
    return {i["key"]: f"{mount['mountPath']}/{i['path']}" for i in source["items"]}


def assert_probes_are_the_kubelets_on_the_status_listener(rendered: list[dict[str, Any]], tmp_path: Path,
                                                          stand_ins: dict[tuple[str, str], str] | None = None) -> None:
    """seekgate's probes in a rendered set: the kubelet's httpGet, plain HTTP, on the named port that the
    config map's server.status_listen (parsed by seekgate's own loader) binds on every pod address; that port
    is in no Service and opened to no pod by the NetworkPolicy (the kubelet probes from the node)."""
    from proxy.frontend.http import PUBLIC_PROBES
    from proxy.settings import status_address
    [deployment] = [d for d in rendered if d["kind"] == "Deployment"]
    [sg] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "seekgate"]
    [config] = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "seekgate-config"]
    (tmp_path / "seekgate.yaml").write_text(config["data"]["seekgate.yaml"])
    server = load_settings(tmp_path / "seekgate.yaml", env={**image_env(), **pod_env(sg, stand_ins)}).server
    status = status_address(server)
    assert status is not None, "server.status_listen is off: the kubelet's probes have nothing to ask"
    assert status[0] == "0.0.0.0", status   # the kubelet dials the pod IP, not the pod's loopback
    declared = {p["name"]: p["containerPort"] for p in sg["ports"]}
    for name, path in PROBE_PATHS.items():
        probe = sg[name]
        assert not {"exec", "tcpSocket", "grpc"} & set(probe), name   # no process started in the container
        get = probe["httpGet"]
        assert get.get("scheme", "HTTP") == "HTTP" and "host" not in get, (name, get)
        assert (get["path"], declared[get["port"]]) == (path, status[1]), name
        assert path in PUBLIC_PROBES, name
    [port_name] = {sg[name]["httpGet"]["port"] for name in SEEKGATE_PROBES}
    for service in (d for d in rendered if d["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert port.get("targetPort") not in (port_name, status[1]) and port["port"] != status[1], port
    [policy] = [d["spec"] for d in rendered if d["kind"] == "NetworkPolicy"]
    opened = {p["port"] for rule in policy["ingress"] for p in rule.get("ports", [])}
    assert not {port_name, status[1]} & opened, opened
    for monitor in (d for d in rendered if d["kind"] == "PodMonitor"):
        assert all(e["port"] != port_name for e in monitor["spec"]["podMetricsEndpoints"])


def test_seekgate_probes_are_the_kubelets_on_the_status_listener_and_need_no_certificate(tmp_path: Path) -> None:
    # Under mTLS (server.tls_client_ca_file) every TLS listener, /metrics included, refuses a client without
    # a certificate, and the kubelet has none: its probes ask the plain-HTTP status listener instead, and
    # nothing of the former exec probes' client certificate is left to issue, mount or rotate.
    assert_probes_are_the_kubelets_on_the_status_listener(RENDERED, tmp_path)
    sources = VOLUMES[mounts("seekgate")["/run/secrets"]["name"]]["projected"]["sources"]
    optional = {s["secret"]["name"] for s in sources if "secret" in s and s["secret"].get("optional")}
    assert optional == {"seekgate-client-ca"}   # without mTLS the pod starts as before, the Secret absent
    assert projected_items("seekgate-client-ca") == {"ca.crt": MTLS_CLIENT_CA}
    assert "seekgate-probe" not in json.dumps(RENDERED)   # no probe Secret, no probe script
    assert not (REPO / "deploy/cert-manager/probe-certificate.yaml").exists()
    # Docker has no kubelet: the image's HEALTHCHECK and Compose's still run the script, so the image keeps it.
    assert f"COPY deploy/docker/seekgate_probe.py {PROBE_SCRIPT}" in DOCKERFILE


def mtls_container_here(tmp_path: Path, env: dict[str, str], config: str, command: list[str] | None,
                        probe_cert: str | None = None, probe_key: str | None = None,
                        pod_container: dict[str, Any] | None = None) -> Container:
    """container_here with mTLS on: the client CA at MTLS_CLIENT_CA, and a client pair it signed at
    probe_cert/_key if given."""
    c = container_here(tmp_path, {**env, "SEEKGATE_SERVER_TLS_CLIENT_CA_FILE": MTLS_CLIENT_CA}, config, command,
                       pod_container)
    certs = tmp_path / "certs"   # container_here's CA, which signed a client certificate too
    copies = [("ca.pem", MTLS_CLIENT_CA)]
    if probe_cert and probe_key:
        copies += [("client.pem", probe_cert), ("client-key.pem", probe_key)]
    for src, dst in copies:
        shutil.copy(certs / src, c.moved(dst))
    return c


def wait_until_passes(c: Container, proc: subprocess.Popen[str], check: list[str] | dict[str, Any]) -> None:
    deadline = time.monotonic() + 60
    while not (result := c.check(check))[0]:
        assert proc.poll() is None, f"exited {proc.returncode}: {c.log()}"
        assert time.monotonic() < deadline, f"{check} failing after 60 s: {result[1]} {c.log()}"
        time.sleep(0.3)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Triton(http.server.BaseHTTPRequestHandler):
    """Triton's health, as seekgate's /v2/health/* forwards it: `status` answers."""

    status = 200

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.send_response(self.status if self.path in ("/v2/health/ready", "/v2/health/live") else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def test_with_mtls_on_the_pods_kubelet_probes_pass_without_a_certificate(tmp_path: Path) -> None:
    # The pod as rendered, mTLS turned on the documented way (the client CA from the Secret
    # seekgate-client-ca), its probes made as the kubelet makes them: plain HTTP, no certificate.
    sg = CONTAINERS["seekgate"]
    env = {**image_env(), **pod_env(sg)}
    config = one("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"]
    c = mtls_container_here(tmp_path, env, config, [*json.loads(dockerfile_instructions("ENTRYPOINT")[0]),
                                                    *sg["args"]], pod_container=sg)
    triton_answers = type("TritonAnswers", (_Triton,), {})
    triton = http.server.ThreadingHTTPServer(("127.0.0.1", 0), triton_answers)
    threading.Thread(target=triton.serve_forever, daemon=True).start()
    c.env["SEEKGATE_UPSTREAM_HTTP_URL"] = f"http://127.0.0.1:{triton.server_address[1]}"
    probes = {name: sg[name] for name in SEEKGATE_PROBES}
    proc = c.start()
    try:
        wait_until_passes(c, proc, probes["startupProbe"])
        for name, probe in probes.items():
            assert c.check(probe) == (True, "HTTP 200"), (name, c.log())
        # mTLS is on: a client without a certificate is refused at the handshake on the metrics port ...
        with pytest.raises(OSError):
            https_status(f"https://127.0.0.1:{c.ports['metrics']}/metrics", c.ca)
        # ... while the status listener asks for none, and serves nothing but the two probes.
        assert c.check({"httpGet": {**probes["livenessProbe"]["httpGet"], "path": "/metrics"}}) == (False, "HTTP 404")
        # Readiness follows Triton through seekgate (the pod leaves the Service); liveness and startup do not,
        # with Triton unready or gone altogether (a sidecar restart reloading the checkpoint).
        triton_answers.status = 503
        assert c.check(probes["readinessProbe"]) == (False, "HTTP 503")
        triton.shutdown()
        triton.server_close()
        assert not c.check(probes["readinessProbe"])[0]
        for name in ("startupProbe", "livenessProbe"):
            assert c.check(probes[name]) == (True, "HTTP 200"), name
    finally:
        triton.shutdown()
        triton.server_close()
        stop(proc)
    for name, probe in probes.items():   # a probe that passes with seekgate gone proves nothing
        assert not c.check(probe)[0], name


def test_the_probe_blames_a_missing_client_certificate_only_when_the_handshake_is_refused() -> None:
    # Nothing listening is not an mTLS problem: the message must not send an operator after a Secret.
    [port] = free_ports(1)
    script = str(REPO / "deploy/docker/seekgate_probe.py")
    out = subprocess.run([sys.executable, script, f"https://127.0.0.1:{port}/metrics", "--client-cert",
                          "/nonexistent/seekgate_probe_cert"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "refused" in out.stderr.lower() and "client certificate" not in out.stderr


def test_with_mtls_on_the_compose_and_image_healthchecks_pass_with_the_pair_as_secrets(tmp_path: Path) -> None:
    # Compose with mTLS turned on the documented way: the secrets seekgate_client_ca, seekgate_probe_cert
    # and seekgate_probe_key added to the service (short syntax: /run/secrets/<name>).
    env = {**image_env(), **compose_env("seekgate")}
    config = (REPO / "config/seekgate.yaml").read_text()
    cert, key = "/run/secrets/seekgate_probe_cert", "/run/secrets/seekgate_probe_key"
    c = mtls_container_here(tmp_path, env, config, None, cert, key)
    checks = {"Dockerfile HEALTHCHECK": image_healthcheck(),
              **{f"compose {name}": SERVICES[name]["healthcheck"]["test"][1:] for name in ("seekgate", "seekgate-a")}}
    for where, check in checks.items():
        assert dict(zip(check[3::2], check[4::2], strict=True)).items() >= {"--client-cert": cert, "--client-key": key}.items(), where
    proc = c.start()
    try:
        wait_until_passes(c, proc, checks["Dockerfile HEALTHCHECK"])
        for where, check in checks.items():
            out = c.run(check, timeout=30)
            assert out.returncode == 0, (where, out.stderr)
        for path in (cert, key):
            Path(c.moved(path)).rename(c.moved(path) + ".away")
        for where, check in checks.items():   # without the pair, mTLS refuses them: the pair is what passes
            out = c.run(check, timeout=30)
            assert out.returncode == 1 and "no client certificate presented" in out.stderr, (where, out.stderr)
    finally:
        stop(proc)
