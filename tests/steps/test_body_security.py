"""The two bypasses of issue 14, end to end: seekgate in front of a real Triton (tests/models/echo).

- Shared memory: a key without the admin role must never make Triton read or write a registered
  region, in any encoding, over HTTP or gRPC. Each attack is first sent straight to Triton, which
  acts on it (the control: the attack is real), then through seekgate, which must refuse it; the
  region's bytes are compared after every attempt.
- The role's max_tokens cap holds for every encoding of max_tokens that Triton accepts: Triton
  reads 200 from each body (the control), seekgate refuses each with 400.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc

from proxy.local.triton import INTERNAL_HEADER, TritonProcess, free_ports
from tests.frontend.test_http import call
from tests.gateway import Gateway, audit_records, wait_for

REGION, REGION_KEY, REGION_SIZE = "victim", "/seekgate_test_victim", 4096
PATTERN = bytes(range(256)) * (REGION_SIZE // 256)
CAP = 32


@pytest.fixture(scope="module")
def gw(echo_triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("bodysec"), echo_triton.http_url, free_ports(3),
                triton_data_dir=echo_triton.launch.data_dir,
                **{"upstream.grpc_target": f"127.0.0.1:{echo_triton.launch.grpc_port}",
                   "limits.max_tokens_by_role": f"user={CAP}"}).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def user_key(gw: Gateway) -> str:
    return gw.key(owner="mallory", roles=("user",))[1]


@pytest.fixture(scope="module")
def region(echo_triton: TritonProcess) -> Iterator[Any]:
    """A system shared-memory region an admin registered with Triton, filled with a known pattern."""
    handle = shm.create_shared_memory_region(REGION, REGION_KEY, REGION_SIZE)
    internal = (echo_triton.launch.data_dir / "secrets" / "triton-internal-key").read_text().strip()
    status, _, raw = call(f"{echo_triton.http_url}/v2/systemsharedmemory/region/{REGION}/register", "POST",
                          {"key": REGION_KEY, "offset": 0, "byte_size": REGION_SIZE},
                          headers={INTERNAL_HEADER: internal})
    assert status == 200, raw
    yield handle
    call(f"{echo_triton.http_url}/v2/systemsharedmemory/region/{REGION}/unregister", "POST", b"",
         headers={INTERNAL_HEADER: internal})
    shm.destroy_shared_memory_region(handle)


def fill(handle: Any) -> None:
    shm.set_shared_memory_region(handle, [np.frombuffer(PATTERN, dtype=np.uint8)])


def contents(handle: Any) -> bytes:
    return bytes(shm.get_contents_as_numpy(handle, np.uint8, [REGION_SIZE]).tobytes())


# ------------------------------------------------------------------ shared memory over HTTP

SHM = '"shared_memory_region": "victim", "shared_memory_byte_size": 4096'
ESCAPED = SHM.replace("shared_memory_region", "shared\\u005fmemory_region")
ALL_ESCAPED = SHM.replace("shared_memory_region", "".join(f"\\u{ord(c):04x}" for c in "shared_memory_region"))
TEXT = '{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}'


def write_attack(params: str) -> bytes:
    """The model's output written into the region."""
    return ('{"inputs": [' + TEXT + '], "outputs": [{"name": "echo", "parameters": {' + params + '}}]}').encode()


def read_attack(params: str) -> bytes:
    """The model's input read from the region: its bytes come back in the answer."""
    return ('{"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "parameters": {'
            + params.replace("4096", "260") + '}}], "outputs": [{"name": "echo"}]}').encode()


def two_gzip_members(body: bytes) -> bytes:
    return gzip.compress(body) + gzip.compress(b"padding")


