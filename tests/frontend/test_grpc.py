"""seekgate's gRPC front end against the real Triton: forwarding, streams, refusals, health, audit."""

from __future__ import annotations

import asyncio
import queue
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from proxy.frontend.grpc import SERVING, GrpcFrontEnd, HealthCheckRequest, HealthCheckResponse
from proxy.local.triton import TritonProcess
from proxy.upstream.grpc_forward import StreamTokenCounter, client_ip, model_name_of, token_counts, upstream_metadata
from tests.conftest import free_ports
from tests.gateway import Gateway, audit_records, metric, wait_for
from tests.relay import TcpRelay

STREAM_MODEL = "deepseek_stream"


@pytest.fixture(scope="module")
def gw(triton: TritonProcess, grpc_relay: TcpRelay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("gw-grpc")
    # The Triton fixture's shared-memory key, so admin shared-memory calls can be shown to work.
    secret = triton.launch.data_dir / "secrets" / "triton-internal-key"
    (root / "data" / "secrets").mkdir(parents=True)
    shutil.copy(secret, root / "data" / "secrets" / secret.name)
    g = Gateway(root, triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{grpc_relay.port}",
                   "server.grpc_max_message_bytes": 1024 * 1024}).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def target(gw: Gateway) -> str:
    return f"127.0.0.1:{gw.settings.server.grpc_port}"


@pytest.fixture(scope="module")
def user_key(gw: Gateway) -> str:
    return gw.key(owner="alice", roles=("user",))[1]


@pytest.fixture(scope="module")
def admin_key(gw: Gateway) -> str:
    return gw.key(owner="root-ops", roles=("admin",))[1]


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def md(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def infer_inputs(module: Any, text: str, max_tokens: int) -> list[Any]:
    a = module.InferInput("text_input", [1, 1], "BYTES")
    a.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    b = module.InferInput("max_tokens", [1, 1], "INT32")
    b.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [a, b]


def infer_request(model: str, text: str = "hi", max_tokens: int = 3) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, dtype, raw in (("text_input", "BYTES", len(text.encode()).to_bytes(4, "little") + text.encode()),
                             ("max_tokens", "INT32", np.int32(max_tokens).tobytes())):
        t = req.inputs.add(name=name, datatype=dtype)
        t.shape.extend([1, 1])
        req.raw_input_contents.append(raw)
    return req


def quiet(grpc_relay: TcpRelay) -> None:
    """Lets frames of earlier calls (RST_STREAM, WINDOW_UPDATE) drain, then forgets what the relay saw."""
    before = None
    while before != (before := grpc_relay.seen()):
        time.sleep(0.2)
    grpc_relay.clear()


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ------------------------------------------------------------------ forwarding


def test_tritonclient_infer_and_metadata_same_as_direct(triton: TritonProcess, target: str, user_key: str) -> None:
    direct = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.launch.grpc_port}")
    proxied = grpcclient.InferenceServerClient(target)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", "input_tokens", "output_tokens")]
    a = proxied.infer("deepseek", infer_inputs(grpcclient, "Hello world", 5), outputs=outputs,
                      headers=bearer(user_key))
    b = direct.infer("deepseek", infer_inputs(grpcclient, "Hello world", 5), outputs=outputs)
    for name in ("text_output", "input_tokens", "output_tokens"):
        assert (a.as_numpy(name) == b.as_numpy(name)).all()
    assert a.as_numpy("output_tokens")[0, 0] == 5
    for get in ("get_model_metadata", "get_model_config"):
        assert getattr(proxied, get)("deepseek", headers=bearer(user_key), as_json=True) == \
            getattr(direct, get)("deepseek", as_json=True)
    assert proxied.get_server_metadata(headers=bearer(user_key), as_json=True) == \
        direct.get_server_metadata(as_json=True)
    assert proxied.is_model_ready("deepseek", headers=bearer(user_key))
    assert proxied.is_server_live() and proxied.is_server_ready()   # probes need no key, as over HTTP


