"""Shared fixtures: the tiny checkpoint and a real tritonserver, started once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tinymodel import build_tiny_checkpoint
from proxy.triton import TritonLaunch, TritonProcess, free_ports

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "deepseek-tiny", seed=0)


def start_triton(data_dir: Path, checkpoint: Path, repository: Path = REPO / "triton_models") -> TritonProcess:
    http, grpc_, metrics = free_ports(3)
    launch = TritonLaunch(repository, data_dir, checkpoint, http_port=http, grpc_port=grpc_,
                          metrics_port=metrics, config_name="default", startup_timeout_s=180)
    return TritonProcess(launch).__enter__()


@pytest.fixture(scope="session")
def triton(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    proc = start_triton(tmp_path_factory.mktemp("triton-data"), tiny_checkpoint)
    yield proc
    proc.stop()
