"""Differential: seekgate's parsed view of a body equals what the real Triton hands the model.

Hypothesis writes request bodies the way an attacker who knows both parsers would: keys and strings
with random JSON escapes, unicode, number forms, duplicate keys, fields nested in generate's
"parameters", gzip and deflate, binary tensors behind Inference-Header-Content-Length. Each body
goes through `body_view` and, unchanged, to a real tritonserver serving tests/models/echo, which
answers with the parameters and inputs it received. Where seekgate admits a body that Triton
serves, every parameter and max_tokens must read the same on both sides; where seekgate refuses,
nothing is forwarded (fail closed). Any disagreement fails.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import urllib.error
import urllib.request
import zlib
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from proxy.errors import BadRequest
from proxy.local.triton import TritonProcess
from proxy.steps.body_view import BodyView, decode, view_grpc, view_http

CAP = 1 << 20
ECHO_INPUTS = frozenset({"text_input", "max_tokens", "temperature", "INPUT0"})
# Parameter names: plain, dotted, non-ASCII, astral; none Triton consumes itself (priority, timeout, ...).
NAMES = st.sampled_from(["p", "note", "top_k", "x.y", "a-b", "caf\u00e9", "\u6a21\u578b", "e\U0001f600", "rep"])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
SCALARS = st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1), st.booleans(), TEXT,
                    st.floats(allow_nan=False, allow_infinity=False, width=64))
MAX_TOKENS = st.one_of(st.integers(-3, 600), st.integers(-(2 ** 33), 2 ** 33))


# ------------------------------------------------------------------ a JSON writer with the attacker's freedom

@st.composite
def written(draw: st.DrawFn, value: Any) -> str:
    """`value` as JSON text, each string char maybe \\u-escaped, numbers in several spellings."""
    space = draw(st.sampled_from(["", " ", "\n\t "]))
    if isinstance(value, dict):
        items = [f"{draw(written(k))}{space}:{space}{draw(written(v))}" for k, v in value.items()]
        return "{" + space + ("," + space).join(items) + space + "}"
    if isinstance(value, list):
        return "[" + ",".join(draw(written(v)) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return draw(st.sampled_from([str(value), "-0" if value == 0 else str(value)]))
    if isinstance(value, float):
        return draw(st.sampled_from([repr(value), f"{value:.17e}"]))
    out = []
    for ch in value:
        how = draw(st.sampled_from(["plain", "plain", "u", "U"]))
        if ch in '"\\' or ord(ch) < 0x20 or how != "plain":
            units = ch.encode("utf-16-be")
            for i in range(0, len(units), 2):
                code = f"{units[i]:02x}{units[i + 1]:02x}"
                out.append("\\u" + (code.upper() if how == "U" else code))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@st.composite
def generate_body(draw: st.DrawFn) -> str:
    doc: dict[str, Any] = {"text_input": draw(TEXT)}
    nested: dict[str, Any] = {}
    if draw(st.booleans()):
        mt = draw(st.one_of(MAX_TOKENS, st.lists(MAX_TOKENS, min_size=1, max_size=1)))
        (nested if draw(st.booleans()) else doc)["max_tokens"] = mt
    for name in draw(st.lists(NAMES, max_size=3, unique=True)):
        (nested if draw(st.booleans()) else doc)[name] = draw(SCALARS)
    if nested:
        doc["parameters"] = nested
    text = draw(written(doc))
    if draw(st.integers(0, 9)) == 0:   # a duplicate key spliced in, as an attacker would
        key = draw(st.sampled_from(["max_tokens", "text_input", "p"]))
        text = text[:-1] + ("," if len(text) > 2 else "") + f'"{key}": 7}}'
    return text


@st.composite
def infer_body(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 infer body for echo: JSON, binary tensors, then maybe gzip/deflate."""
    params = {name: draw(SCALARS) for name in draw(st.lists(NAMES, max_size=3, unique=True))}
    text = draw(TEXT).encode()
    inputs: list[dict[str, Any]] = []
    binary = b""
    use_binary = draw(st.booleans())
    if use_binary:
        inputs.append({"name": "text_input", "shape": [1, 1], "datatype": "BYTES",
                       "parameters": {"binary_data_size": 4 + len(text)}})
        binary += struct.pack("<I", len(text)) + text
    else:
        inputs.append({"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [text.decode()]})
    if draw(st.booleans()):
        mt = draw(MAX_TOKENS)
        if use_binary and -(2 ** 31) <= mt < 2 ** 31:
            inputs.append({"name": "max_tokens", "shape": [1, 1], "datatype": "INT32",
                           "parameters": {"binary_data_size": 4}})
            binary += struct.pack("<i", mt)
        else:
            inputs.append({"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [[mt]]})
    doc: dict[str, Any] = {"inputs": inputs, "outputs": [{"name": "echo"}]}
    if params:
        doc["parameters"] = params
    head = draw(written(doc)).encode()
    body, headers = head + binary, {"Content-Type": "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    coding = draw(st.sampled_from(["", "", "gzip", "deflate"]))
    if coding:
        body = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
        headers["Content-Encoding"] = coding
    return body, headers


# ------------------------------------------------------------------ both sides

def seekgate_view(kind: str, body: bytes, headers: dict[str, str]) -> BodyView | None:
    encodings = [headers["Content-Encoding"]] if "Content-Encoding" in headers else []
    lengths = [headers["Inference-Header-Content-Length"]] if "Inference-Header-Content-Length" in headers else []
    try:
        return view_http(kind, decode(body, encodings, kind, CAP), lengths)
    except BadRequest:
        return None


def triton_echo(triton: TritonProcess, route: str, body: bytes, headers: dict[str, str]) -> dict[str, Any] | None:
    """What the echo model received, or None where Triton refused the request."""
    req = urllib.request.Request(triton.http_url + route, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError:
        return None
    raw = answer["echo"] if "echo" in answer else answer["outputs"][0]["data"][0]
    return json.loads(raw)


def same_value(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return isinstance(theirs, (int, float)) and not isinstance(theirs, bool) \
            and math.isclose(float(ours), float(theirs), rel_tol=1e-15, abs_tol=0.0)
    return type(ours) is type(theirs) and ours == theirs


def assert_same(view: BodyView, echo: dict[str, Any], kind: str) -> None:
    where = "generate" if kind == "generate" else "request"
    ours = {p.key: p.value for p in view.parameters if p.where == where and p.key not in ECHO_INPUTS}
    theirs = echo["parameters"]
    assert sorted(ours) == sorted(theirs), (ours, theirs)
    for key, value in ours.items():
        assert same_value(value, theirs[key]), (key, value, theirs[key])
    received = echo["inputs"].get("max_tokens")
    assert (view.max_tokens is None) == (received is None), (view.max_tokens, received)
    if received is not None:
        assert list(view.max_tokens or ()) == received["values"]
    if kind == "generate":   # strings: the bytes the model got are the UTF-8 of what seekgate read
        text = next(p.value for p in view.parameters if p.key == "text_input")
        assert echo["inputs"]["text_input"]["values"] == [text.encode().decode("latin-1")]


EXAMPLES = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@EXAMPLES
@given(body=generate_body(), stream=st.booleans())
def test_generate_bodies_read_the_same(echo_triton: TritonProcess, body: str, stream: bool) -> None:
    route = "/v2/models/echo_stream/generate_stream" if stream else "/v2/models/echo/generate"
    raw, headers = body.encode(), {"Content-Type": "application/json"}
    view = seekgate_view("generate", raw, headers)
    if stream:
        if view is not None:   # the SSE answer: one event with the echo
            req = urllib.request.Request(echo_triton.http_url + route, data=raw, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    event = r.read().decode().split("data: ", 1)[1]
            except urllib.error.HTTPError:
                return
            data = json.loads(event)
            if "echo" in data:
                assert_same(view, json.loads(data["echo"]), "generate")
        return
    echo = triton_echo(echo_triton, route, raw, headers)
    if view is not None and echo is not None:
        assert_same(view, echo, "generate")


@EXAMPLES
@given(case=infer_body())
def test_infer_bodies_read_the_same(echo_triton: TritonProcess, case: tuple[bytes, dict[str, str]]) -> None:
    body, headers = case
    view = seekgate_view("infer", body, headers)
    echo = triton_echo(echo_triton, "/v2/models/echo/infer", body, headers)
    if view is not None and echo is not None:
        assert_same(view, echo, "infer")


# Deterministic cases: each encoding the issue names, admitted and read as Triton reads it.
KNOWN = [
    ("generate", '{"text_input": "hi", "max\\u005ftokens": 200}', {}),
    ("generate", '{"text_input": "hi", "parameters": {"max_tokens": 200, "n\\u00f6te": "x"}}', {}),
    ("generate", '{"text_input": "h\\u00e9", "max_tokens": [[200]], "p": 1.5, "q": true}', {}),
    ("infer", gzip.compress(b'{"inputs": [{"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", '
                            b'"data": [200]}], "parameters": {"p": "\\u00e9"}}'), {"Content-Encoding": "gzip"}),
    ("infer", zlib.compress(b'{"inputs": [{"name": "max\\u005ftokens", "shape": [1, 1], "datatype": "INT32", '
                            b'"data": [[200]]}]}'), {"Content-Encoding": "deflate"}),
]


@pytest.mark.parametrize("kind,body,headers", KNOWN)
def test_known_encodings_are_admitted_and_read_as_triton_reads_them(
        echo_triton: TritonProcess, kind: str, body: str | bytes, headers: dict[str, str]) -> None:
    raw = body.encode() if isinstance(body, str) else body
    view = seekgate_view(kind, raw, headers)
    echo = triton_echo(echo_triton, f"/v2/models/echo/{kind}", raw, headers)
    assert view is not None and echo is not None
    assert view.max_tokens == (200,) or "max_tokens" not in json.dumps(echo["inputs"])
    assert_same(view, echo, kind)


# NUL in a tensor's name or datatype: Triton passes them on as C strings, cut at the NUL, so each of these
# reaches the model as a tensor seekgate's whole-string reading does not see (max_tokens above all).
MT_NUL_NAME = ('{"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}, '
               '{"name": "max_tokens\\u0000x", "shape": [1, 1], "datatype": "INT32", "data": [200]}]}')
MT_NUL_BINARY = (b'{"inputs": [{"name": "max_tokens\\u0000", "shape": [1, 1], "datatype": "INT32", '
                 b'"parameters": {"binary_data_size": 4}}]}')
NUL_CASES = [
    ("input name", MT_NUL_NAME.encode(), {}),
    ("input name, gzip", gzip.compress(MT_NUL_NAME.encode()), {"Content-Encoding": "gzip"}),
    ("input name, binary", MT_NUL_BINARY + struct.pack("<i", 200),
     {"Inference-Header-Content-Length": str(len(MT_NUL_BINARY))}),
    ("output name", b'{"inputs": [{"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [200]}], '
                    b'"outputs": [{"name": "echo\\u0000zz"}]}', {}),
]


@pytest.mark.parametrize("name,body,headers", NUL_CASES, ids=[c[0] for c in NUL_CASES])
def test_nul_in_a_tensor_name_is_refused_as_triton_cuts_it_there(
        echo_triton: TritonProcess, name: str, body: bytes, headers: dict[str, str]) -> None:
    echo = triton_echo(echo_triton, "/v2/models/echo/infer", body, {"Content-Type": "application/json", **headers})
    assert echo is not None and echo["inputs"]["max_tokens"]["values"] == [200], echo   # Triton runs max_tokens 200
    assert seekgate_view("infer", body, headers) is None


def test_nul_in_a_grpc_tensor_name_is_refused_as_triton_cuts_it_there(echo_triton: TritonProcess) -> None:
    request = service_pb2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hi")
    request.inputs.add(name="max_tokens\x00x", datatype="INT32", shape=[1, 1]).contents.int_contents.append(200)
    with grpc.insecure_channel(f"127.0.0.1:{echo_triton.launch.grpc_port}") as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    echo = json.loads(answer.raw_output_contents[0][4:])
    assert echo["inputs"]["max_tokens"]["values"] == [200], echo   # Triton runs max_tokens 200
    with pytest.raises(BadRequest, match="nul_in_name"):
        view_grpc(request)
    for field in ("output", "parameter"):
        request = service_pb2.ModelInferRequest(model_name="echo")
        if field == "output":
            request.outputs.add(name="echo\x00zz")
        else:
            request.parameters["binary_data_output\x00"].bool_param = True
        with pytest.raises(BadRequest, match="nul_in_"):
            view_grpc(request)