def test_sync_stream_delivers_tokens_incrementally(target: str, user_key: str) -> None:
    client = grpcclient.InferenceServerClient(target)
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(lambda result, error: got.put((time.monotonic(), result, error)), headers=bearer(user_key))
    client.async_stream_infer(STREAM_MODEL, infer_inputs(grpcclient, "Hello world", 8))
    responses = []
    while not responses or responses[-1][1].as_numpy("output_tokens")[0, 0] < 8:
        responses.append(got.get(timeout=30))
        assert responses[-1][2] is None, responses[-1][2]
    client.stop_stream()
    assert len(responses) > 1
    counts = [r[1].as_numpy("output_tokens")[0, 0] for r in responses]
    assert counts == sorted(counts) and counts[-1] == 8


def test_aio_client_infer_metadata_and_stream(triton: TritonProcess, target: str, user_key: str) -> None:
    async def go() -> None:
        proxied = aiogrpcclient.InferenceServerClient(target)
        direct = aiogrpcclient.InferenceServerClient(f"127.0.0.1:{triton.launch.grpc_port}")
        try:
            a = await proxied.infer("deepseek", infer_inputs(aiogrpcclient, "aio", 4), headers=bearer(user_key))
            b = await direct.infer("deepseek", infer_inputs(aiogrpcclient, "aio", 4))
            assert a.as_numpy("text_output")[0, 0] == b.as_numpy("text_output")[0, 0]
            assert await proxied.get_model_metadata("deepseek", headers=bearer(user_key), as_json=True) == \
                await direct.get_model_metadata("deepseek", as_json=True)

            async def requests() -> Any:
                yield {"model_name": STREAM_MODEL, "inputs": infer_inputs(aiogrpcclient, "stream me", 6)}
            counts = []
            async for result, error in proxied.stream_infer(requests(), headers=bearer(user_key)):
                assert error is None
                counts.append(result.as_numpy("output_tokens")[0, 0])
                if counts[-1] == 6:
                    break
            assert len(counts) > 1 and counts[-1] == 6
        finally:
            await proxied.close()
            await direct.close()
    asyncio.run(go())


def test_deadline_is_propagated(stub: Any, user_key: str) -> None:
    # 60 tokens take most of a second on the tiny CPU model; a 20 ms deadline must end the call at once.
    started = time.monotonic()
    assert code_of(lambda: stub.ModelInfer(infer_request("deepseek", max_tokens=60), metadata=md(user_key),
                                           timeout=0.02)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0


def test_message_over_the_cap_is_resource_exhausted(stub: Any, user_key: str, grpc_relay: TcpRelay) -> None:
    quiet(grpc_relay)
    assert code_of(lambda: stub.ModelInfer(infer_request("deepseek", "x" * (2 * 1024 * 1024)),
                                           metadata=md(user_key))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_nothing_forwarded(grpc_relay)


# ------------------------------------------------------------------ authentication + policy


def test_unauthenticated_for_missing_invalid_and_revoked_keys(gw: Gateway, stub: Any, target: str,
                                                              user_key: str) -> None:
    key_id, revoked = gw.key(owner="bob")
    req = service_pb2.ModelMetadataRequest(name="deepseek")
    stub.ModelMetadata(req, metadata=md(revoked))
    gw.revoke(key_id)
    flipped = user_key[:-1] + ("A" if user_key[-1] != "A" else "B")
    for metadata in ((), md("not-a-key"), md(flipped), md(revoked), (("authorization", "Basic Zm9vOmJhcg=="),)):
        assert code_of(lambda metadata=metadata: stub.ModelMetadata(req, metadata=metadata)) == grpc.StatusCode.UNAUTHENTICATED
    # A stream without a key is refused before it forwards anything.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL)]), metadata=md(revoked)))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


ADMIN_CALLS: dict[str, Any] = {
    "RepositoryIndex": service_pb2.RepositoryIndexRequest(),
    "RepositoryModelUnload": service_pb2.RepositoryModelUnloadRequest(model_name="deepseek"),
    "SystemSharedMemoryStatus": service_pb2.SystemSharedMemoryStatusRequest(),
    "SystemSharedMemoryUnregister": service_pb2.SystemSharedMemoryUnregisterRequest(name="r1"),
    "CudaSharedMemoryStatus": service_pb2.CudaSharedMemoryStatusRequest(),
    "TraceSetting": service_pb2.TraceSettingRequest(),
    "LogSettings": service_pb2.LogSettingsRequest(),
    "ModelStatistics": service_pb2.ModelStatisticsRequest(name=""),
}


@pytest.mark.parametrize("method", sorted(ADMIN_CALLS))
def test_user_key_is_denied_admin_methods_and_triton_sees_nothing(stub: Any, grpc_relay: TcpRelay, user_key: str,
                                                                  method: str) -> None:
    quiet(grpc_relay)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(ADMIN_CALLS[method], metadata=md(user_key))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "forbidden by policy"
    assert_nothing_forwarded(grpc_relay)


def test_user_may_read_config_and_stats_of_a_model(stub: Any, user_key: str) -> None:
    config = stub.ModelConfig(service_pb2.ModelConfigRequest(name="deepseek"), metadata=md(user_key))
    assert config.config.name == "deepseek"
    stats = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="deepseek"), metadata=md(user_key))
    assert {s.name for s in stats.model_stats} == {"deepseek"}


