"""Shared fixtures: the tiny checkpoint, a real tritonserver started once per test session, and relays to it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.local.tinymodel import build_tiny_checkpoint
from proxy.local.triton import TritonLaunch, TritonProcess, free_ports
from tests.backends import admin_url_or_private, create_database, drop_database, redis_url_or_private
from tests.relay import TcpRelay, relays_to

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


@pytest.fixture(scope="session")
def echo_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """A real tritonserver serving tests/models (echo, echo_stream): each answers with the parameters and
    inputs Triton handed the model, so a test sees what Triton made of a request body."""
    http, grpc_, metrics = free_ports(3)
    launch = TritonLaunch(REPO / "tests" / "models", tmp_path_factory.mktemp("echo-triton"), None, http_port=http,
                          grpc_port=grpc_, metrics_port=metrics, config_name="default", startup_timeout_s=120)
    proc = TritonProcess(launch).__enter__()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def relays(triton: TritonProcess) -> Iterator[tuple[TcpRelay, ...]]:
    """Recording relays to Triton's HTTP and gRPC ports, one pair per test module (a module may use its own)."""
    with relays_to(triton.launch.http_port, triton.launch.grpc_port) as pair:
        yield pair


@pytest.fixture(scope="module")
def relay(relays: tuple[TcpRelay, ...]) -> TcpRelay:
    """The pair's HTTP relay; a module with a relay of its own defines its own `relay`."""
    return relays[0]


@pytest.fixture(scope="module")
def grpc_relay(relays: tuple[TcpRelay, ...]) -> TcpRelay:
    """The pair's gRPC relay: what seekgate forwarded to Triton's gRPC port."""
    return relays[1]


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A PostgreSQL server tests may create databases on: the running one, else a private one (tests/backends.py)."""
    url, private = admin_url_or_private()
    yield url
    if private is not None:
        private.destroy()


@pytest.fixture
def pg_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped after it."""
    url = asyncio.run(create_database(postgres_admin_url))
    yield url
    asyncio.run(drop_database(postgres_admin_url, url))


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """A Redis tests may write under their own key prefix: the running one, else a private one (tests/backends.py)."""
    url, private = redis_url_or_private()
    yield url
    if private is not None:
        private.destroy()


@pytest.fixture
def redis_prefix() -> str:
    """A fresh key prefix for one test, so tests sharing the server never see each other's counters."""
    return f"seekgate-test:{secrets.token_hex(6)}:"
