"""Policy scanners over the deployment files: checkov on the rendered Kubernetes set and the Dockerfiles, kubernetes-validate --strict.

Both run offline from .venv-scan (scripts/bootstrap): kubernetes-validate ships its schemas,
checkov runs with --skip-download. Every deliberate exception is a skip written in the file it
concerns, with its reason; a failed check fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

SCAN_BIN = REPO / ".venv-scan" / "bin"
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("*.Dockerfile"))
# Native sidecars (initContainers with restartPolicy Always) need 1.29; the newest schema too.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# Custom resources kubernetes-validate has no schema for: checked by tests/test_deploy_manifests.py.
CRD_KINDS = {"PodMonitor", "PrometheusRule"}


def tool(name: str) -> str:
    path = SCAN_BIN / name
    assert path.exists(), f"{path} missing: scripts/bootstrap installs deploy/scan-requirements.txt into .venv-scan"
    return str(path)


# The single-node base and the three-replica overlay: both scanned the same way.
@pytest.fixture(scope="module", params=["deploy/k8s", "deploy/k8s-ha"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl missing: scripts/system-packages installs Debian's kubernetes-client"
    out = subprocess.run([kubectl, "kustomize", request.param], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "KUBECONFIG": os.devnull})
    assert out.returncode == 0, out.stderr
    path = tmp_path_factory.mktemp("k8s") / "rendered.yaml"
    path.write_text(out.stdout)
    return path


def checkov(*args: str) -> dict[str, Any]:
    out = subprocess.run([tool("checkov"), "--skip-download", "--compact", "-o", "json", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    # checkov prints one report, or a list of them (one per framework); a crash prints none.
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"checkov gave no report (rc {out.returncode}): {out.stderr[-3000:]}") from None
    reports = report if isinstance(report, list) else [report]
    merged: dict[str, Any] = {"passed": [], "failed": [], "skipped": []}
    for r in reports:
        results = r.get("results", {})
        merged["passed"] += results.get("passed_checks", [])
        merged["failed"] += results.get("failed_checks", [])
        merged["skipped"] += results.get("skipped_checks", [])
    return merged


def _failures(report: dict[str, Any]) -> list[str]:
    return [f"{c['check_id']} {c['check_name']}: {c.get('resource')} ({c.get('file_path')})" for c in report["failed"]]


def test_checkov_kubernetes_no_failed_check(rendered: Path) -> None:
    report = checkov("--framework", "kubernetes", "-f", str(rendered))
    assert not report["failed"], "\n".join(_failures(report))
    assert len(report["passed"]) >= 80, len(report["passed"])   # it did scan the pod, not an empty file
    # Every exception is a skip with a reason, in the manifest it concerns.
    for skip in report["skipped"]:
        assert len(skip.get("check_result", {}).get("suppress_comment", "")) > 40, skip["check_id"]


def test_checkov_dockerfiles_no_failed_check() -> None:
    report = checkov("--framework", "dockerfile", *[a for p in DOCKERFILES for a in ("-f", str(p))])
    assert not report["failed"], "\n".join(_failures(report))
    scanned = {Path(c["file_path"]).name for c in report["passed"]}
    assert scanned == {p.name for p in DOCKERFILES}, scanned
    ids = {c["check_id"] for c in report["passed"]}
    assert {"CKV_DOCKER_2", "CKV_DOCKER_3"} <= ids   # HEALTHCHECK and USER, in both


def test_checkov_catches_a_root_container(rendered: Path, tmp_path: Path) -> None:
    # The scan can fail: the same set with a privileged, root Triton does.
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    triton = next(c for c in pod["initContainers"] if c["name"] == "triton")
    triton["securityContext"] = {"privileged": True, "runAsUser": 0}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    failed = {c["check_id"] for c in checkov("--framework", "kubernetes", "-f", str(bad))["failed"]}
    assert {"CKV_K8S_16", "CKV_K8S_20"} <= failed, failed


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(rendered: Path, version: str) -> None:
    out = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", version, str(rendered)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    validated = {line.split("resource ", 1)[1].split("/")[0] for line in out.stdout.splitlines()
                 if line.startswith("INFO") and " passed for resource " in line}
    kinds = {d["kind"].lower() for d in yaml.safe_load_all(rendered.read_text()) if d}
    assert validated == kinds - {k.lower() for k in CRD_KINDS}, (validated, kinds)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("WARN"):
            assert any(f"kind {k} " in line for k in CRD_KINDS), line


def test_kubernetes_validate_rejects_an_unknown_field(rendered: Path, tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["runAsUser"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "runAsUser" in out.stdout + out.stderr


def test_every_named_probe_port_is_one_its_container_declares(rendered: Path) -> None:
    # Neither the API server, kubernetes-validate nor checkov checks that an httpGet probe's named port
    # exists: a misspelt one passes them all and fails the probe at the kubelet, so the pod never starts.
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    probed = set()
    for container in pod["containers"] + pod.get("initContainers", []):
        declared = {p["name"] for p in container.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container.get(kind, {}).get("httpGet")
            if get is not None and isinstance(get["port"], str):
                assert get["port"] in declared, (container["name"], kind, get["port"], declared)
                probed.add((container["name"], kind, get["port"]))
    # seekgate's three: the kubelet's, on the status listener's port (test_deploy_manifests checks the rest).
    assert {(name, kind) for name, kind, port in probed if port == "status"} == {
        ("seekgate", "startupProbe"), ("seekgate", "readinessProbe"), ("seekgate", "livenessProbe")}