def test_admin_key_passes_on_admin_methods(stub: Any, admin_key: str) -> None:
    index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=md(admin_key))
    assert {"deepseek", STREAM_MODEL} <= {m.name for m in index.models}
    # Shared memory works only with the internal key seekgate adds for authorised callers.
    stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest(), metadata=md(admin_key))
    stub.LogSettings(service_pb2.LogSettingsRequest(), metadata=md(admin_key))


def test_invalid_model_name_is_invalid_argument(stub: Any, grpc_relay: TcpRelay, user_key: str) -> None:
    quiet(grpc_relay)
    for name in ("../repository", "deep/seek", "a" * 200, ""):
        assert code_of(lambda name=name: stub.ModelInfer(infer_request(name), metadata=md(user_key))) == \
            grpc.StatusCode.INVALID_ARGUMENT, name
    assert_nothing_forwarded(grpc_relay)


def test_stream_refused_when_a_message_names_a_forbidden_model(gw: Gateway, stub: Any) -> None:
    token = gw.key(owner="dave", models=(STREAM_MODEL,))[1]
    assert code_of(lambda: list(stub.ModelStreamInfer(iter([infer_request("deepseek")]),
                                                      metadata=md(token)))) == grpc.StatusCode.PERMISSION_DENIED

    def mixed() -> Iterator[service_pb2.ModelInferRequest]:
        yield infer_request(STREAM_MODEL, max_tokens=2)
        time.sleep(0.5)
        yield infer_request("deepseek")
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.ModelStreamInfer(mixed(), metadata=md(token)):
            pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def frame_types(data: bytes) -> list[int]:
    """HTTP/2 frame types in what the relay saw (it is cleared between frames, see quiet)."""
    i, types = (24 if data.startswith(b"PRI * HTTP/2.0") else 0), []
    while i + 9 <= len(data):
        types.append(data[i + 3])
        i += 9 + int.from_bytes(data[i:i + 3], "big")
    return types


