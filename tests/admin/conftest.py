"""The admin API modules' seekgate: one per module, in front of conftest's recording relay, and an admin key.

A module that needs another gateway (test_keys, test_sessions) defines its own `gw`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway import Gateway, gateway_via
from tests.relay import TcpRelay


@pytest.fixture(scope="module")
def gw(request: pytest.FixtureRequest, relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway_via(tmp_path_factory.mktemp(f"gw-{request.module.__name__.rsplit('.', 1)[-1]}"), relay) as g:
        yield g


@pytest.fixture(scope="module")
def admin(gw: Gateway) -> str:
    return gw.key(owner="ops", roles=("admin",))[1]
