"""CPU, memory and process limits: every Compose service has them, and the ones that run a container the Kubernetes pod also runs match it.

Static: docker-compose.yml parsed, the Kubernetes sets rendered with `kubectl kustomize` (offline).
No Docker engine or cluster here; what Compose would apply is read from `deploy.resources`, the
Compose Specification's place for it (docker compose applies limits and the memory reservation
outside Swarm too).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.test_deploy_ha import _render

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def _containers(directory: str) -> dict[str, dict[str, Any]]:
    [deployment] = [d for d in _render(directory) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"] + pod.get("initContainers", [])}


POD = _containers("deploy/k8s")
HA_POD = _containers("deploy/k8s-ha")
# Compose service -> the pod container running the same image and command.
SAME_CONTAINER = {
    "triton": POD["triton"], "triton-a": HA_POD["triton"], "triton-b": HA_POD["triton"],
    "seekgate": POD["seekgate"], "seekgate-a": HA_POD["seekgate"], "seekgate-b": HA_POD["seekgate"],
    "fluent-bit": POD["fluent-bit"], "seekgate-migrate": HA_POD["migrate"],
}

_DOCKER_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_K8S_UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9,
              "T": 10**12}


def interpolate(value: Any) -> str:
    """A Compose value with its `${VAR:-default}` at their defaults (no .env on the test machine)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def docker_bytes(value: Any) -> int:
    """Compose's byte values as Docker reads them (go-units RAMInBytes: binary, `g` = `gb` = GiB)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)b?", interpolate(value).strip().lower())
    assert m, f"not a Compose byte value: {value!r}"
    return int(Decimal(m.group(1)) * _DOCKER_UNITS[m.group(2)])


def k8s_bytes(value: Any) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert m, f"not a Kubernetes memory quantity: {value!r}"
    return int(Decimal(m.group(1)) * _K8S_UNITS[m.group(2) or ""])


def k8s_cpus(value: Any) -> Decimal:
    text = str(value)
    return Decimal(text[:-1]) / 1000 if text.endswith("m") else Decimal(text)


def resources(name: str) -> dict[str, Any]:
    return dict(SERVICES[name].get("deploy", {}).get("resources", {}))


def tmpfs_bytes(service: dict[str, Any]) -> int:
    """What the service's tmpfs mounts and /dev/shm may hold: charged to its memory cgroup."""
    total = docker_bytes(service["shm_size"]) if "shm_size" in service else 0
    for mount in service.get("tmpfs", []):
        size = re.search(r"size=([^,]+)", mount)
        assert size, f"a tmpfs without size= may take half the host's memory: {mount}"
        total += docker_bytes(size.group(1))
    return total


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_compose_service_has_cpu_memory_and_pids_limits(name: str) -> None:
    svc = SERVICES[name]
    limits = resources(name).get("limits", {})
    assert Decimal(str(limits.get("cpus", 0))) > 0, f"{name}: no deploy.resources.limits.cpus"
    assert docker_bytes(limits.get("memory", 0)) > 0, f"{name}: no deploy.resources.limits.memory"
    assert isinstance(limits.get("pids"), int) and limits["pids"] > 0, f"{name}: no deploy.resources.limits.pids"
    # One place for each: the service-level spellings would have to agree with deploy.resources.
    assert not {"mem_limit", "cpus", "cpu_quota", "pids_limit", "mem_reservation"} & set(svc), name
    reservations = resources(name).get("reservations", {})
    if "cpus" in reservations:
        assert Decimal(str(reservations["cpus"])) <= Decimal(str(limits["cpus"])), name
    if "memory" in reservations:
        assert docker_bytes(reservations["memory"]) <= docker_bytes(limits["memory"]), name
    # tmpfs and shm live in the container's memory: a limit below them would kill it when they fill.
    assert tmpfs_bytes(svc) < docker_bytes(limits["memory"]), name


@pytest.mark.parametrize("name", sorted(SAME_CONTAINER))
def test_compose_resources_match_the_pod_container(name: str) -> None:
    k8s = SAME_CONTAINER[name]["resources"]
    compose = resources(name)
    for compose_side, k8s_side in (("limits", "limits"), ("reservations", "requests")):
        got, want = compose.get(compose_side, {}), k8s[k8s_side]
        assert Decimal(str(got.get("cpus", 0))) == k8s_cpus(want["cpu"]), (name, compose_side)
        assert docker_bytes(got.get("memory", 0)) == k8s_bytes(want["memory"]), (name, compose_side)


def test_every_pod_container_has_a_compose_twin_or_runs_only_in_the_pod() -> None:
    # A container added to the pod gets its Compose service's limits compared here, or a reason not to.
    pod_only = {"prepare-data"}   # Compose creates /data/audit through the seekgate-audit volume instead
    assert set(POD) | set(HA_POD) == {c["name"] for c in SAME_CONTAINER.values()} | pod_only


def test_the_units_read_as_docker_and_kubernetes_read_them() -> None:
    # The comparison above is only as good as these: a 1000-vs-1024 slip would pass two different limits.
    assert docker_bytes("64g") == docker_bytes("64gb") == k8s_bytes("64Gi") == 64 * 2**30
    assert docker_bytes("128m") == k8s_bytes("128Mi") != k8s_bytes("128M")
    assert docker_bytes("${TRITON_SHM_SIZE:-2gb}") == 2 * 2**30
    assert k8s_cpus("200m") == Decimal("0.2") and k8s_cpus("8") == 8 and k8s_cpus(2) == 2


def test_no_probe_starts_a_process_in_the_seekgate_container() -> None:
    # An exec probe is a process started in the container every period, on its CPU, memory and pids limits
    # above (a Python interpreter, tens of MiB, per check); the kubelet's httpGet costs it one plain request.
    # Triton's exec probes stay: it listens on the pod's loopback, which the kubelet cannot reach.
    for pod in (POD, HA_POD):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = pod["seekgate"][kind]
            assert "exec" not in probe and probe["httpGet"]["port"] == "status", kind