def test_client_cancelling_a_stream_cancels_the_upstream_call(gw: Gateway, stub: Any, grpc_relay: TcpRelay) -> None:
    key_id, token = gw.key(owner="frank")
    quiet(grpc_relay)
    # Triton's later responses wait in the relay: the upstream call is surely still running when the
    # client cancels (a fast model could otherwise finish all 200 tokens first, with no RST to send).
    grpc_relay.hold_after(b"text_output")
    try:
        responses = stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, max_tokens=200)]), metadata=md(token))
        assert next(responses)
        responses.cancel()
        # The event itself, not a deadline: held upstream, the call would otherwise never end. The
        # bound only limits how long a failure takes to show.
        assert grpc_relay.wait_seen(lambda seen: RST_STREAM in frame_types(seen), 60), "upstream call not cancelled"
    finally:
        grpc_relay.let_flow()
    assert wait_for(lambda: any(r["key_id"] == key_id for r in audit_records(gw)), 30.0)
    (rec,) = [r for r in audit_records(gw) if r["key_id"] == key_id]
    assert rec["http_status"] == 499 and rec["reason"] == "client_cancelled" and rec["output_tokens"] >= 1


RST_STREAM = 0x3
DATA, HEADERS = 0x0, 0x1


def assert_nothing_forwarded(grpc_relay: TcpRelay) -> None:
    """No request reached Triton: no HEADERS or DATA frame (keepalive PINGs and WINDOW_UPDATEs may)."""
    time.sleep(0.1)
    assert not {DATA, HEADERS} & set(frame_types(grpc_relay.seen()))


def test_shared_memory_in_infer_request_is_refused_for_users(stub: Any, grpc_relay: TcpRelay, user_key: str) -> None:
    req = infer_request("deepseek")
    req.inputs[0].parameters["shared_memory_region"].string_param = "stolen"
    # The request as Triton would run it: raw contents only for the inputs not in a region (with text_input's
    # left in, Triton would read max_tokens from text_input's bytes, and seekgate refuses that as malformed).
    del req.raw_input_contents[0]
    quiet(grpc_relay)
    assert code_of(lambda: stub.ModelInfer(req, metadata=md(user_key))) == grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_forwarded(grpc_relay)


def test_policy_change_applies_to_grpc_and_http_at_once(gw: Gateway, stub: Any, user_key: str) -> None:
    req = service_pb2.ModelMetadataRequest(name="deepseek")

    def both() -> tuple[int, grpc.StatusCode]:
        http = urllib.request.Request(gw.url + "/v2/models/deepseek", headers={"Authorization": f"Bearer {user_key}"})
        try:
            status = urllib.request.urlopen(http, timeout=10).status
        except urllib.error.HTTPError as e:
            status = e.code
        try:
            stub.ModelMetadata(req, metadata=md(user_key))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        return status, code

    extra = gw.policy_dir / "zz-grpc-test.yaml"
    assert both() == (200, grpc.StatusCode.OK)
    try:
        extra.write_text("rules:\n  - id: block-alice\n    effect: deny\n    subject: {owners: [alice]}\n"
                         "    resources: ['model:deepseek']\n    actions: ['*']\n")
        assert wait_for(lambda: both() == (403, grpc.StatusCode.PERMISSION_DENIED), 3.0)
    finally:
        extra.unlink()
    assert wait_for(lambda: both() == (200, grpc.StatusCode.OK), 3.0)


# ------------------------------------------------------------------ health, outage, audit


def test_health_check_reflects_triton(target: str, grpc_relay: TcpRelay, stub: Any, user_key: str) -> None:
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=HealthCheckRequest.SerializeToString,
                                    response_deserializer=HealthCheckResponse.FromString)
        assert check(HealthCheckRequest()).status == SERVING
        assert check(HealthCheckRequest(service="inference.GRPCInferenceService")).status == SERVING
        assert code_of(lambda: check(HealthCheckRequest(service="nope"))) == grpc.StatusCode.NOT_FOUND
        grpc_relay.block()
        try:
            assert check(HealthCheckRequest()).status != SERVING
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(infer_request("deepseek"), metadata=md(user_key))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == "inference server unavailable"   # no internal address leaks
            assert dict(info.value.trailing_metadata())["retry-after"] == "1"
            assert code_of(lambda: list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL)]),
                                                              metadata=md(user_key)))) == grpc.StatusCode.UNAVAILABLE
        finally:
            grpc_relay.block(False)
        assert wait_for(lambda: check(HealthCheckRequest()).status == SERVING, 10.0)
    stub.ModelInfer(infer_request("deepseek"), metadata=md(user_key))


