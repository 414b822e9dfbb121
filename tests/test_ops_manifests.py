"""The deployment artifacts, parsed: docker-compose.yml, the Dockerfiles, deploy/k8s, Grafana and Fluent Bit config.

No Docker engine, cluster or GPU here: these tests check what the files say (and run
what can run without them: seekgate's settings loader on the env they set, the policy
loader on the ConfigMap, the container entrypoint on a temp dir, the health check commands
against a real seekgate, `kubectl kustomize` on deploy/k8s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.cli.devcert import make_dev_certs
from proxy.local.triton import TritonInstall, TritonLaunch, build_command, free_ports
from proxy.settings import load_settings
from proxy.steps.policy import check_policy_dir
from tests.conftest import REPO
from tests.gateway import Gateway

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
K8S = [d for p in sorted((REPO / "deploy" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
DOCKERFILES = {p.name: p.read_text() for p in (REPO / "deploy" / "docker").glob("*.Dockerfile")}
SECRETISH = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|_KEY|PIN)$", re.I)
_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set: the default (what a fresh checkout runs)."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in K8S if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def call_status(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30, context=context) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def image_pinned(image: str) -> bool:
    ref = interpolate(image).rsplit("/", 1)[-1]
    return ":" in ref and ref.split(":", 1)[1] not in ("", "latest") and "$" not in ref


# ------------------------------------------------------------------ compose

def test_compose_services_and_healthchecks() -> None:
    assert {"triton", "seekgate", "prometheus", "grafana"} <= set(SERVICES)
    scraped = {t.split(":")[0] for j in yaml.safe_load((REPO / "config/prometheus/prometheus.yml").read_text())
               ["scrape_configs"] for t in j["static_configs"][0]["targets"]}
    for name, svc in SERVICES.items():
        if svc.get("restart") == "no":     # a one-shot job has an exit code, not a health
            continue
        if svc.get("healthcheck") == {"disable": True}:
            # A distroless image (Fluent Bit) has nothing to run a check with: Prometheus
            # scrapes it instead, and alerts_ops.yml alerts when it is down.
            assert name in scraped, name
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_triton_is_unpublished_and_reachable_only_from_seekgate() -> None:
    triton, seekgate = SERVICES["triton"], SERVICES["seekgate"]
    assert "ports" not in triton and "network_mode" not in triton
    nets = COMPOSE["networks"]
    inference = [n for n, cfg in (triton["networks"]).items() if (cfg or {}).get("ipv4_address")]
    assert inference == ["inference"] and nets["inference"]["internal"] is True
    on_inference = {n for n, s in SERVICES.items() if "inference" in s.get("networks", [])}
    assert on_inference == {"triton", "seekgate"}
    # Triton's HTTP/gRPC listen on its inference address only: Prometheus, on `monitoring`
    # with it for the metrics port, cannot reach them.
    address = interpolate(triton["networks"]["inference"]["ipv4_address"])
    assert interpolate(env_of(triton)["TRITON_BIND_ADDRESS"]) == address
    subnet = interpolate(nets["inference"]["ipam"]["config"][0]["subnet"])
    assert address.rsplit(".", 1)[0] == subnet.split("/")[0].rsplit(".", 1)[0]
    assert "inference" not in SERVICES["prometheus"]["networks"]
    assert "monitoring" in triton["networks"] and "monitoring" in SERVICES["prometheus"]["networks"]
    assert seekgate["depends_on"]["triton"]["condition"] == "service_healthy"


def test_seekgate_reaches_triton_by_a_name_only_the_inference_network_resolves() -> None:
    # seekgate and Triton share `inference` and `monitoring`: the service name resolves to
    # either address, and only the inference one has a listener. The upstream host must be
    # an alias Triton has on `inference` and on no other network (nor any other service).
    env = env_of(SERVICES["seekgate"])
    http_url = urlsplit(env["SEEKGATE_UPSTREAM_HTTP_URL"])
    grpc_host, _, grpc_port = env["SEEKGATE_UPSTREAM_GRPC_TARGET"].rpartition(":")
    assert (http_url.scheme, http_url.port, grpc_port) == ("http", 8000, "8001")
    assert http_url.hostname == grpc_host == "triton-inference"
    answers = []   # (service, network) pairs on which Docker's DNS resolves the name
    for name, svc in SERVICES.items():
        nets = svc.get("networks", [])
        for net, cfg in (nets.items() if isinstance(nets, dict) else ((n, None) for n in nets)):
            if grpc_host in (name, *(cfg or {}).get("aliases", [])):
                answers.append((name, net))
    assert answers == [("triton", "inference")]
    assert grpc_host not in SERVICES   # not a service name, which every network would resolve


def test_triton_gets_gpus_models_and_checkpoint_read_only() -> None:
    triton = SERVICES["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    mounts = {v.split(":")[-2] if v.count(":") >= 2 else v: v for v in triton["volumes"]}
    assert mounts["/models"].startswith("./triton_models:") and mounts["/models"].endswith(":ro")
    assert mounts["/checkpoint"].endswith(":ro") and "CHECKPOINT_DIR" in mounts["/checkpoint"]
    assert "triton_internal_key" in triton["secrets"]


def test_seekgate_container_is_locked_down() -> None:
    svc = SERVICES["seekgate"]
    uid = svc["user"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert svc["read_only"] is True
    assert "ALL" in svc["cap_drop"]
    assert any(v.startswith("seekgate-data:/data") for v in svc["volumes"])
    assert sorted(p.rsplit(":", 1)[1] for p in svc["ports"]) == ["8000", "8001"]
    assert all(p.startswith("${SEEKGATE_BIND:-127.0.0.1}:") for p in svc["ports"]), svc["ports"]
    assert {"seekgate_kek", "triton_internal_key"} <= set(svc["secrets"])
    dockerfile = DOCKERFILES["seekgate.Dockerfile"]
    assert re.search(r"^USER 10001", dockerfile, re.M) and uid == "10001"
    assert 'CMD ["seekgate", "serve"' in dockerfile


def test_seekgate_env_is_real_settings() -> None:
    # The image's ENV and compose's environment, through seekgate's own loader: unknown
    # SEEKGATE_* section names or bad values would raise SettingsError here.
    image_env = dict(re.findall(r"(SEEKGATE_\w+)=(\S+)", DOCKERFILES["seekgate.Dockerfile"]))
    env = {**image_env, **{k: interpolate(v) for k, v in env_of(SERVICES["seekgate"]).items()}}
    s = load_settings(REPO / "config" / "seekgate.yaml", env=env)
    assert (s.data_dir, s.server.host, s.policy.directory) == ("/data", "0.0.0.0", "/etc/seekgate/policies")
    assert s.upstream.http_url == "http://triton-inference:8000" and s.upstream.grpc_target == "triton-inference:8001"
    k8s_env = {e["name"]: e["value"] for c in k8s("Deployment")["spec"]["template"]["spec"]["containers"]
               if c["name"] == "seekgate" for e in c["env"]}
    s = load_settings(None, env={**image_env, **k8s_env})
    assert s.upstream.http_url == "http://127.0.0.1:18000" and s.upstream.grpc_target == "127.0.0.1:18001"


def test_images_are_pinned() -> None:
    for name, svc in SERVICES.items():
        assert image_pinned(svc["image"]), (name, svc["image"])
    for name, text in DOCKERFILES.items():
        for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
            assert image_pinned(base), (name, base)
    assert "FROM nvcr.io/nvidia/tritonserver:24.12-py3" in DOCKERFILES["triton.Dockerfile"]
    # Python packages in the Triton image: exact versions only.
    packages = re.findall(r"^\s+([A-Za-z][\w.-]*)(==[\w.+]+)?\s*\\?$", DOCKERFILES["triton.Dockerfile"], re.M)
    assert {p for p, _ in packages} >= {"torch", "transformers", "tokenizers", "safetensors", "accelerate"}
    assert all(pin for _, pin in packages), packages


def test_no_secret_in_the_compose_file() -> None:
    for name, svc in SERVICES.items():
        for key, value in env_of(svc).items():
            if SECRETISH.search(key):
                # Only a reference: ${VAR} from .env/the shell, never a literal.
                assert re.fullmatch(r"\$\{\w+(:-)?\}", value), (name, key, value)
        assert "GF_SECURITY_ADMIN_PASSWORD" not in env_of(svc)
    assert env_of(SERVICES["grafana"])["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    for name, secret in COMPOSE["secrets"].items():
        assert set(secret) == {"file"} and "./secrets/" in secret["file"], name
    # The Triton secret reaches tritonserver from the mounted file, not from the compose command.
    assert "command" not in SERVICES["triton"]
    entry = (REPO / "deploy" / "docker" / "triton-entrypoint.sh").read_text()
    assert '/run/secrets/triton_internal_key' in entry and 'key="$(cat "$key_file")"' in entry


def test_env_example_names_every_variable() -> None:
    used = set(_VAR.findall((REPO / "docker-compose.yml").read_text()))
    named = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert {v for v, _ in used} == named


def test_triton_entrypoint_mirrors_seekgate_triton(tmp_path: Path) -> None:
    # Every flag `seekgate triton` gives tritonserver is in the container's command too.
    fake = TritonInstall(tmp_path / "tritonserver", tmp_path / "backends", tmp_path / "stubs")
    launch = TritonLaunch(REPO / "triton_models", tmp_path, config_name="gpu")
    ours = {a.split("=", 1)[0] for a in build_command(launch, fake, tmp_path / "backends")[1:]}
    ours -= {"--backend-directory"}   # the image's own backends are where Triton looks by default
    entry = (REPO / "deploy" / "docker" / "triton-entrypoint.sh").read_text()
    theirs = set(re.findall(r"(--[a-z-]+)=", entry))
    assert ours <= theirs, ours - theirs
    assert '--http-restricted-api="$restricted:seekgate-internal=$key"' in entry
    assert '--grpc-restricted-protocol="$restricted:seekgate-internal=$key"' in entry
    sh = subprocess.run(["sh", "-n", str(REPO / "deploy" / "docker" / "triton-entrypoint.sh")])
    assert sh.returncode == 0


def test_prometheus_and_grafana_mount_config() -> None:
    prom = SERVICES["prometheus"]
    assert "./config/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in
               yaml.safe_load((REPO / "config/prometheus/prometheus.yml").read_text())["scrape_configs"]}
    assert targets["seekgate"] == ["seekgate:8002"] and targets["triton"] == ["triton:8002"]

    grafana = SERVICES["grafana"]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert volumes["/etc/grafana/provisioning"] == "./config/grafana/provisioning"
    provider = yaml.safe_load((REPO / "config/grafana/provisioning/dashboards/seekgate.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (REPO / volumes[path] / "seekgate.json").exists()
    source = yaml.safe_load((REPO / "config/grafana/provisioning/datasources/prometheus.yml").read_text())
    ds = source["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in SERVICES
    dashboard = json.loads((REPO / "config/grafana/dashboards/seekgate.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}


def test_audit_shipping_is_an_optional_profile() -> None:
    fb = SERVICES["fluent-bit"]
    assert fb["profiles"] == ["audit-shipping"] and SERVICES["elasticsearch-setup"]["profiles"] == ["audit-shipping"]
    assert "seekgate-audit:/data/audit:ro" in fb["volumes"]
    assert fb["depends_on"]["elasticsearch-setup"]["condition"] == "service_completed_successfully"
    conf = yaml.safe_load((REPO / "config/fluent-bit/fluent-bit.yaml").read_text())
    tail = next(i for i in conf["pipeline"]["inputs"] if i["name"] == "tail")
    assert tail["path"].split(",")[0] == "/data/audit/audit.jsonl" and tail["parser"] == "seekgate_audit"
    [es] = conf["pipeline"]["outputs"]
    assert es["name"] == "es" and es["logstash_prefix"] == "seekgate-audit"
    # The password from the mounted secret file (Fluent Bit's env uri), never the environment.
    assert es["http_passwd"] == "${ELASTICSEARCH_PASSWORD}"
    assert {"name": "ELASTICSEARCH_PASSWORD", "uri": "file:///run/secrets/elasticsearch/password"} in conf["env"]
    assert not any("PASSWORD" in k for k in env_of(fb)) and not any("PASSWORD" in k for k in
                                                                      env_of(SERVICES["elasticsearch-setup"]))
    targets = {s["target"] for s in fb["secrets"]}
    assert targets == {"/run/secrets/elasticsearch/password"}
    # A finite retry limit: with id_key, `False` retries 409 conflicts forever.
    assert isinstance(es["retry_limit"], int) and 0 < es["retry_limit"] <= 100
    parser = dict(_fluent_sections((REPO / "config/fluent-bit/parsers.conf").read_text())[0][1])
    assert parser["Time_Key"] == "timestamp"
    # The parser's time format reads the audit writer's timestamps.
    from datetime import datetime

    from proxy.audit.writer import _iso_utc
    fmt = parser["Time_Format"].replace("%L", "%f")
    assert datetime.strptime(_iso_utc(1795929560.123), fmt).microsecond == 123000


def test_ilm_policy_keeps_audit_180_days() -> None:
    policy = json.loads((REPO / "config/fluent-bit/es-ilm-policy.json").read_text())["policy"]
    assert policy["phases"]["delete"]["min_age"] == "180d" and "delete" in policy["phases"]["delete"]["actions"]
    template = json.loads((REPO / "config/fluent-bit/es-index-template.json").read_text())
    assert template["index_patterns"] == ["seekgate-audit-*"]
    setup = (REPO / "config/fluent-bit/es-setup.sh").read_text()
    name = re.search(r"_ilm/policy/(\S+)", setup).group(1)  # type: ignore[union-attr]
    assert template["template"]["settings"]["index.lifecycle.name"] == name
    from proxy.audit.writer import FIELDS
    mapped = set(template["template"]["mappings"]["properties"])
    assert set(FIELDS) <= mapped, set(FIELDS) - mapped


def _fluent_sections(text: str) -> list[tuple[str, dict[str, str]]]:
    sections: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            sections.append((line.strip("[]"), {}))
        else:
            key, _, value = line.partition(" ")
            sections[-1][1][key] = value.strip()
    return sections


# ------------------------------------------------------------------ the seekgate entrypoint

def _mountinfo(tmp_path: Path, secrets_fs: str) -> Path:
    """A /proc/self/mountinfo in which <data>/secrets is a mount of type `secrets_fs` inside an ext4 /."""
    path = tmp_path / "mountinfo"
    path.write_text(f"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
                    f"40 22 0:50 / {tmp_path / 'data' / 'secrets'} rw,nosuid shared:9 - {secrets_fs} tmpfs rw,size=1024k\n")
    return path


def _entrypoint(tmp_path: Path, *cmd: str, secrets_fs: str = "tmpfs") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SEEKGATE_SECRETS_MOUNT": str(tmp_path / "run"), "SEEKGATE_DATA_DIR": str(tmp_path / "data"),
           "SEEKGATE_MOUNTINFO": str(_mountinfo(tmp_path, secrets_fs))}
    return subprocess.run([sys.executable, str(REPO / "deploy/docker/seekgate_entrypoint.py"), *cmd],
                          env=env, capture_output=True, text=True, timeout=30)


def test_entrypoint_installs_secrets_0600_and_never_swaps_the_kek(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "seekgate_kek").write_bytes(b"k" * 32)
    (tmp_path / "run" / "triton_internal_key").write_text("s3cret\n")
    os.chmod(tmp_path / "run" / "seekgate_kek", 0o444)   # as a secret mount may present it
    out = _entrypoint(tmp_path, "sh", "-c", "echo started")
    assert out.returncode == 0 and out.stdout == "started\n", out.stderr
    secrets = tmp_path / "data" / "secrets"
    for name, content in (("root.key", b"k" * 32), ("triton-internal-key", b"s3cret\n")):
        assert (secrets / name).read_bytes() == content
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700

    (tmp_path / "run" / "triton_internal_key").write_text("rotated\n")   # may change
    (tmp_path / "run" / "seekgate_kek").chmod(0o644)
    (tmp_path / "run" / "seekgate_kek").write_bytes(b"x" * 32)           # must not
    out = _entrypoint(tmp_path, "true")
    assert out.returncode != 0 and "refusing to replace" in out.stderr
    assert (secrets / "root.key").read_bytes() == b"k" * 32


def test_entrypoint_refuses_to_copy_the_kek_to_disk(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "seekgate_kek").write_bytes(b"k" * 32)
    out = _entrypoint(tmp_path, "true", secrets_fs="ext4")
    assert out.returncode != 0 and "refusing to copy the key-encryption key to disk" in out.stderr
    assert not (tmp_path / "data" / "secrets" / "root.key").exists()


def test_entrypoint_without_mounted_secrets_just_runs(tmp_path: Path) -> None:
    out = _entrypoint(tmp_path, "sh", "-c", "echo ok")
    assert out.returncode == 0 and out.stdout == "ok\n"
    assert not any((tmp_path / "data" / "secrets").iterdir())   # the file KEK makes its own root


# ------------------------------------------------------------------ kubernetes

def _containers() -> dict[str, dict[str, Any]]:
    """Every container of the pod: seekgate, and its init containers and native sidecars."""
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"] + pod.get("initContainers", [])}


def test_k8s_pod_triton_on_loopback_seekgate_sidecar() -> None:
    c = _containers()
    assert set(c) == {"triton", "seekgate", "fluent-bit", "prepare-data"}
    assert [x["name"] for x in k8s("Deployment")["spec"]["template"]["spec"]["containers"]] == ["seekgate"]
    triton_env = {e["name"]: e["value"] for e in c["triton"]["env"]}
    assert triton_env["TRITON_BIND_ADDRESS"] == "127.0.0.1"
    # Only the metrics port is declared; the inference ports are not reachable from outside the pod.
    assert [p["containerPort"] for p in c["triton"]["ports"]] == [int(triton_env["TRITON_METRICS_PORT"])]
    assert c["triton"]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for name, container in c.items():
        assert image_pinned(container["image"]), name


def test_k8s_seekgate_non_root_read_only_and_ready_through_itself() -> None:
    sg = _containers()["seekgate"]
    sc = sg["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    ports = {p["name"]: p["containerPort"] for p in sg["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "status": 8101}
    # Ready: the whole path, through seekgate to Triton (the status listener's readiness is the client port's).
    assert sg["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "status", "scheme": "HTTP"}
    assert "startupProbe" in _containers()["triton"] and "livenessProbe" in _containers()["triton"]


PROBE_SCRIPT = "/usr/local/bin/seekgate-probe"   # deploy/docker/seekgate_probe.py in the image


def _probe_url(command: list[str]) -> str:
    """The URL a probe command opens: seekgate-probe's first argument, or a `python -c "...urlopen('URL'...)"`'s."""
    if command[:2] == ["python", PROBE_SCRIPT]:
        return command[2]
    assert command[:2] == ["python", "-c"], command
    m = re.search(r"urlopen\('([^']+)'", command[2])
    assert m, command
    return m.group(1)


def _seekgate_local_checks() -> dict[str, list[str]]:
    """Every command that decides whether the seekgate container is marked unhealthy (Docker's checks)."""
    dockerfile = DOCKERFILES["seekgate.Dockerfile"]
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", dockerfile, re.M | re.S)
    assert healthcheck, "seekgate.Dockerfile has no HEALTHCHECK"
    compose = SERVICES["seekgate"]["healthcheck"]["test"]
    assert compose[0] == "CMD"
    return {"compose healthcheck": compose[1:], "Dockerfile HEALTHCHECK": json.loads(healthcheck.group(1))}


def _k8s_restart_probes() -> dict[str, dict[str, Any]]:
    """The kubelet's probes that restart the seekgate container: its httpGet, on the status listener."""
    sg = _containers()["seekgate"]
    return {name: sg[name]["httpGet"] for name in ("livenessProbe", "startupProbe")}


def _k8s_settings(tmp_path: Path, image_env: dict[str, str]) -> Any:
    (tmp_path / "seekgate.yaml").write_text(k8s("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"])
    k8s_env = {e["name"]: e["value"] for e in _containers()["seekgate"]["env"]}
    return load_settings(tmp_path / "seekgate.yaml", env={**image_env, **k8s_env})


def test_seekgate_liveness_does_not_depend_on_triton(tmp_path: Path) -> None:
    # A liveness or startup probe through seekgate's client port's /v2/health/* is forwarded to
    # Triton: a dead Triton would restart seekgate too. Docker's checks ask seekgate's metrics port,
    # the one its settings give in each deployment; the kubelet's the status listener's
    # /v2/health/live, which seekgate answers itself.
    from proxy.settings import status_address
    image_env = dict(re.findall(r"(SEEKGATE_\w+)=(\S+)", DOCKERFILES["seekgate.Dockerfile"]))
    compose_env = {k: interpolate(v) for k, v in env_of(SERVICES["seekgate"]).items()}
    image_port = load_settings(REPO / "config" / "seekgate.yaml", env=image_env).server.metrics_port
    compose_port = load_settings(REPO / "config" / "seekgate.yaml", env={**image_env, **compose_env}).server.metrics_port
    expected = {"compose healthcheck": compose_port, "Dockerfile HEALTHCHECK": image_port}
    for where, command in _seekgate_local_checks().items():
        url = urlsplit(_probe_url(command))
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", expected[where], "/metrics"), where
    status = status_address(_k8s_settings(tmp_path, image_env).server)
    assert status is not None
    ports = {p["name"]: p["containerPort"] for p in _containers()["seekgate"]["ports"]}
    for where, get in _k8s_restart_probes().items():
        assert (ports[get["port"]], get["path"]) == (status[1], "/v2/health/live"), where


def test_seekgate_local_checks_pass_with_triton_dead_and_fail_with_seekgate_down(tmp_path: Path) -> None:
    # Each check command, run for real against a real seekgate whose Triton is unreachable.
    dead_triton = free_ports(1)[0]   # nothing listens there
    certs = make_dev_certs(tmp_path / "certs")
    # TLS on, as every shipped deployment serves it (the checks below speak https).
    status_port = free_ports(1)[0]   # the pod's status listener, its host kept, on a free port
    pod_status = _k8s_settings(tmp_path, {}).server.status_listen
    gw = Gateway(tmp_path, f"http://127.0.0.1:{dead_triton}", free_ports(3),
                 **{"server.tls_cert_file": str(certs["server_cert"]), "server.tls_key_file": str(certs["server_key"]),
                    "server.status_listen": f"{pod_status.rpartition(':')[0]}:{status_port}"})
    port = int(gw.metrics_url.split(":")[2].split("/")[0])
    here = {"python": sys.executable, PROBE_SCRIPT: str(REPO / "deploy" / "docker" / "seekgate_probe.py")}
    checks = {where: [here.get(a, a.replace("127.0.0.1:8002/", f"127.0.0.1:{port}/")) for a in c]
              for where, c in _seekgate_local_checks().items()}
    gw.start()
    try:
        # Readiness through seekgate does fail: the pod leaves the Service, seekgate stays up.
        trust = ssl.create_default_context(cafile=str(certs["ca"]))
        assert call_status(gw.url.replace("http://", "https://") + "/v2/health/ready", trust) >= 400
        for where, command in checks.items():
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, (where, out.stderr)
        for where, get in _k8s_restart_probes().items():   # as the kubelet asks: plain HTTP, no certificate
            assert call_status(f"http://127.0.0.1:{status_port}{get['path']}") == 200, where
    finally:
        gw.stop()
    for where, command in checks.items():
        assert subprocess.run(command, capture_output=True, timeout=30).returncode != 0, where
    for get in _k8s_restart_probes().values():
        with pytest.raises(OSError):
            call_status(f"http://127.0.0.1:{status_port}{get['path']}")


def test_k8s_service_exposes_only_seekgate() -> None:
    svc = k8s("Service")
    assert svc["spec"]["selector"] == k8s("Deployment")["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http", "grpc"}
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 8001}


