"""What the rendered Kubernetes set and the Compose file promise about secrets, privileges, rollouts, alerts and the supply chain.

Rendered with `kubectl kustomize deploy/k8s` (offline), parsed; nothing is applied or built
here (no cluster, no Docker engine, no GPU). tests/test_deploy_scan.py runs the policy
scanners over the same set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

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


def test_operator_role_grants_no_way_around_seekgate() -> None:
    forbidden = {"pods/exec", "pods/attach", "pods/portforward", "pods/ephemeralcontainers", "secrets", "*"}
    for role in (d for d in RENDERED if d["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            assert not forbidden & set(rule.get("resources", [])), (role["metadata"]["name"], rule)
            assert "*" not in rule.get("verbs", []) and "*" not in rule.get("apiGroups", [])


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