# (name, body, headers): every shape Triton still acts on, and a few it might.
HTTP_ATTACKS: list[tuple[str, bytes, dict[str, str]]] = [
    ("plain", write_attack(SHM), {}),
    ("json escape", write_attack(ESCAPED), {}),
    ("every char escaped", write_attack(ALL_ESCAPED), {}),
    ("gzip", gzip.compress(write_attack(SHM)), {"Content-Encoding": "gzip"}),
    ("deflate, escaped", zlib.compress(write_attack(ESCAPED)), {"Content-Encoding": "deflate"}),
    ("deflate, gzip framing", gzip.compress(write_attack(SHM)), {"Content-Encoding": "deflate"}),
    ("two gzip members", two_gzip_members(write_attack(SHM)), {"Content-Encoding": "gzip"}),
    ("binary header", write_attack(ESCAPED) + b"\x00" * 8,
     {"Inference-Header-Content-Length": str(len(write_attack(ESCAPED)))}),
    ("header length with junk", write_attack(SHM) + b"junk",
     {"Inference-Header-Content-Length": f"{len(write_attack(SHM))}abc"}),
    ("duplicate parameters, first wins in Triton",
     ('{"inputs": [' + TEXT + '], "outputs": [{"name": "echo", "parameters": {' + SHM + '}, "parameters": {}}]}')
     .encode(), {}),
    ("read, escaped", read_attack(ESCAPED), {}),
    ("read, gzip", gzip.compress(read_attack(SHM)), {"Content-Encoding": "gzip"}),
]


@pytest.mark.parametrize("name,body,headers", HTTP_ATTACKS, ids=[a[0] for a in HTTP_ATTACKS])
def test_no_shared_memory_attack_over_http_reaches_the_region(
        echo_triton: TritonProcess, gw: Gateway, region: Any, user_key: str, admin_key: str,
        name: str, body: bytes, headers: dict[str, str]) -> None:
    for route in ("/v2/models/echo/infer", "/v2/models/echo/versions/1/infer"):
        fill(region)
        status, _, raw = call(gw.url + route, "POST", body, user_key, headers)
        assert status in (400, 403, 415), (status, raw)
        assert contents(region) == PATTERN, f"{name}: the region changed"
        assert PATTERN[:200].decode("latin-1").encode() not in raw
    # The same bytes straight to Triton: does it act on them? Where it does, the attack was real.
    status, _, raw = call(echo_triton.http_url + "/v2/models/echo/infer", "POST", body, headers=headers)
    if status == 200:
        touched = contents(region) != PATTERN or b"\\u0000\\u0001\\u0002" in raw
        assert touched, f"{name}: Triton served it without touching the region: not an attack"
    fill(region)


def test_the_write_attack_is_real_and_admins_keep_shared_memory(
        echo_triton: TritonProcess, gw: Gateway, region: Any, admin_key: str) -> None:
    """Controls: straight to Triton the plain attack overwrites the region; through seekgate an admin
    may still point an inference at shared memory (the body check is by role, not a blanket ban)."""
    for url, key in ((echo_triton.http_url, None), (gw.url, admin_key)):
        fill(region)
        status, _, raw = call(url + "/v2/models/echo/infer", "POST", write_attack(ESCAPED), key)
        assert status == 200, raw
        assert contents(region) != PATTERN
    fill(region)


@pytest.fixture(scope="module")
def admin_key(gw: Gateway) -> str:
    return gw.key(owner="ops", roles=("admin",))[1]


# ------------------------------------------------------------------ shared memory over gRPC

def grpc_write_attack() -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="echo")
    text = req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.contents.bytes_contents.append(b"hi")
    out = req.outputs.add(name="echo")
    out.parameters["shared_memory_region"].string_param = REGION
    out.parameters["shared_memory_byte_size"].int64_param = REGION_SIZE
    return req


def grpc_read_attack() -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="echo")
    text = req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.parameters["shared_memory_region"].string_param = REGION
    text.parameters["shared_memory_byte_size"].int64_param = 260
    return req


@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip,
                                         grpc.Compression.Deflate])
def test_no_shared_memory_attack_over_grpc_reaches_the_region(
        echo_triton: TritonProcess, gw: Gateway, region: Any, user_key: str,
        compression: grpc.Compression) -> None:
    md = (("authorization", f"Bearer {user_key}"),)
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for attack in (grpc_write_attack(), grpc_read_attack()):
            fill(region)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(attack, metadata=md, compression=compression, timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert contents(region) == PATTERN
        # A stream: the first message is harmless, the second names the region.
        fill(region)
        harmless = service_pb2.ModelInferRequest(model_name="echo")
        harmless.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"x")
        # Within the user cap: echo declares no default_max_tokens, so a capped key must name one.
        harmless.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1]).contents.int_contents.append(4)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.ModelStreamInfer(iter([harmless, grpc_write_attack()]), metadata=md,
                                           compression=compression, timeout=30):
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert contents(region) == PATTERN
    # Control: the same message straight to Triton writes the region.
    with grpc.insecure_channel(f"127.0.0.1:{echo_triton.launch.grpc_port}") as channel:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(grpc_write_attack(), timeout=30)
    assert contents(region) != PATTERN
    fill(region)