def test_a_call_lost_with_its_connection_is_charged_its_bound(gw: Gateway, grpc_relay: TcpRelay, stub: Any) -> None:
    """Triton's connection cut while it had the call (it may have run it): UNAVAILABLE, charged the
    request's bound (prompt bytes + 64 + max_tokens), not nothing as a call that never left is."""
    key_id, key = gw.key(owner="cut-mid-call", limits={"daily_tokens": 100})
    tag = f"cut-{key_id}"
    hold = grpc_relay.hold_requests(tag.encode())
    try:
        with pytest.raises(grpc.RpcError) as info:
            answer = stub.ModelInfer.future(infer_request("deepseek", tag, 8), metadata=md(key), timeout=60)
            assert hold.held.wait(30), "the call never reached the relay"
            grpc_relay.block()
            answer.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        grpc_relay.block(False)
        hold.release()
    assert wait_for(lambda: any(r["key_id"] == key_id for r in audit_records(gw)), 5.0)
    rec = next(r for r in audit_records(gw) if r["key_id"] == key_id)
    assert rec["http_status"] == 503 and rec["upstream_ms"] is None
    # ~100 charged (its bound); without the charge these 30 tokens would fit the day's 100.
    with pytest.raises(grpc.RpcError) as over:
        stub.ModelInfer(infer_request("deepseek", "after", 30), metadata=md(key))
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_audit_records_for_grpc_calls_with_token_counts(gw: Gateway, stub: Any) -> None:
    key_id, token = gw.key(owner="erin")
    response, call = stub.ModelInfer.with_call(infer_request("deepseek", max_tokens=7), metadata=md(token))
    request_id = dict(call.trailing_metadata() or ()).get("x-request-id")
    assert token_counts(response)[1] == 7
    streamed = list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, max_tokens=5),
                                                infer_request(STREAM_MODEL, max_tokens=4)]), metadata=md(token)))
    assert len(streamed) > 2
    code_of(lambda: stub.LogSettings(service_pb2.LogSettingsRequest(), metadata=md(token)))
    code_of(lambda: stub.ModelConfig(service_pb2.ModelConfigRequest(name="deepseek")))

    def mine() -> list[dict[str, Any]]:
        return [r for r in audit_records(gw) if r["key_id"] == key_id]
    def anonymous() -> list[dict[str, Any]]:
        return [r for r in audit_records(gw) if r["path"].endswith("/ModelConfig") and r["http_status"] == 401]
    assert wait_for(lambda: len(mine()) == 3 and anonymous(), 3.0)
    assert metric(gw, "seekgate_requests_total", protocol="grpc", model="deepseek", action="infer") >= 1
    assert metric(gw, "seekgate_tokens_total", model="deepseek_stream", direction="output") >= 9
    infer, stream, denied = sorted(mine(), key=lambda r: r["timestamp"])
    assert all(r["protocol"] == "grpc" for r in (infer, stream, denied))
    assert infer["path"] == "/inference.GRPCInferenceService/ModelInfer" and infer["http_status"] == 200
    assert infer["request_id"] == request_id or request_id is None
    assert infer["output_tokens"] == 7 and infer["input_tokens"] > 0 and infer["upstream_ms"] > 0
    assert stream["path"].endswith("/ModelStreamInfer") and stream["output_tokens"] == 9
    assert stream["model"] == STREAM_MODEL and stream["status"] == "allowed"
    assert denied["status"] == "denied" and denied["http_status"] == 403 and denied["resource"] == "logging"
    anon = anonymous()
    assert anon[-1]["reason"] == "missing_credentials" and anon[-1]["protocol"] == "grpc"


# ------------------------------------------------------------------ helpers, no server


