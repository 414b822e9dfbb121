"""Differential: one corpus of requests sent to the real Triton directly and through seekgate, compared byte for byte.

A client that holds a key must not be able to tell seekgate is there: for a request seekgate allows, the
status, the body bytes and every header Triton sent reach the client as Triton sent them, over HTTP/1.1,
HTTP over TLS, gRPC and gRPC over TLS, and under strict audit. The only differences allowed are the ones
README documents ("What a client sees of seekgate"), listed here once (SEEKGATE_HEADERS, REFRAMED,
SEEKGATE_METADATA, UNORDERED) and checked in both directions: a header seekgate adds that is not on the
list, or one of Triton's it drops, fails the case. seekgate's own answers (REFUSED, WRONG_METHODS, policy
refusals, unknown gRPC methods) are checked against what README says of them.
"""

from __future__ import annotations

import gzip
import http.client
import json
import queue
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2

from proxy.cli.devcert import make_dev_certs
from proxy.local.triton import TritonProcess, free_ports
from tests.gateway import Gateway, audit_records, wait_for

# Headers every seekgate answer carries, documented in README ("How a request flows", "TLS"): Triton's
# answer never has them, so they are seekgate's to set.
SEEKGATE_HEADERS = frozenset({"server-timing", "x-request-id", "server"})
# Framing of the hop: seekgate's HTTP server frames the body itself (a length or chunks) and stamps its
# own Date; Triton's values for these describe only Triton's connection to seekgate.
REFRAMED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "date"})

MODEL = "deepseek"
STREAM_MODEL = "deepseek_stream"