# ------------------------------------------------------------------ the role's max_tokens cap

def infer_json(max_tokens: str, name: str = "max_tokens") -> bytes:
    return ('{"inputs": [' + TEXT + ', {"name": "' + name + '", "shape": [1, 1], "datatype": "INT32", "data": ['
            + max_tokens + ']}], "outputs": [{"name": "echo"}]}').encode()


def infer_binary(value: int) -> tuple[bytes, dict[str, str]]:
    head = ('{"inputs": [' + TEXT + ', {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", '
            '"parameters": {"binary_data_size": 4}}], "outputs": [{"name": "echo"}]}').encode()
    return head + struct.pack("<i", value), {"Inference-Header-Content-Length": str(len(head))}


# Every encoding of max_tokens = 200 that Triton reads as 200.
CAP_CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("generate plain", "echo/generate", b'{"text_input": "hi", "max_tokens": 200}', {}),
    ("generate escaped key", "echo/generate", b'{"text_input": "hi", "max\\u005ftokens": 200}', {}),
    ("generate nested in parameters", "echo/generate", b'{"text_input": "hi", "parameters": {"max_tokens": 200}}',
     {}),
    ("generate as a list", "echo/generate", b'{"text_input": "hi", "max_tokens": [[200]]}', {}),
    ("generate wrapped past int32", "echo/generate", b'{"text_input": "hi", "max_tokens": -4294967096}', {}),
    # A generate body names no datatype: Triton casts the number to the model's (INT16 here), -65336 to 200.
    ("generate wrapped past int16", "echo_int16/generate", b'{"text_input": "hi", "max_tokens": -65336}', {}),
    ("generate_stream escaped", "echo_stream/generate_stream",
     b'{"text_input": "hi", "\\u006dax_tokens": 200}', {}),
    ("infer json", "echo/infer", infer_json("200"), {}),
    ("infer json escaped name", "echo/infer", infer_json("[200]", "max\\u005ftokens"), {}),
    ("infer json wrapped", "echo/infer", infer_json("4294967496"), {}),
    # Triton reads a tensor's name as a C string: "max_tokens\0x" is max_tokens to it.
    ("infer json NUL in the name", "echo/infer", infer_json("200", "max_tokens\\u0000x"), {}),
    ("infer binary", "echo/infer", *infer_binary(200)),
    ("infer gzip", "echo/infer", gzip.compress(infer_json("200")), {"Content-Encoding": "gzip"}),
    ("infer deflate", "echo/infer", zlib.compress(infer_json("200", "max\\u005ftokens")),
     {"Content-Encoding": "deflate"}),
]


def echoed_max_tokens(raw: bytes) -> list[int]:
    text = raw.decode()
    answer = json.loads(text.split("data: ", 1)[1]) if text.startswith("data: ") else json.loads(text)
    echo = json.loads(answer["echo"] if "echo" in answer else answer["outputs"][0]["data"][0])
    return list(echo["inputs"]["max_tokens"]["values"])


@pytest.mark.parametrize("name,route,body,headers", CAP_CASES, ids=[c[0] for c in CAP_CASES])
def test_the_role_cap_holds_for_every_encoding_triton_accepts(
        echo_triton: TritonProcess, gw: Gateway, user_key: str, name: str, route: str, body: bytes,
        headers: dict[str, str]) -> None:
    status, _, raw = call(f"{echo_triton.http_url}/v2/models/{route}", "POST", body, headers=headers)
    assert status == 200 and echoed_max_tokens(raw) == [200], (status, raw)   # Triton reads 200
    before = len(audit_records(gw))
    status, _, raw = call(f"{gw.url}/v2/models/{route}", "POST", body, user_key, headers)
    assert status == 400, (status, raw)
    assert wait_for(lambda: any(r["http_status"] == 400 and r["reason"] in
                                ("max_tokens_over_role_cap", "body: max_tokens_not_integer", "body: nul_in_name",
                                 "body: max_tokens_negative")
                                for r in audit_records(gw)[before:]), 5)