def test_k8s_secrets_are_referenced_never_inlined() -> None:
    assert not [d for d in K8S if d["kind"] == "Secret"]
    volumes = {v["name"]: v for v in k8s("Deployment")["spec"]["template"]["spec"]["volumes"]}
    names = {s["secret"]["name"] for s in volumes["seekgate-secret-mount"]["projected"]["sources"]}
    # The last for mTLS only, optional: the clients' CA (the probes need no certificate: the status listener).
    assert names == {"seekgate-kek", "seekgate-triton-internal", "seekgate-tls", "seekgate-client-ca"}
    assert volumes["triton-secret"]["secret"]["secretName"] == "seekgate-triton-internal"
    assert volumes["elasticsearch-secret"]["secret"]["secretName"] == "seekgate-elasticsearch"
    for container in _containers().values():
        for e in container.get("env", []):
            assert not SECRETISH.search(e["name"]) or "valueFrom" in e or e["name"].endswith("_FILE"), e
    mounts = {m["name"]: m for m in _containers()["seekgate"]["volumeMounts"]}
    assert mounts["seekgate-secret-mount"] == {"name": "seekgate-secret-mount", "mountPath": "/run/secrets",
                                               "readOnly": True}


def test_k8s_configmaps_are_valid_config_and_policy(tmp_path: Path) -> None:
    config = k8s("ConfigMap", "seekgate-config")["data"]["seekgate.yaml"]
    (tmp_path / "seekgate.yaml").write_text(config)
    load_settings(tmp_path / "seekgate.yaml", env={})   # raises SettingsError on any bad field
    policies = tmp_path / "policies"
    policies.mkdir()
    for name, text in k8s("ConfigMap", "seekgate-policies")["data"].items():
        (policies / name).write_text(text)
    assert check_policy_dir(policies) == []
    assert set(k8s("ConfigMap", "seekgate-policies")["data"]) == {p.name for p in (REPO / "policies").glob("*.yaml")}