def bytes_tensor(*values: bytes) -> bytes:
    """The binary tensor extension's BYTES layout: each element a little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def binary_infer(header: dict[str, Any], *tensors: bytes) -> tuple[dict[str, str], bytes]:
    """A binary-tensor infer request: the JSON header, then the tensors, split at Inference-Header-Content-Length."""
    head = json.dumps(header).encode()
    return ({"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))},
            head + b"".join(tensors))


def text_infer(text: str = "hello", max_tokens: int = 3, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [text]},
                       {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]}],
            **extra}


_BIN_HEAD, _BIN_BODY = binary_infer(
    {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}},
                {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "parameters": {"binary_data_size": 4}}],
     "outputs": [{"name": "text_output", "parameters": {"binary_data": True}},
                 {"name": "output_tokens", "parameters": {"binary_data": True}}]},
    bytes_tensor(b"hello"), struct.pack("<i", 3))


@dataclass(frozen=True)
class Case:
    """One request of the corpus: what Triton must answer the same whether seekgate is in front or not."""

    name: str
    method: str
    path: str
    body: Any = None                    # a dict is sent as JSON, bytes as they are
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes | None:
        if self.body is None:
            return None
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


M = f"/v2/models/{MODEL}"
CORPUS: list[Case] = [
    Case("server metadata", "GET", "/v2"),
    Case("live", "GET", "/v2/health/live"),
    Case("ready", "GET", "/v2/health/ready"),
    Case("model metadata", "GET", M),
    Case("model metadata of a version", "GET", f"{M}/versions/1"),
    Case("model ready", "GET", f"{M}/ready"),
    Case("model version ready", "GET", f"{M}/versions/1/ready"),
    Case("model config", "GET", f"{M}/config"),
    Case("model statistics", "GET", f"{M}/stats"),
    Case("model version statistics", "GET", f"{M}/versions/1/stats"),
    Case("unknown version metadata", "GET", f"{M}/versions/7"),
    Case("unknown version ready", "GET", f"{M}/versions/7/ready"),
    Case("unknown model metadata", "GET", "/v2/models/nosuch"),
    Case("a query string", "GET", f"{M}?verbose=1"),
    Case("config of a version", "GET", f"{M}/versions/1/config"),
    Case("ready, connection close", "GET", "/v2/health/ready", headers={"Connection": "close"}),
    Case("model metadata, gzip asked for", "GET", M, headers={"Accept-Encoding": "gzip"}),
    Case("infer, JSON", "POST", f"{M}/infer", text_infer()),
    Case("infer, octet-stream with no header length", "POST", f"{M}/infer", json.dumps(text_infer()).encode(),
         {"Content-Type": "application/octet-stream"}),
    Case("infer, JSON with an empty binary header length", "POST", f"{M}/infer", json.dumps(text_infer()).encode(),
         {"Inference-Header-Content-Length": "0"}),
    Case("infer, empty body", "POST", f"{M}/infer", b""),
    Case("generate, gzip asked for", "POST", f"{M}/generate", {"text_input": "hello", "max_tokens": 4},
         {"Accept-Encoding": "gzip"}),
    Case("generate_stream, gzip asked for", "POST", f"/v2/models/{STREAM_MODEL}/generate_stream",
         {"text_input": "stream", "max_tokens": 3}, {"Accept-Encoding": "gzip"}),

    Case("infer, JSON, an id echoed", "POST", f"{M}/infer", text_infer(id="req-7")),
    Case("infer of a version", "POST", f"{M}/versions/1/infer", text_infer()),
    Case("infer, outputs asked for as binary", "POST", f"{M}/infer",
         text_infer(outputs=[{"name": "text_output", "parameters": {"binary_data": True}},
                             {"name": "input_tokens", "parameters": {"binary_data": True}}])),
    Case("infer, every output as binary", "POST", f"{M}/infer", text_infer(parameters={"binary_data_output": True})),
    Case("infer, binary tensors in and out", "POST", f"{M}/infer", _BIN_BODY, _BIN_HEAD),
    Case("infer, classification", "POST", f"{M}/infer",
         text_infer(outputs=[{"name": "output_tokens", "parameters": {"classification": 1}}])),
    Case("infer, gzip answer asked for", "POST", f"{M}/infer", text_infer(), {"Accept-Encoding": "gzip"}),
    Case("infer, deflate answer asked for", "POST", f"{M}/infer", text_infer(), {"Accept-Encoding": "deflate"}),
    Case("infer, gzip request body", "POST", f"{M}/infer", gzip.compress(json.dumps(text_infer()).encode()),
         {"Content-Encoding": "gzip"}),
    Case("infer, wrong shape", "POST", f"{M}/infer",
         {"inputs": [{"name": "text_input", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}),
    Case("infer, wrong datatype", "POST", f"{M}/infer",
         {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "INT32", "data": [1]}]}),
    Case("infer, unknown input", "POST", f"{M}/infer",
         {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]},
                     {"name": "nonesuch", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}),
    Case("infer, an unknown input named outside ASCII", "POST", f"{M}/infer",
         {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]},
                     {"name": "eingabe_\u00fc\u4e2d", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}),
    Case("infer, required input missing", "POST", f"{M}/infer",
         {"inputs": [{"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [2]}]}),
    Case("infer, unknown output", "POST", f"{M}/infer", text_infer(outputs=[{"name": "nonesuch"}])),
    Case("infer, unknown version", "POST", f"{M}/versions/7/infer", text_infer()),
    Case("infer, unknown model", "POST", "/v2/models/nosuch/infer", text_infer()),
    Case("generate", "POST", f"{M}/generate", {"text_input": "hello", "max_tokens": 4}),
    Case("generate, sampling parameters", "POST", f"{M}/generate",
         {"text_input": "hello", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 5}),
    Case("generate, input missing", "POST", f"{M}/generate", {"max_tokens": 4}),
    Case("generate of an unknown version", "POST", f"{M}/versions/7/generate", {"text_input": "hello"}),
    Case("infer on a decoupled model", "POST", f"/v2/models/{STREAM_MODEL}/infer", text_infer()),
    Case("generate on a decoupled model", "POST", f"/v2/models/{STREAM_MODEL}/generate",
         {"text_input": "hello", "max_tokens": 3}),
    Case("generate_stream", "POST", f"/v2/models/{STREAM_MODEL}/generate_stream",
         {"text_input": "stream", "max_tokens": 5}),
    Case("generate_stream, input missing", "POST", f"/v2/models/{STREAM_MODEL}/generate_stream", {"max_tokens": 2}),
    Case("generate_stream on a model that is not decoupled", "POST", f"{M}/generate_stream",
         {"text_input": "hello", "max_tokens": 2}),
]

# seekgate's own refusals of requests a key may send (README, "Request bodies: judged as Triton reads them"):
# the body is judged on seekgate's parse before Triton sees it, so these get seekgate's 400, not Triton's answer.
REFUSED: list[Case] = [
    Case("infer, not JSON", "POST", f"{M}/infer", b"{not json"),
    Case("generate, max_tokens not an integer", "POST", f"{M}/generate", {"text_input": "hello", "max_tokens": "four"}),
]


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def send(port: int, case: Case, key: str | None = None, tls: ssl.SSLContext | None = None) -> Answer:
    """The case over a fresh HTTP/1.1 connection; the body as the client reads it (chunks joined)."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=120, context=tls) if tls
            else http.client.HTTPConnection("127.0.0.1", port, timeout=120))
    try:
        headers = {**({"Content-Type": "application/json"} if isinstance(case.body, dict) else {}), **case.headers}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(case.method, case.path, case.payload(), headers)
        resp = conn.getresponse()
        return Answer(resp.status, resp.reason, resp.getheaders(), resp.read())
    finally:
        conn.close()


def send_on(conn: http.client.HTTPConnection, case: Case, key: str | None = None, chunked: bool = False) -> Answer:
    """The case on an open keep-alive connection (its body chunked, when asked)."""
    headers = {**({"Content-Type": "application/json"} if isinstance(case.body, dict) else {}),
               **case.headers, **({"Authorization": f"Bearer {key}"} if key else {})}
    payload = case.payload()
    if chunked and payload:
        # Pieces of 1000 bytes: a binary header's split falls inside a chunk, not on its edge.
        conn.request(case.method, case.path, iter([payload[i:i + 1000] for i in range(0, len(payload), 1000)]),
                     headers, encode_chunked=True)
    else:
        conn.request(case.method, case.path, payload, headers)
    resp = conn.getresponse()
    return Answer(resp.status, resp.reason, resp.getheaders(), resp.read())


