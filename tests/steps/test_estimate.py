"""Tests for proxy.estimate: the max_tokens a request asks for, in every body shape clients send."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2

from proxy.steps.estimate import from_grpc, from_http

GEN = "/v2/models/deepseek/generate"
INFER = "/v2/models/deepseek/infer"


def test_generate_body() -> None:
    assert from_http(GEN, json.dumps({"text_input": "hi", "max_tokens": 32}).encode(), None) == 32
    assert from_http(GEN + "_stream", b'{"text_input": "hi", "max_tokens": [[3], [4]]}', None) == 7
    assert from_http(GEN, b'{"text_input": "hi"}', None) is None
    assert from_http(GEN, b'{"text_input": "max_tokens"}', None) is None
    for junk in (b"", b"not json", b'{"max_tokens": ', b'["max_tokens"]', b'{"max_tokens": "9"}',
                 b'{"max_tokens": true}'):
        assert from_http(GEN, junk, None) is None


@pytest.mark.parametrize("binary", [False, True])
def test_infer_body_json_and_binary_built_by_tritonclient(binary: bool) -> None:
    text = httpclient.InferInput("text_input", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a" * 100], [b"b"]], dtype=np.object_), binary_data=binary)
    mt = httpclient.InferInput("max_tokens", [2, 1], "INT32")
    mt.set_data_from_numpy(np.array([[5], [7]], dtype=np.int32), binary_data=binary)
    body, header_length = httpclient.InferenceServerClient.generate_request_body([text, mt])
    assert from_http(INFER, body, None if header_length is None else str(header_length)) == 12


def test_infer_without_max_tokens() -> None:
    assert from_http(INFER, b'{"inputs": [{"name": "text_input", "data": ["max_tokens"]}]}', None) is None


def test_grpc_raw_and_typed_contents() -> None:
    req = service_pb2.ModelInferRequest(model_name="deepseek")
    req.inputs.add(name="text_input", datatype="BYTES").shape.extend([1, 1])
    req.raw_input_contents.append(b"\x02\x00\x00\x00hi")
    req.inputs.add(name="max_tokens", datatype="INT32").shape.extend([2, 1])
    req.raw_input_contents.append(np.array([9, 4], dtype=np.int32).tobytes())
    assert from_grpc(req) == 13
    typed = service_pb2.ModelInferRequest(model_name="deepseek")
    typed.inputs.add(name="max_tokens", datatype="INT64").contents.int64_contents.extend([6])
    assert from_grpc(typed) == 6
    assert from_grpc(service_pb2.ModelInferRequest(model_name="deepseek")) is None
    assert from_grpc(service_pb2.ModelConfigRequest(name="deepseek")) is None
