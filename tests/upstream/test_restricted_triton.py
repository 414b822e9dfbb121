"""A Triton whose every API but health is restricted to seekgate's header: seekgate alone reaches it.

deploy/ restricts Triton's categories so that a second process in the pod gets nothing on
loopback; that holds only if every request seekgate forwards carries the header (UpstreamPool's
own headers, the gRPC metadata), and a client can never send it itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from proxy.local.triton import INTERNAL_HEADER, TritonLaunch, TritonProcess, free_ports, internal_key
from tests.conftest import REPO
from tests.frontend.test_http import call
from tests.gateway import Gateway, metric

CATEGORIES = "inference,metadata,model-config,model-repository,statistics,trace,logging"
INFER = b'{"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}]}'


@pytest.fixture(scope="module")
def locked_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    data_dir = tmp_path_factory.mktemp("locked-triton")
    key = internal_key(data_dir)
    http, grpc_, metrics = free_ports(3)
    launch = TritonLaunch(REPO / "tests" / "models", data_dir, None, http_port=http, grpc_port=grpc_,
                          metrics_port=metrics, config_name="default", startup_timeout_s=120,
                          extra_args=(f"--http-restricted-api={CATEGORIES}:{INTERNAL_HEADER}={key}",
                                      f"--grpc-restricted-protocol={CATEGORIES}:{INTERNAL_HEADER}={key}"))
    proc = TritonProcess(launch).__enter__()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(locked_triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("locked-gw"), locked_triton.http_url, free_ports(3),
                triton_data_dir=locked_triton.launch.data_dir,
                **{"upstream.grpc_target": f"127.0.0.1:{locked_triton.launch.grpc_port}"}).start()
    yield g
    g.stop()


def test_triton_refuses_everyone_but_seekgate(locked_triton: TritonProcess, gw: Gateway) -> None:
    # Straight to Triton, as a second process in the pod would: refused, over HTTP and gRPC.
    assert call(locked_triton.http_url + "/v2/models/echo/infer", "POST", INFER)[0] == 403
    with grpc.insecure_channel(f"127.0.0.1:{locked_triton.launch.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                service_pb2.ModelMetadataRequest(name="echo"), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "restricted" in str(info.value.details()), info.value
    assert call(locked_triton.http_url + "/v2/health/ready")[0] == 200   # health stays open for probes
    # Through seekgate, with a key: served.
    key = gw.key(owner="locked", roles=("user",))[1]
    status, _, raw = call(gw.url + "/v2/models/echo/infer", "POST", INFER, key)
    assert status == 200, raw
    assert call(gw.url + "/v2/models/echo", key=key)[0] == 200   # metadata
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            service_pb2.ModelMetadataRequest(name="echo"), metadata=(("authorization", f"Bearer {key}"),),
            timeout=30)
    assert answer.name == "echo"
    # The repository index (model-repository category) is read with the header too: echo is labelled.
    assert metric(gw, "seekgate_requests_total", model="echo") >= 1


def test_a_client_cannot_send_the_header_itself(locked_triton: TritonProcess, gw: Gateway) -> None:
    key = gw.key(owner="forger", roles=("user",))[1]
    # A guessed value would be dropped by seekgate before Triton, and seekgate's own one sent instead:
    # the request is served because of seekgate's header, never a client's.
    status, _, _ = call(gw.url + "/v2/models/echo/infer", "POST", INFER, key, {INTERNAL_HEADER: "guess"})
    assert status == 200
    assert call(locked_triton.http_url + "/v2/models/echo/infer", "POST", INFER,
                headers={INTERNAL_HEADER: "guess"})[0] == 403