def test_k8s_prometheus_adapter_serves_queue_time_for_a_future_hpa() -> None:
    # No HPA ships (one replica: tests/test_deploy_manifests.py); the adapter rule a future one
    # reads scales on Triton's queue time, not GPU utilisation.
    assert not [d for d in K8S if d["kind"] == "HorizontalPodAutoscaler"]
    adapter = yaml.safe_load(k8s("ConfigMap", "prometheus-adapter-seekgate")["data"]["config.yaml"])
    [rule] = adapter["rules"]
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    # The PodMonitor gives Triton's series the job label the adapter and the alerts select on.
    monitor = k8s("PodMonitor")["spec"]["podMetricsEndpoints"]
    jobs = {e["port"]: e["relabelings"][0]["replacement"] for e in monitor}
    assert jobs == {"metrics": "seekgate", "triton-metrics": "triton", "fluent-bit": "fluent-bit"}


def test_kustomization_lists_every_manifest_but_the_adapters() -> None:
    kust = yaml.safe_load((REPO / "deploy/k8s/kustomization.yaml").read_text())
    files = {p.name for p in (REPO / "deploy/k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - {"prometheus-adapter.yaml"}


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("kubectl")
    assert binary, "kubectl missing: scripts/system-packages installs Debian's kubernetes-client"
    # No cluster here: an empty kubeconfig makes sure nothing tries to reach one.
    return subprocess.run([binary, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KUBECONFIG": os.devnull})


def test_kubectl_kustomize_builds_what_the_files_say() -> None:
    # `kubectl apply -k deploy/k8s` renders this first; --dry-run would need a cluster.
    out = kubectl("kustomize", "deploy/k8s")
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    resources = yaml.safe_load((REPO / "deploy/k8s/kustomization.yaml").read_text())["resources"]
    listed = [d for f in resources for d in yaml.safe_load_all((REPO / "deploy/k8s" / f).read_text()) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in listed)
    deployment = next(d for d in built if d["kind"] == "Deployment")
    assert deployment["metadata"].pop("namespace") == "seekgate"   # kustomization's namespace
    assert deployment == k8s("Deployment")


def test_kubectl_kustomize_fails_on_a_broken_kustomization(tmp_path: Path) -> None:
    shutil.copytree(REPO / "deploy/k8s", tmp_path / "k8s")
    (tmp_path / "k8s" / "service.yaml").unlink()
    out = kubectl("kustomize", str(tmp_path / "k8s"))
    assert out.returncode != 0 and "service.yaml" in out.stderr


@pytest.mark.parametrize("path", ["docker-compose.yml", ".env.example", ".dockerignore"])
def test_repo_root_files_exist(path: str) -> None:
    assert (REPO / path).read_text().strip()
