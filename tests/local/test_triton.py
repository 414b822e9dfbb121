"""The local Triton launcher: command line, stub environment, and one-line errors."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest

from proxy.local.triton import (
    TritonLaunch,
    TritonLaunchError,
    TritonProcess,
    build_command,
    find_install,
    prepare_backends,
    stub_environment,
)
from tests.conftest import REPO, free_ports


def launch(tmp_path: Path, checkpoint: Path | None = None, repository: Path = REPO / "triton_models",
           timeout: float = 120) -> TritonLaunch:
    http, grpc_, metrics = free_ports(3)
    return TritonLaunch(repository, tmp_path, checkpoint, http_port=http, grpc_port=grpc_, metrics_port=metrics,
                        config_name="default", startup_timeout_s=timeout)


def test_command_binds_loopback_and_locks_shared_memory(tmp_path: Path) -> None:
    install = find_install()
    cmd = build_command(launch(tmp_path), install, prepare_backends(install, tmp_path))
    assert "--http-address=127.0.0.1" in cmd and "--grpc-address=127.0.0.1" in cmd
    assert "--metrics-address=127.0.0.1" in cmd and "--model-control-mode=none" in cmd
    secret = (tmp_path / "secrets" / "triton-internal-key").read_text().strip()
    assert f"--http-restricted-api=shared-memory:seekgate-internal={secret}" in cmd
    assert (tmp_path / "secrets" / "triton-internal-key").stat().st_mode & 0o077 == 0
    stub = tmp_path / "triton" / "backends" / "python" / "triton_python_backend_stub"
    assert stub.exists()


def test_stub_environment_points_at_this_interpreter(tmp_path: Path) -> None:
    env = stub_environment(tmp_path)
    import sysconfig
    assert env["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR")
    assert sysconfig.get_paths()["purelib"] in env["PYTHONPATH"].split(":")
    assert env["SEEKGATE_CHECKPOINT"] == str(tmp_path.resolve()) and env["HF_HUB_OFFLINE"] == "1"


def test_port_already_taken_is_one_clear_line(tmp_path: Path) -> None:
    cfg = launch(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", cfg.http_port))
        s.listen()
        with pytest.raises(TritonLaunchError, match=rf"http port 127.0.0.1:{cfg.http_port} is already in use"):
            TritonProcess(cfg).start()


def test_missing_model_repository(tmp_path: Path) -> None:
    with pytest.raises(TritonLaunchError, match="no model repository"):
        TritonProcess(launch(tmp_path, repository=tmp_path / "nope")).start()


def test_model_that_fails_to_load_says_why(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(REPO / "triton_models", repo, symlinks=True)
    proc = TritonProcess(launch(tmp_path, checkpoint=tmp_path / "no-such-checkpoint"))
    proc.launch = launch(tmp_path, checkpoint=tmp_path / "no-such-checkpoint", repository=repo)
    with pytest.raises(TritonLaunchError) as info:
        with proc:
            pass
    message = str(info.value)
    assert "\n" not in message and "failed to load" in message and "no config.json" in message
    assert proc.proc is not None and proc.proc.poll() is not None


def test_missing_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytriton", None)  # import now raises ImportError
    with pytest.raises(TritonLaunchError, match=r"nvidia-pytriton is not installed: run `pip install -e '\.\[model\]'`"):
        find_install()
