"""Conformance: Triton's answers, errors included, reach the client through seekgate exactly as Triton sent them.

Each case is sent to the real Triton directly and through seekgate (with a key added); status, Content-Type
and body must be identical, over HTTP (generate, generate_stream's SSE, infer) and gRPC (unary and stream:
codes, messages and every response). The model is tests/models/conform: the generate extension's schema
errors, bytes arrays, parameters and an error in the middle of a stream, the way Triton's examples use them.
Requests seekgate refuses itself (no key, body_view's ambiguous JSON) are not in this set: those are
seekgate's own answers, with their own shape.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from proxy.local.triton import TritonProcess, free_ports
from tests.gateway import Gateway, audit_records, wait_for

GENERATE = "/v2/models/conform/generate"
STREAM = "/v2/models/conform/generate_stream"

# (route, body): each answered by Triton itself, success or error.
HTTP_CASES: list[tuple[str, Any]] = [
    (GENERATE, {"text_input": "hello"}),
    (GENERATE, {"text_input": "hello", "temperature": 0.5, "stop": ["x"]}),   # parameters reach the model
    (GENERATE, {}),                                                          # required input missing
    (GENERATE, {"text_input": 5}),                                           # not a string for BYTES
    (GENERATE, {"text_input": ["a", "b"]}),                                  # a bytes array of the wrong shape
    (GENERATE, {"text_input": [1, 2]}),                                      # a bytes array of non-strings
    (GENERATE, {"text_input": "hello", "count": "three"}),                   # wrong type for INT32
    (GENERATE, {"text_input": "model-error"}),                               # the model refuses
    (GENERATE, {"text_input": "model-busy"}),                                # ... with UNAVAILABLE
    (GENERATE, {"text_input": "hello", "count": 2}),                         # two responses to generate
    ("/v2/models/missing/generate", {"text_input": "hello"}),                # unknown model
    (STREAM, {"text_input": "s", "count": 3}),
    (STREAM, {"text_input": "s", "count": 4, "fail_after": 2}),              # an error mid-stream
    (STREAM, {"text_input": "model-error"}),
    (STREAM, {"text_input": 7}),
    ("/v2/models/conform/infer", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                              "data": [3]}]}),
    ("/v2/models/conform/infer", {"inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES",
                                              "data": ["a"]}]}),
]


@pytest.fixture(scope="module")
def conform_gw(echo_triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    t = echo_triton.launch
    g = Gateway(tmp_path_factory.mktemp("gw-conform"), echo_triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{t.grpc_port}"}).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def admin_key(conform_gw: Gateway) -> str:
    # An admin key: the body allow-list (body.*) lets it set any parameter, so Triton decides every case.
    return conform_gw.key(owner="conformance", roles=("admin",))[1]


def post(port: int, path: str, body: Any, key: str | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request("POST", path, json.dumps(body).encode(), headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("path", "body"), HTTP_CASES, ids=[f"{p.rsplit('/', 1)[1]}-{json.dumps(b)[:40]}"
                                                            for p, b in HTTP_CASES])
def test_http_answer_is_triton_s_own(conform_gw: Gateway, echo_triton: TritonProcess, admin_key: str,
                                     path: str, body: Any) -> None:
    direct = post(echo_triton.launch.http_port, path, body)
    proxied = post(conform_gw.settings.server.http_port, path, body, admin_key)
    assert proxied == direct


def test_the_set_covers_successes_and_errors_of_each_kind(conform_gw: Gateway, echo_triton: TritonProcess) -> None:
    """The run is only as good as its cases: Triton's 2xx, 4xx and 5xx and a mid-stream error all occur."""
    statuses = {post(echo_triton.launch.http_port, p, b)[0] // 100 for p, b in HTTP_CASES}
    assert {2, 4}.issubset(statuses) and statuses - {2, 4}, statuses
    _, content_type, sse = post(echo_triton.launch.http_port, STREAM, {"text_input": "s", "count": 4, "fail_after": 2})
    assert content_type.startswith("text/event-stream") and b'"error"' in sse and b'\\"i\\": 1' in sse



@pytest.mark.parametrize(("path", "body"), [(STREAM, {"text_input": "s", "count": 3}),
                                           (GENERATE, {"text_input": "x" * 100_000})],   # past forward.WHOLE_LIMIT
                         ids=["sse", "large-generate"])
def test_http_1_0_answer_of_unknown_length_ends_with_its_connection(
        conform_gw: Gateway, admin_key: str, path: str, body: Any) -> None:
    """HTTP/1.0 has no chunked framing: an answer without a length ends at the close, which must come
    even when the client asked for keep-alive (else it waits for the end until the keep-alive timeout)."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", conform_gw.settings.server.http_port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer {admin_key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        answer = b""
        while chunk := sock.recv(65536):   # socket.timeout here: the connection was kept open
            answer += chunk
    head, _, got = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"content-length" not in head.lower()
    assert got == post(conform_gw.settings.server.http_port, path, body, admin_key)[2]


# ------------------------------------------------------------------ gRPC


def grpc_request(text: Any, model: str = "conform", **ints: int) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    raw = text if isinstance(text, bytes) else str(text).encode()
    req.raw_input_contents.append(len(raw).to_bytes(4, "little") + raw)
    for name, value in ints.items():
        req.inputs.add(name=name, datatype="INT32", shape=[1])
        req.raw_input_contents.append(np.array([value], dtype=np.int32).tobytes())
    del t
    return req


def unary(target: str, request: service_pb2.ModelInferRequest, key: str | None) -> tuple[str, str, bytes]:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            answer = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {key}"),) if key else (),
                                     timeout=60)
            return "OK", "", answer.SerializeToString(deterministic=True)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", b""


def stream(target: str, requests: list[service_pb2.ModelInferRequest], key: str | None) -> list[tuple[str, bytes]]:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        out: list[tuple[str, bytes]] = []
        call = stub.ModelStreamInfer(iter(requests), timeout=60,
                                     metadata=(("authorization", f"Bearer {key}"),) if key else ())
        try:
            for answer in call:
                # Triton's response ids and parameters are per call; the error message and outputs are the answer.
                out.append((answer.error_message, answer.infer_response.SerializeToString(deterministic=True)
                            if not answer.error_message else b""))
        except grpc.RpcError as exc:
            out.append((f"status {exc.code().name}: {exc.details()}", b""))
        return out


# "model-busy": Triton's own UNAVAILABLE is its answer, not a connection failure of seekgate's.
GRPC_UNARY = [grpc_request("hello"), grpc_request("model-error"), grpc_request("hello", count=2),
              service_pb2.ModelInferRequest(model_name="conform"),
              service_pb2.ModelInferRequest(model_name="missing"), grpc_request("hello", model="busy")]


@pytest.mark.parametrize("index", range(len(GRPC_UNARY)))
def test_grpc_unary_answer_is_triton_s_own(conform_gw: Gateway, echo_triton: TritonProcess, admin_key: str,
                                           index: int) -> None:
    request = GRPC_UNARY[index]
    direct = unary(f"127.0.0.1:{echo_triton.launch.grpc_port}", request, None)
    proxied = unary(f"127.0.0.1:{conform_gw.settings.server.grpc_port}", request, admin_key)
    assert proxied == direct


@pytest.mark.parametrize("requests", [
    [grpc_request("s", count=3)],
    [grpc_request("s", count=4, fail_after=2)],
    [grpc_request("model-error"), grpc_request("after")],
    [service_pb2.ModelInferRequest(model_name="conform")],
], ids=["three", "error-mid-stream", "model-error-then-more", "schema-error"])
def test_grpc_stream_answers_are_triton_s_own(conform_gw: Gateway, echo_triton: TritonProcess, admin_key: str,
                                              requests: list[service_pb2.ModelInferRequest]) -> None:
    direct = stream(f"127.0.0.1:{echo_triton.launch.grpc_port}", requests, None)
    proxied = stream(f"127.0.0.1:{conform_gw.settings.server.grpc_port}", requests, admin_key)
    assert proxied == direct and direct


def test_tritonclient_grpc_stream_sees_the_mid_stream_error(conform_gw: Gateway, admin_key: str) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{conform_gw.settings.server.grpc_port}")
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(lambda result, error: got.put(error or result),
                        headers={"authorization": f"Bearer {admin_key}"})
    a = grpcclient.InferInput("text_input", [1], "BYTES")
    a.set_data_from_numpy(np.array([b"s"], dtype=np.object_))
    b = grpcclient.InferInput("count", [1], "INT32")
    b.set_data_from_numpy(np.array([4], dtype=np.int32))
    c = grpcclient.InferInput("fail_after", [1], "INT32")
    c.set_data_from_numpy(np.array([2], dtype=np.int32))
    client.async_stream_infer("conform", [a, b, c])
    answers = [got.get(timeout=60) for _ in range(3)]
    client.stop_stream()
    client.close()
    assert isinstance(answers[0], grpcclient.InferResult) and isinstance(answers[1], grpcclient.InferResult)
    assert "conform: failing after 2" in str(answers[2])


def test_grpc_5xx_message_is_redacted_like_http_s_with_redact_errors(
        echo_triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> None:
    """upstream.redact_errors hides Triton's 5xx messages on the gRPC port too (same code), not on HTTP alone;
    the audit keeps Triton's message. Triton's UNAVAILABLE here: explicit load under polling (HTTP's 503)."""
    t = echo_triton.launch
    gw = Gateway(tmp_path_factory.mktemp("gw-redact"), echo_triton.http_url, free_ports(3),
                 **{"upstream.grpc_target": f"127.0.0.1:{t.grpc_port}", "upstream.redact_errors": True}).start()
    try:
        key = gw.key(owner="redact", roles=("admin",))[1]
        load = service_pb2.RepositoryModelLoadRequest(model_name="conform")
        with grpc.insecure_channel(f"127.0.0.1:{t.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as direct:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(load, timeout=60)
        assert direct.value.code() == grpc.StatusCode.UNAVAILABLE and "polling" in (direct.value.details() or "")
        with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as proxied:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                    load, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
        assert proxied.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proxied.value.details() == "inference server error"
        status, _, body = post(gw.settings.server.http_port, "/v2/repository/models/conform/load", {}, key)
        assert status == 503 and json.loads(body) == {"error": "inference server error"}
        request_id = dict(proxied.value.trailing_metadata() or ())["x-request-id"]
        assert wait_for(lambda: any(r["request_id"] == request_id and "polling" in r["reason"]
                                    for r in audit_records(gw)), 5), audit_records(gw)[-1:]
    finally:
        gw.stop()