def closes(answer: Answer) -> bool:
    return any(n.lower() == "connection" and "close" in v.lower() for n, v in answer.headers)


def header_differences(direct: Answer, proxied: Answer) -> list[str]:
    """Every header difference not on the documented list, both ways."""
    def values(answer: Answer, skip: frozenset[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, value in answer.headers:
            if name.lower() not in skip:
                out.setdefault(name.lower(), []).append(value)
        return out
    assert not SEEKGATE_HEADERS & {n.lower() for n, _ in direct.headers}, "Triton sent a header seekgate sets"
    theirs, ours = values(direct, REFRAMED), values(proxied, REFRAMED | SEEKGATE_HEADERS)
    return [f"{name}: Triton {theirs.get(name)} seekgate {ours.get(name)}"
            for name in sorted(theirs.keys() | ours.keys()) if theirs.get(name) != ours.get(name)]


def assert_same(direct: Answer, proxied: Answer) -> None:
    assert (proxied.status, proxied.reason) == (direct.status, direct.reason)
    assert header_differences(direct, proxied) == []
    assert proxied.body == direct.body
    assert {n.lower() for n, _ in proxied.headers} >= SEEKGATE_HEADERS


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_certs(tmp_path_factory.mktemp("faithful-tls"))


@pytest.fixture(scope="module")
def gw(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-faithful"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}"}).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def tls_gw(triton: TritonProcess, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-faithful-tls"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}",
                   "server.tls_cert_file": str(certs["server_cert"]), "server.tls_key_file": str(certs["server_key"])}
                ).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def strict_gw(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Strict audit: every answer is held until its record is durable (forward.py reads plain bodies whole
    first), another path through the relay for the same bytes."""
    g = Gateway(tmp_path_factory.mktemp("gw-faithful-strict"), triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{triton.launch.grpc_port}", "audit.durability": "strict"}
                ).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def key(gw: Gateway) -> str:
    # A plain user's key: what a well-behaved client holds. Every case is one it may send.
    return gw.key(owner="faithful", roles=("user",))[1]


@pytest.fixture(scope="module")
def tls_key(tls_gw: Gateway) -> str:
    return tls_gw.key(owner="faithful-tls", roles=("user",))[1]


@pytest.fixture(scope="module")
def strict_key(strict_gw: Gateway) -> str:
    return strict_gw.key(owner="faithful-strict", roles=("user",))[1]


def client_tls(certs: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.check_hostname = False
    return ctx


# ------------------------------------------------------------------ HTTP


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_http_answer_is_triton_s(gw: Gateway, triton: TritonProcess, key: str, case: Case) -> None:
    assert_same(send(triton.launch.http_port, case), send(gw.settings.server.http_port, case, key))


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_http_answer_under_strict_audit_is_triton_s(strict_gw: Gateway, triton: TritonProcess, strict_key: str,
                                                    case: Case) -> None:
    assert_same(send(triton.launch.http_port, case), send(strict_gw.settings.server.http_port, case, strict_key))


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_the_corpus_over_one_keep_alive_connection(gw: Gateway, triton: TritonProcess, key: str,
                                                   chunked: bool) -> None:
    # tritonclient and perf tools keep their connection: every answer must end where Triton's did, or the
    # next one on the connection is read from the wrong byte.
    direct = http.client.HTTPConnection("127.0.0.1", triton.launch.http_port, timeout=120)
    proxied = http.client.HTTPConnection("127.0.0.1", gw.settings.server.http_port, timeout=120)
    try:
        for case in CORPUS:
            if case.headers.get("Connection") != "close":
                theirs, ours = send_on(direct, case, chunked=chunked), send_on(proxied, case, key, chunked)
                assert_same(theirs, ours)
                # The connection stays open wherever Triton's did (http.client would reconnect unseen).
                assert closes(ours) == closes(theirs) is False, case.name
    finally:
        direct.close()
        proxied.close()


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_https_answer_is_triton_s(tls_gw: Gateway, triton: TritonProcess, tls_key: str, certs: dict[str, Path],
                                  case: Case) -> None:
    assert_same(send(triton.launch.http_port, case),
                send(tls_gw.settings.server.http_port, case, tls_key, client_tls(certs)))


@pytest.fixture(scope="module")
def admin_key(gw: Gateway) -> str:
    return gw.key(owner="faithful-admin", roles=("admin",))[1]


def test_statistics_of_every_model_are_triton_s_where_policy_allows_them(gw: Gateway, triton: TritonProcess,
                                                                         key: str, admin_key: str) -> None:
    # Server-wide statistics are an admin view (resource `statistics` in policies/): a user key is refused.
    case = Case("statistics of every model", "GET", "/v2/models/stats")
    assert send(gw.settings.server.http_port, case, key).status == 403
    assert_same(send(triton.launch.http_port, case), send(gw.settings.server.http_port, case, admin_key))
    with grpc.insecure_channel(f"127.0.0.1:{triton.launch.grpc_port}") as direct, \
            grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as proxied:
        raw = [service_pb2.ModelStatisticsRequest().SerializeToString()]
        assert _grpc_call(proxied, key, "ModelStatistics", raw).code == grpc.StatusCode.PERMISSION_DENIED
        assert_same_grpc(_grpc_call(direct, None, "ModelStatistics", raw),
                         _grpc_call(proxied, admin_key, "ModelStatistics", raw))


# A method one of Triton's routes does not take: seekgate answers it itself (nothing unclassified is
# forwarded), with Triton's status and message; the body is seekgate's rendering, with an Allow header.
WRONG_METHODS: list[Case] = [
    Case("HEAD of live", "HEAD", "/v2/health/live"),
    Case("POST to live", "POST", "/v2/health/live", {}),
    Case("HEAD of model metadata", "HEAD", M),
    Case("metadata by POST", "POST", M, {"x": 1}),
    Case("infer by GET", "GET", f"{M}/infer"),
    Case("generate_stream by GET", "GET", f"/v2/models/{STREAM_MODEL}/generate_stream"),
    Case("config by PUT", "PUT", f"{M}/config", {}),
    Case("server metadata by DELETE", "DELETE", "/v2"),
]


@pytest.mark.parametrize("case", WRONG_METHODS, ids=lambda c: c.name)
def test_a_method_a_triton_route_does_not_take_is_triton_s_405(gw: Gateway, triton: TritonProcess, key: str,
                                                               case: Case) -> None:
    direct, proxied = send(triton.launch.http_port, case), send(gw.settings.server.http_port, case, key)
    assert direct.status == proxied.status == 405
    if case.method != "HEAD":
        assert json.loads(proxied.body) == json.loads(direct.body) == {"error": "Method Not Allowed"}
    assert {n.lower() for n, _ in proxied.headers} >= SEEKGATE_HEADERS | {"allow"}


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.name)
def test_seekgate_s_own_refusals_are_its_400_before_triton(gw: Gateway, triton: TritonProcess, key: str,
                                                           case: Case) -> None:
    # Triton refuses these too, in its words; seekgate refuses first, in its own (README lists them).
    assert send(triton.launch.http_port, case).status >= 400
    answer = send(gw.settings.server.http_port, case, key)
    assert answer.status == 400 and set(json.loads(answer.body)) == {"error"}
    assert {n.lower() for n, _ in answer.headers} >= SEEKGATE_HEADERS


# ------------------------------------------------------------------ gRPC

S = "/inference.GRPCInferenceService/"


def grpc_infer(model: str = MODEL, text: bytes = b"hello", max_tokens: int = 3, version: str = "",
               **extra: Any) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version, **extra)
    for name, dtype, raw in (("text_input", "BYTES", bytes_tensor(text)),
                             ("max_tokens", "INT32", struct.pack("<i", max_tokens))):
        t = req.inputs.add(name=name, datatype=dtype)
        t.shape.extend([1, 1])
        req.raw_input_contents.append(raw)
    return req


def _with_input(req: service_pb2.ModelInferRequest, name: str, dtype: str, shape: list[int],
                raw: bytes) -> service_pb2.ModelInferRequest:
    t = req.inputs.add(name=name, datatype=dtype)
    t.shape.extend(shape)
    req.raw_input_contents.append(raw)
    return req


def _typed_contents() -> service_pb2.ModelInferRequest:
    """Values in the typed `contents` fields instead of raw_input_contents, as other clients than tritonclient send."""
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    text = req.inputs.add(name="text_input", datatype="BYTES")
    text.shape.extend([1, 1])
    text.contents.bytes_contents.append(b"typed")
    count = req.inputs.add(name="max_tokens", datatype="INT32")
    count.shape.extend([1, 1])
    count.contents.int_contents.append(2)
    return req


def _wrong_shape() -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    return _with_input(req, "text_input", "BYTES", [1, 2], bytes_tensor(b"a", b"b"))


def _wrong_datatype() -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    return _with_input(req, "text_input", "INT32", [1, 1], struct.pack("<i", 1))


GRPC_CORPUS: list[tuple[str, str, Any]] = [
    ("live", "ServerLive", service_pb2.ServerLiveRequest()),
    ("ready", "ServerReady", service_pb2.ServerReadyRequest()),
    ("server metadata", "ServerMetadata", service_pb2.ServerMetadataRequest()),
    ("model ready", "ModelReady", service_pb2.ModelReadyRequest(name=MODEL)),
    ("model version ready", "ModelReady", service_pb2.ModelReadyRequest(name=MODEL, version="1")),
    ("unknown version ready", "ModelReady", service_pb2.ModelReadyRequest(name=MODEL, version="7")),
    ("model metadata", "ModelMetadata", service_pb2.ModelMetadataRequest(name=MODEL)),
    ("unknown version metadata", "ModelMetadata", service_pb2.ModelMetadataRequest(name=MODEL, version="7")),
    ("unknown model metadata", "ModelMetadata", service_pb2.ModelMetadataRequest(name="nosuch")),
    ("model config", "ModelConfig", service_pb2.ModelConfigRequest(name=MODEL)),
    ("model statistics", "ModelStatistics", service_pb2.ModelStatisticsRequest(name=MODEL)),
    ("infer", "ModelInfer", grpc_infer(id="req-9")),
    ("infer of a version", "ModelInfer", grpc_infer(version="1")),
    ("infer, one output asked for", "ModelInfer",
     grpc_infer(outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="text_output")])),
    ("infer, typed contents", "ModelInfer", _typed_contents()),
    ("infer, wrong shape", "ModelInfer", _wrong_shape()),
    ("infer, wrong datatype", "ModelInfer", _wrong_datatype()),
    ("infer, unknown input", "ModelInfer", _with_input(grpc_infer(), "nonesuch", "FP32", [1, 1], b"\0\0\x80?")),
    ("infer, an unknown input named outside ASCII", "ModelInfer",
     _with_input(grpc_infer(), "eingabe_\u00fc\u4e2d", "FP32", [1, 1], b"\0\0\x80?")),
    ("infer, unknown version", "ModelInfer", grpc_infer(version="7")),
    ("infer, unknown model", "ModelInfer", grpc_infer(model="nosuch")),
    ("infer, generation model over the unary call", "ModelInfer", grpc_infer(model=STREAM_MODEL)),
]


@dataclass(frozen=True)
class GrpcAnswer:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    initial: list[tuple[str, str | bytes]]
    trailing: list[tuple[str, str | bytes]]


# Metadata seekgate adds, documented in README: the request id, in the trailers of a call that fails
# (Triton's error or seekgate's refusal); a call that succeeds carries Triton's metadata only.
SEEKGATE_METADATA = frozenset({"x-request-id"})


def _grpc_call(channel: grpc.Channel, key: str | None, method: str, requests: list[bytes]) -> GrpcAnswer:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    if method == "ModelStreamInfer":
        call = channel.stream_stream(S + method)(iter(requests), metadata=metadata, timeout=120)
        responses: list[bytes] = []
        try:
            responses.extend(call)
        except grpc.RpcError:
            pass
        return GrpcAnswer(call.code(), call.details() or "", responses, list(call.initial_metadata() or ()),
                          list(call.trailing_metadata() or ()))
    try:
        response, call = channel.unary_unary(S + method).with_call(requests[0], metadata=metadata, timeout=120)
        return GrpcAnswer(call.code(), call.details() or "", [response], list(call.initial_metadata() or ()),
                          list(call.trailing_metadata() or ()))
    except grpc.RpcError as err:
        return GrpcAnswer(err.code(), err.details() or "", [], list(err.initial_metadata() or ()),
                          list(err.trailing_metadata() or ()))


# Triton serializes ModelConfig's protobuf maps (parameters) in no fixed order: two direct calls differ in
# their bytes. Its answer is compared as the message it decodes to; every other answer byte for byte.
UNORDERED: dict[str, type[Any]] = {"ModelConfig": service_pb2.ModelConfigResponse}


def assert_same_grpc(direct: GrpcAnswer, proxied: GrpcAnswer, method: str = "") -> None:
    assert (proxied.code, proxied.details) == (direct.code, direct.details)
    if method in UNORDERED:
        decode = UNORDERED[method].FromString
        assert [decode(r) for r in proxied.responses] == [decode(r) for r in direct.responses]
    else:
        assert proxied.responses == direct.responses
    assert proxied.initial == direct.initial
    assert [kv for kv in proxied.trailing if kv[0] not in SEEKGATE_METADATA] == direct.trailing
    added = {k for k, _ in proxied.trailing} & SEEKGATE_METADATA
    assert added == (set() if proxied.code == grpc.StatusCode.OK else SEEKGATE_METADATA)
    assert not SEEKGATE_METADATA & {k for k, _ in direct.trailing + direct.initial}


@pytest.fixture(scope="module")
def grpc_channels(gw: Gateway, tls_gw: Gateway, strict_gw: Gateway, triton: TritonProcess, key: str, tls_key: str,
                  strict_key: str, certs: dict[str, Path]) -> Iterator[dict[str, tuple[grpc.Channel, str | None]]]:
    """Triton's own port, and seekgate's plain, TLS and strict-audit ones, each with the key it takes."""
    creds = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    channels = {"direct": (grpc.insecure_channel(f"127.0.0.1:{triton.launch.grpc_port}"), None),
                "plain": (grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}"), key),
                "tls": (grpc.secure_channel(f"localhost:{tls_gw.settings.server.grpc_port}", creds), tls_key),
                "strict": (grpc.insecure_channel(f"127.0.0.1:{strict_gw.settings.server.grpc_port}"), strict_key)}
    yield channels
    for channel, _ in channels.values():
        channel.close()


@pytest.mark.parametrize("over", ["plain", "tls", "strict"])
@pytest.mark.parametrize(("name", "method", "request_"), GRPC_CORPUS, ids=[c[0] for c in GRPC_CORPUS])
def test_grpc_answer_is_triton_s(grpc_channels: dict[str, tuple[grpc.Channel, str | None]], over: str,
                                 name: str, method: str, request_: Any) -> None:
    raw = [request_.SerializeToString()]
    assert_same_grpc(_grpc_call(*grpc_channels["direct"], method, raw),
                     _grpc_call(*grpc_channels[over], method, raw), method)


@pytest.mark.parametrize("over", ["plain", "tls"])
@pytest.mark.parametrize("path", ["/inference.GRPCInferenceService/ModelTrain", "/other.Service/ModelInfer"])
def test_an_unknown_grpc_method_is_triton_s_unimplemented(gw: Gateway, grpc_channels: dict[str, Any], over: str,
                                                         path: str) -> None:
    # Triton answers it before any key is read, with no message; grpc's own answer says "Method not found!".
    def call(entry: tuple[grpc.Channel, str | None]) -> GrpcAnswer:
        channel, key = entry
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        try:
            channel.unary_unary(path)(b"", metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            return GrpcAnswer(err.code(), err.details() or "", [], list(err.initial_metadata() or ()),
                              list(err.trailing_metadata() or ()))
        raise AssertionError(f"{path} answered")
    direct = call(grpc_channels["direct"])
    assert direct.code == grpc.StatusCode.UNIMPLEMENTED
    assert_same_grpc(direct, call(grpc_channels[over]))
    assert_same_grpc(direct, call((grpc_channels[over][0], None)))   # no key: the same answer
    if over == "plain":
        assert wait_for(lambda: any(r["reason"] == f"no gRPC method: {path}" and r["status"] == "denied"
                                    for r in audit_records(gw)), 10)


def _stream_request(text: bytes, max_tokens: int, rid: str, model: str = STREAM_MODEL) -> bytes:
    return grpc_infer(model=model, text=text, max_tokens=max_tokens, id=rid).SerializeToString()


GRPC_STREAMS: list[tuple[str, list[bytes]]] = [
    ("one generation", [_stream_request(b"stream", 4, "a")]),
    ("two generations in one stream", [_stream_request(b"one", 3, "a"), _stream_request(b"two", 2, "b")]),
    ("an error inside the stream, then a generation",
     [_wrong_shape().SerializeToString(), _stream_request(b"after", 2, "c")]),
    ("an unknown model inside the stream", [_stream_request(b"x", 2, "d", model="nosuch")]),
    ("a model that is not decoupled", [_stream_request(b"plain", 2, "e", model=MODEL)]),
]


@pytest.mark.parametrize("over", ["plain", "tls", "strict"])
@pytest.mark.parametrize(("name", "requests"), GRPC_STREAMS, ids=[c[0] for c in GRPC_STREAMS])
def test_grpc_stream_answers_are_triton_s(grpc_channels: dict[str, tuple[grpc.Channel, str | None]],
                                          over: str, name: str, requests: list[bytes]) -> None:
    assert_same_grpc(_grpc_call(*grpc_channels["direct"], "ModelStreamInfer", requests),
                     _grpc_call(*grpc_channels[over], "ModelStreamInfer", requests))



# ------------------------------------------------------------------ large bodies

BIG = 1 << 20   # FP32 elements: a 4 MiB tensor, and an answer of several MB (echo returns every value)
_BIG_TENSOR = np.random.default_rng(0).random(BIG, dtype=np.float32)
_BIG_HEAD, _BIG_BODY = binary_infer(
    {"inputs": [{"name": "INPUT0", "shape": [1, BIG], "datatype": "FP32", "parameters": {"binary_data_size": 4 * BIG}}]},
    _BIG_TENSOR.tobytes())
_BIG_BIN_OUT = binary_infer({"inputs": [{"name": "INPUT0", "shape": [1, BIG], "datatype": "FP32",
                                          "parameters": {"binary_data_size": 4 * BIG}}],
                              "parameters": {"binary_data_output": True}}, _BIG_TENSOR.tobytes())
_BIG_WRONG = binary_infer({"inputs": [{"name": "INPUT0", "shape": [2, BIG], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 4 * BIG}}]}, _BIG_TENSOR.tobytes())
_BIG_TEXT = "x" * (3 << 20)
LARGE: list[Case] = [
    Case("a 4 MiB binary tensor", "POST", "/v2/models/echo/infer", _BIG_BODY, _BIG_HEAD),
    Case("a 4 MiB binary tensor, answer as binary", "POST", "/v2/models/echo/infer", _BIG_BIN_OUT[1], _BIG_BIN_OUT[0]),
    Case("a 4 MiB binary tensor, gzip answer", "POST", "/v2/models/echo/infer", _BIG_BODY,
         {**_BIG_HEAD, "Accept-Encoding": "gzip"}),
    Case("a JSON tensor of several MB", "POST", "/v2/models/echo/infer",
         {"inputs": [{"name": "INPUT0", "shape": [1, 1 << 19], "datatype": "FP32",
                      "data": _BIG_TENSOR[: 1 << 19].tolist()}]}),
    Case("generate with a 3 MiB text", "POST", "/v2/models/echo/generate", {"text_input": _BIG_TEXT}),
    Case("generate_stream with a 3 MiB text", "POST", "/v2/models/echo_stream/generate_stream",
         {"text_input": _BIG_TEXT}),
    Case("a 4 MiB tensor under the wrong shape", "POST", "/v2/models/echo/infer", _BIG_WRONG[1], _BIG_WRONG[0]),
]


@pytest.fixture(scope="module")
def echo_gw(echo_triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-faithful-echo"), echo_triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{echo_triton.launch.grpc_port}"}).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def echo_tls_gw(echo_triton: TritonProcess, certs: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gw-faithful-echo-tls"), echo_triton.http_url, free_ports(3),
                **{"upstream.grpc_target": f"127.0.0.1:{echo_triton.launch.grpc_port}",
                   "server.tls_cert_file": str(certs["server_cert"]), "server.tls_key_file": str(certs["server_key"])}
                ).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def echo_gws(echo_gw: Gateway, echo_tls_gw: Gateway) -> dict[str, tuple[Gateway, str]]:
    """The echo gateways, plain and TLS, each with a user key."""
    return {name: (g, g.key(owner=f"faithful-large-{name}", roles=("user",))[1])
            for name, g in (("plain", echo_gw), ("tls", echo_tls_gw))}


@pytest.mark.parametrize("over", ["plain", "tls"])
@pytest.mark.parametrize("case", LARGE, ids=lambda c: c.name)
def test_large_http_answer_is_triton_s(echo_gws: dict[str, tuple[Gateway, str]], echo_triton: TritonProcess,
                                       certs: dict[str, Path], over: str, case: Case) -> None:
    direct = send(echo_triton.launch.http_port, case)
    assert len(direct.body) > 1 << 20 or direct.status >= 400
    g, key = echo_gws[over]
    assert_same(direct, send(g.settings.server.http_port, case, key, client_tls(certs) if over == "tls" else None))


UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _big_grpc(model: str, rid: str) -> bytes:
    req = service_pb2.ModelInferRequest(model_name=model, id=rid)
    return _with_input(req, "INPUT0", "FP32", [1, BIG], _BIG_TENSOR.tobytes()).SerializeToString()


@pytest.mark.parametrize("over", ["plain", "tls"])
@pytest.mark.parametrize(("method", "model"), [("ModelInfer", "echo"), ("ModelStreamInfer", "echo_stream")])
def test_large_grpc_answer_is_triton_s(echo_gws: dict[str, tuple[Gateway, str]], echo_triton: TritonProcess,
                                       certs: dict[str, Path], over: str, method: str, model: str) -> None:
    g, key = echo_gws[over]
    port = g.settings.server.grpc_port
    creds = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    with grpc.insecure_channel(f"127.0.0.1:{echo_triton.launch.grpc_port}", options=UNLIMITED) as direct, \
            (grpc.secure_channel(f"localhost:{port}", creds, options=UNLIMITED) if over == "tls"
             else grpc.insecure_channel(f"127.0.0.1:{port}", options=UNLIMITED)) as proxied:
        raw = [_big_grpc(model, "big")]
        theirs = _grpc_call(direct, None, method, raw)
        assert theirs.code == grpc.StatusCode.OK and sum(map(len, theirs.responses)) > 1 << 20
        assert_same_grpc(theirs, _grpc_call(proxied, key, method, raw))


# ------------------------------------------------------------------ tritonclient


def _inputs(module: Any, text: str = "hello", max_tokens: int = 3, binary: bool = True) -> list[Any]:
    a = module.InferInput("text_input", [1, 1], "BYTES")
    b = module.InferInput("max_tokens", [1, 1], "INT32")
    if module is httpclient:
        a.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_), binary_data=binary)
        b.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32), binary_data=binary)
    else:
        a.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        b.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [a, b]


def _http_outputs(binary: bool) -> list[Any]:
    return [httpclient.InferRequestedOutput("text_output", binary_data=binary),
            httpclient.InferRequestedOutput("input_tokens", binary_data=binary),
            httpclient.InferRequestedOutput("output_tokens", binary_data=binary, class_count=1)]


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_reads_the_same_result(gw: Gateway, triton: TritonProcess, key: str, binary: bool,
                                                 compression: str | None) -> None:
    results = []
    for port, headers in ((triton.launch.http_port, None), (gw.settings.server.http_port,
                                                            {"Authorization": f"Bearer {key}"})):
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            results.append(client.infer(MODEL, _inputs(httpclient, binary=binary), outputs=_http_outputs(binary),
                                        request_id="tc-1", headers=headers,
                                        request_compression_algorithm=compression,
                                        response_compression_algorithm=compression))
        finally:
            client.close()
    direct, proxied = results
    assert proxied.get_response() == direct.get_response()
    for name in ("text_output", "input_tokens", "output_tokens"):
        assert proxied.as_numpy(name).tolist() == direct.as_numpy(name).tolist()


def _stream_results(target: str, key: str | None, requests: list[tuple[str, str, int]],
                    empty_final: bool) -> list[Any]:
    """What tritonclient's stream callback receives: results as dicts, errors as their messages.

    Each request is sent once the one before it is answered (an error, or its final response), so the
    order is Triton's for one request at a time, not a race between two generations."""
    received: queue.Queue[Any] = queue.Queue()
    seen: list[Any] = []
    client = grpcclient.InferenceServerClient(target)
    try:
        client.start_stream(callback=lambda result, error: received.put(
            str(error) if error is not None else result.get_response(as_json=True)),
            headers={"authorization": f"Bearer {key}"} if key else None)
        for model, text, max_tokens in requests:
            client.async_stream_infer(model, _inputs(grpcclient, text, max_tokens), request_id=text,
                                      enable_empty_final_response=empty_final)
            while True:
                item = received.get(timeout=120)
                seen.append(item)
                if isinstance(item, str) or item["parameters"].get("triton_final_response", {}).get("bool_param"):
                    break
        client.stop_stream()
    finally:
        client.close()
    return seen


STREAM_CALLS = [(STREAM_MODEL, "first", 3), (MODEL, "not-decoupled", 2), ("nosuch", "unknown", 2),
                (STREAM_MODEL, "last", 2)]


@pytest.mark.parametrize("empty_final", [False, True], ids=["plain", "empty-final-response"])
def test_tritonclient_grpc_stream_sees_the_same_results_and_errors(gw: Gateway, triton: TritonProcess, key: str,
                                                                   empty_final: bool) -> None:
    direct = _stream_results(f"127.0.0.1:{triton.launch.grpc_port}", None, STREAM_CALLS, empty_final)
    assert any(isinstance(r, str) for r in direct) and any(isinstance(r, dict) for r in direct)
    assert _stream_results(f"127.0.0.1:{gw.settings.server.grpc_port}", key, STREAM_CALLS, empty_final) == direct


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_tritonclient_grpc_infer_reads_the_same_result(gw: Gateway, triton: TritonProcess, key: str,
                                                       compression: str | None) -> None:
    results = []
    for port, headers in ((triton.launch.grpc_port, None), (gw.settings.server.grpc_port,
                                                            {"authorization": f"Bearer {key}"})):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            results.append(client.infer(MODEL, _inputs(grpcclient), request_id="tc-2", headers=headers,
                                        compression_algorithm=compression,
                                        outputs=[grpcclient.InferRequestedOutput("output_tokens", class_count=1),
                                                 grpcclient.InferRequestedOutput("text_output")]))
        finally:
            client.close()
    direct, proxied = results
    assert proxied.get_response(as_json=True) == direct.get_response(as_json=True)



def sse_chunks(port: int, key: str | None, body: dict[str, Any], tls: ssl.SSLContext | None = None) -> list[bytes]:
    """generate_stream's answer as the chunks on the wire, read off a raw socket (http.client would join them)."""
    payload = json.dumps(body).encode()
    raw = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock = tls.wrap_socket(raw) if tls else raw
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall(f"POST /v2/models/{STREAM_MODEL}/generate_stream HTTP/1.1\r\nHost: triton\r\n{auth}"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                 .encode() + payload)
    data = b""
    while piece := sock.recv(65536):
        data += piece
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"\r\ntransfer-encoding: chunked" in head.lower()
    chunks = []
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        chunks.append(rest[:n])
        assert rest[n:n + 2] == b"\r\n"
        rest = rest[n + 2:]
    assert chunks[-1] == b"", "the stream ends with its last chunk"
    return chunks[:-1]


@pytest.mark.parametrize("over", ["plain", "tls"])
def test_generate_stream_is_relayed_event_by_event(gw: Gateway, tls_gw: Gateway, triton: TritonProcess, key: str,
                                                   tls_key: str, certs: dict[str, Path], over: str) -> None:
    body = {"text_input": "stream", "max_tokens": 6}
    direct = sse_chunks(triton.launch.http_port, None, body)
    assert len(direct) > 1 and all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in direct)
    proxied = (sse_chunks(gw.settings.server.http_port, key, body) if over == "plain"
               else sse_chunks(tls_gw.settings.server.http_port, tls_key, body, client_tls(certs)))
    # Events may share a chunk when two arrive together, but none is ever split or held to the end.
    assert b"".join(proxied) == b"".join(direct)
    assert len(proxied) > 1 and all(c.endswith(b"\n\n") for c in proxied)





def test_a_stream_with_tritonclients_empty_final_response_is_metered_as_without(gw: Gateway, key: str) -> None:
    """The switch only adds an empty final response: the record counts the same tokens, not the bound."""
    counted = {}
    for empty_final in (False, True):
        before = len(audit_records(gw))
        _stream_results(f"127.0.0.1:{gw.settings.server.grpc_port}", key, [(STREAM_MODEL, "metered", 5)], empty_final)
        assert wait_for(lambda seen=before: len(audit_records(gw)) > seen, 10)
        record = audit_records(gw)[-1]
        assert record["status"] == "allowed", record
        counted[empty_final] = (record["input_tokens"], record["output_tokens"])
    assert counted[True] == counted[False] and counted[False][1] == 5, counted