def test_upstream_metadata_drops_credentials_and_identities() -> None:
    kept = upstream_metadata([("authorization", "Bearer x"), ("x-seekgate-owner", "root"), ("x-forwarded-for", "1"),
                              ("triton-grpc-protocol-seekgate-internal", "k"), ("seekgate-internal", "k"),
                              ("user-agent", "u"), ("x-real-ip", "6.6.6.6"), ("true-client-ip", "6.6.6.6"),
                              ("triton_grpc_error", "true"), ("trace-bin", b"\x00")])
    assert kept == [("triton_grpc_error", "true"), ("trace-bin", b"\x00")]


def test_request_fields_and_peer_parsing() -> None:
    assert model_name_of("ModelConfig", service_pb2.ModelConfigRequest(name="m")) == "m"
    assert model_name_of("ModelInfer", service_pb2.ModelInferRequest(model_name="m")) == "m"
    assert model_name_of("SystemSharedMemoryStatus", service_pb2.SystemSharedMemoryStatusRequest(name="r")) == ""
    assert client_ip("ipv4:10.1.2.3:5555") == "10.1.2.3" and client_ip("ipv6:[::1]:80") == "::1"
    assert client_ip("ipv6:%5B2001:db8::7%5D:80") == "2001:db8::7"   # grpc's own spelling
    assert client_ip("unix:/tmp/s") == ""


def test_the_grpc_listener_binds_an_ipv6_host(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> None:
    """server.host "::1" (or "::", dual stack): grpc needs the literal in brackets, else the port fails to bind."""
    g = Gateway(tmp_path_factory.mktemp("gw-grpc-v6-bind"), triton.http_url, free_ports(3),
                **{"server.host": "::1", "upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"}).start()
    try:
        _, key = g.key(owner="v6-bind")
        with grpc.insecure_channel(f"[::1]:{g.settings.server.grpc_port}") as channel:
            ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                service_pb2.ModelReadyRequest(name="deepseek"), metadata=md(key), timeout=30)
        assert ready.ready
    finally:
        g.stop()


def test_an_ipv6_client_s_address_is_read_as_grpc_spells_it(triton: TritonProcess,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """grpc reports an IPv6 peer percent-encoded ("ipv6:%5B::1%5D:port"): the address read as "%5B::1%5D"
    matched no CIDR, so a key bound to the client's network was refused (and a policy's client_ips rule, deny
    included, never applied); the audit record named no address."""
    g = Gateway(tmp_path_factory.mktemp("gw-grpc-v6"), triton.http_url, free_ports(3),
                **{"server.host": "::1", "upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"}).start()
    try:
        _, key = g.key(owner="v6", allowed_cidrs=("::1/128",))
        with grpc.insecure_channel(f"[::1]:{g.settings.server.grpc_port}") as channel:
            ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                service_pb2.ModelReadyRequest(name="deepseek"), metadata=md(key), timeout=30)
        assert ready.ready
        assert wait_for(lambda: any(r.get("actor") == "v6" for r in audit_records(g)), 10)
        assert [r["client_ip"] for r in audit_records(g) if r.get("actor") == "v6"] == ["::1"]
    finally:
        g.stop()


def test_stream_token_counter_sums_requests() -> None:
    def response(rid: str, out: int, final: bool) -> bytes:
        r = service_pb2.ModelStreamInferResponse()
        r.infer_response.id = rid
        for name, value in (("input_tokens", 3), ("output_tokens", out)):
            t = r.infer_response.outputs.add(name=name, datatype="INT32")
            t.contents.int_contents.append(value)
        r.infer_response.parameters["triton_final_response"].bool_param = final
        return r.SerializeToString()
    counter = StreamTokenCounter()
    for raw in (response("", 1, False), response("", 2, True), response("", 1, False), response("", 4, True)):
        counter.feed(raw)
    assert counter.totals() == (6, 6)
    assert StreamTokenCounter().totals() == (None, None)
    # Each request ends in a final response or an error (Triton's own refusals carry no final flag, the
    # model's do): fewer than were sent means a stream was cut short, and is metered at its bound.
    assert counter.answered == 2
    refused = service_pb2.ModelStreamInferResponse(error_message="unexpected inference input 'x'")
    refused.infer_response.id = "r"
    failed = service_pb2.ModelStreamInferResponse.FromString(response("f", 0, True))
    failed.error_message = "max_tokens must be at least 1"
    for raw in (refused.SerializeToString(), failed.SerializeToString()):
        counter.feed(raw)
    assert counter.answered == 4