def test_under_the_cap_every_encoding_is_served(gw: Gateway, user_key: str) -> None:
    for route, body, headers in (("echo/generate", b'{"text_input": "hi", "max\\u005ftokens": 7}', {}),
                                 ("echo/infer", gzip.compress(infer_json("7")), {"Content-Encoding": "gzip"}),
                                 ("echo/infer", *infer_binary(7))):
        status, _, raw = call(f"{gw.url}/v2/models/{route}", "POST", body, user_key, headers)
        assert status == 200 and echoed_max_tokens(raw) == [7], raw


def grpc_max_tokens(value: int, raw: bool, name: str = "max_tokens") -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="echo")
    text = req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    mt = req.inputs.add(name=name, datatype="INT32", shape=[1, 1])
    if raw:
        req.raw_input_contents.extend([struct.pack("<I", 2) + b"hi", struct.pack("<i", value)])
    else:
        text.contents.bytes_contents.append(b"hi")
        mt.contents.int_contents.append(value)
    return req


def test_the_role_cap_holds_over_grpc(echo_triton: TritonProcess, gw: Gateway, user_key: str) -> None:
    md = (("authorization", f"Bearer {user_key}"),)
    with grpc.insecure_channel(f"127.0.0.1:{echo_triton.launch.grpc_port}") as direct:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(direct).ModelInfer(grpc_max_tokens(200, True), timeout=30)
        assert b'"values": [200]' in answer.raw_output_contents[0]   # Triton reads 200
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for raw in (True, False):
            for compression in (grpc.Compression.NoCompression, grpc.Compression.Gzip):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(grpc_max_tokens(200, raw), metadata=md, compression=compression, timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.ModelInfer(grpc_max_tokens(7, True), metadata=md, timeout=30).model_name == "echo"
        # NUL in the name: Triton reads max_tokens (test_body_view_triton shows it), seekgate refuses the name.
        before = len(audit_records(gw))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(grpc_max_tokens(200, True, "max_tokens\x00x"), metadata=md, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert wait_for(lambda: any(r["reason"] == "body: nul_in_name" for r in audit_records(gw)[before:]), 5)
        # A stream whose first message is under the cap and whose second is over it.
        stream = stub.ModelStreamInfer(iter([grpc_max_tokens(7, True), grpc_max_tokens(200, True)]),
                                       metadata=md, timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT



def shifted_raw_contents() -> service_pb2.ModelInferRequest:
    """temperature read from the region, then max_tokens 200 and an empty text_input as raw contents.

    Triton hands raw_input_contents out in order to the inputs not in a region: max_tokens gets the
    first (200), text_input the second (an empty string, whose 4-byte length reads as 0 in INT32)."""
    req = service_pb2.ModelInferRequest(model_name="echo")
    temperature = req.inputs.add(name="temperature", datatype="FP32", shape=[1, 1])
    temperature.parameters["shared_memory_region"].string_param = REGION
    temperature.parameters["shared_memory_byte_size"].int64_param = 4
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.extend([struct.pack("<i", 200), struct.pack("<I", 0)])
    return req


def test_the_role_cap_holds_when_a_region_input_comes_before_raw_contents(
        echo_triton: TritonProcess, gw: Gateway, region: Any) -> None:
    """A key with the admin role and a capped one (the cap still binds it) reads an input from shared
    memory: the raw contents after it belong to the next inputs, as Triton reads them, not by position."""
    with grpc.insecure_channel(f"127.0.0.1:{echo_triton.launch.grpc_port}") as direct:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(direct).ModelInfer(shifted_raw_contents(), timeout=30)
    assert json.loads(answer.raw_output_contents[0][4:])["inputs"]["max_tokens"]["values"] == [200]   # the control
    md = (("authorization", f"Bearer {gw.key(owner='ops', roles=('admin', 'user'))[1]}"),)
    before = len(audit_records(gw))
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(shifted_raw_contents(), metadata=md,
                                                                          timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert wait_for(lambda: any(r["reason"] == "max_tokens_over_role_cap" for r in audit_records(gw)[before:]), 5)

# ------------------------------------------------------------------ the parameter allowlist

@pytest.mark.parametrize("params,status,word", [
    ('"priority": 1', 403, "priority"),
    ('"sequence\\u005fid": 7, "sequence_start": true', 403, "sequence_id"),
    ('"timeout": 1', 403, "timeout"),
    ('"my_knob": 1', 400, "my_knob"),
    # triton_enable_empty_final_response is allowed (tritonclient sets it itself); other triton_ names are not.
    ('"triton_max_queue_delay": 1', 400, "triton_max_queue_delay"),
])
def test_parameters_outside_the_allowlist_are_refused_by_name(gw: Gateway, user_key: str, admin_key: str,
                                                              params: str, status: int, word: str) -> None:
    body = ('{"parameters": {' + params + '}, "inputs": [' + TEXT + '], "outputs": [{"name": "echo"}]}').encode()
    got, _, raw = call(gw.url + "/v2/models/echo/infer", "POST", body, user_key)
    assert got == status and word in json.loads(raw)["error"], raw
    if status == 403:   # reserved for admins: an admin's request goes through to Triton
        assert call(gw.url + "/v2/models/echo/infer", "POST", body, admin_key)[0] != 403


def test_classifying_a_string_output_is_refused_for_every_key(echo_triton: TritonProcess, gw: Gateway,
                                                              user_key: str, admin_key: str) -> None:
    """Classification of a BYTES output kills tritonserver 2.51 (one request, the whole server): it is
    refused before Triton, whoever asks; numeric outputs stay classifiable (test_limits_e2e)."""
    body = ('{"inputs": [' + TEXT + ', {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [4]}], '
            '"outputs": [{"name": "echo", "parameters": {"classification": 1}}]}').encode()   # under the cap
    for key in (user_key, admin_key):
        before = len(audit_records(gw))
        status, _, raw = call(gw.url + "/v2/models/echo/infer", "POST", body, key)
        assert status == 400 and "'echo' cannot be classified" in json.loads(raw)["error"], raw
        assert wait_for(lambda n=before: any(r["reason"] == "classification_of_non_numeric_output: echo"
                                             for r in audit_records(gw)[n:]), 5)
    assert call(f"{echo_triton.http_url}/v2/health/live", "GET")[0] == 200   # Triton never saw it
    with grpc.insecure_channel(f"127.0.0.1:{gw.settings.server.grpc_port}") as channel:
        req = service_pb2.ModelInferRequest(model_name="echo")
        req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"x")
        req.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1]).contents.int_contents.append(4)
        req.outputs.add(name="echo").parameters["classification"].int64_param = 1
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                req, metadata=(("authorization", f"Bearer {user_key}"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert call(f"{echo_triton.http_url}/v2/health/live", "GET")[0] == 200


def test_a_shape_its_json_data_does_not_fill_is_refused(echo_triton: TritonProcess, gw: Gateway,
                                                        user_key: str) -> None:
    """Triton sizes a JSON tensor's buffer from its shape before reading the data: one value under a shape
    of 10^11 elements kills tritonserver 2.51 (std::bad_alloc). Refused before Triton."""
    huge = '{"name": "temperature", "shape": [1, 100000000000], "datatype": "FP32", "data": [1.0]}'
    body = ('{"inputs": [' + TEXT + ', {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [4]}, '
            + huge + '], "outputs": [{"name": "echo"}]}').encode()
    status, _, raw = call(gw.url + "/v2/models/echo/infer", "POST", body, user_key)
    assert status == 400 and "shape" in json.loads(raw)["error"], raw
    assert call(f"{echo_triton.http_url}/v2/health/live", "GET")[0] == 200


def test_the_allowlist_is_configuration(echo_triton: TritonProcess, tmp_path: Path) -> None:
    g = Gateway(tmp_path, echo_triton.http_url, free_ports(3), **{"body.request_parameters": "my_knob"}).start()
    try:
        key = g.key(owner="knob", roles=("user",))[1]
        body = ('{"parameters": {"my_knob": 1}, "inputs": [' + TEXT + '], "outputs": [{"name": "echo"}]}').encode()
        status, _, raw = call(g.url + "/v2/models/echo/infer", "POST", body, key)
        assert status == 200 and json.loads(json.loads(raw)["outputs"][0]["data"][0])["parameters"] == {"my_knob": 1}
    finally:
        g.stop()