def test_tritonclient_error_surface(target: str) -> None:
    # What tritonclient users see for a refusal: the status name and our public message only.
    with pytest.raises(InferenceServerException) as info:
        grpcclient.InferenceServerClient(target).get_model_metadata("deepseek")
    assert "UNAUTHENTICATED" in str(info.value.status()) and "invalid or missing credentials" in str(info.value)


def test_an_unexpected_exception_is_an_audited_internal_with_the_request_id(
        gw: Gateway, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.frontend import grpc as grpc_front
    key_id, key = gw.key(owner="bug", roles=("user",))

    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug in a step")
    monkeypatch.setattr(grpc_front, "check_body", broken)
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer_request("deepseek"), metadata=md(key))
    assert info.value.code() == grpc.StatusCode.INTERNAL and info.value.details() == "internal error"
    rid = dict(info.value.trailing_metadata())["x-request-id"]
    assert wait_for(lambda: any(r["request_id"] == rid for r in audit_records(gw)), 5.0)
    rec = next(r for r in audit_records(gw) if r["request_id"] == rid)
    assert (rec["key_id"], rec["status"], rec["http_status"], rec["reason"]) == (
        key_id, "error", 500, "internal_error: RuntimeError")


class _ReadyChannel:
    """A channel that still reads READY: the state a cut connection's call can fail under, on a busy machine."""

    def get_state(self) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY


@pytest.mark.parametrize(("details", "triton"), [
    ("Stream removed (Socket closed)", False),          # the relay's cut, as grpc core words it
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused", False),
    ("model busy: queue full, retry later", True),      # a model's own UNAVAILABLE (tests/models/busy)
])
def test_a_failure_grpc_core_names_is_the_transports_whatever_the_channel_says(details: str, triton: bool) -> None:
    front = GrpcFrontEnd.__new__(GrpcFrontEnd)
    front.channel = _ReadyChannel()   # type: ignore[assignment]
    exc = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    assert front._triton_answered(exc.details()) is triton


def test_a_streams_generation_is_upstream_time_not_seekgates_overhead(gw: Gateway, stub: Any,
                                                                     grpc_relay: TcpRelay) -> None:
    """Triton's responses after the first are held for 1 s: that second is Triton's (upstream_ms), not
    seekgate_overhead_seconds; it was, as upstream time ended at Triton's first response."""
    key_id, token = gw.key(owner="timed-stream")
    overhead = metric(gw, "seekgate_overhead_seconds_sum", protocol="grpc")
    grpc_relay.hold_after(b"text_output")
    threading.Timer(1.0, grpc_relay.let_flow).start()
    assert list(stub.ModelStreamInfer(iter([infer_request(STREAM_MODEL, max_tokens=6)]), metadata=md(token)))
    assert wait_for(lambda: any(r["key_id"] == key_id for r in audit_records(gw)), 30.0)
    (rec,) = [r for r in audit_records(gw) if r["key_id"] == key_id]
    assert rec["upstream_ms"] >= 800 and rec["duration_ms"] - rec["upstream_ms"] < 500
    assert wait_for(lambda: metric(gw, "seekgate_overhead_seconds_sum", protocol="grpc") > overhead, 5.0)
    assert metric(gw, "seekgate_overhead_seconds_sum", protocol="grpc") - overhead < 0.5
