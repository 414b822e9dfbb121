"""body_view: one parse of an inference body, as Triton reads it; what it cannot read exactly is refused."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import pytest
from tritonclient.grpc import service_pb2

from proxy.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from proxy.steps.body_view import (
    DECODE_STEP,
    EMPTY,
    UNFILLED_ELEMENTS_MAX,
    BodyView,
    Parameter,
    decode,
    parse_json,
    route_kind,
    view_grpc,
    view_http,
)

CAP = 1 << 20


def gen(body: bytes | str) -> BodyView:
    return view_http("generate", body.encode() if isinstance(body, str) else body, [])


def infer(body: bytes | str, header_length: int | None = None) -> BodyView:
    raw = body.encode() if isinstance(body, str) else body
    return view_http("infer", raw, [] if header_length is None else [str(header_length)])


def refused(reason: str, fn, *args) -> BadRequest:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest) as info:
        fn(*args)
    assert info.value.reason.startswith(f"body: {reason}"), info.value.reason
    return info.value


def keys(view: BodyView) -> list[tuple[str, str, str]]:
    return [(p.where, p.tensor, p.key) for p in view.parameters]


# ------------------------------------------------------------------ routes and encodings

def test_route_kinds() -> None:
    assert route_kind("/v2/models/m/generate") == route_kind("/v2/models/m/generate_stream") == "generate"
    assert route_kind("/v2/models/m/versions/1/infer") == "infer"
    assert route_kind("/v2/models/m/ready") == ""


@pytest.mark.parametrize("coding,packed", [
    ("gzip", gzip.compress(b'{"a": 1}')),
    ("deflate", zlib.compress(b'{"a": 1}')),    # zlib framing
    ("deflate", gzip.compress(b'{"a": 1}')),    # Triton's deflate takes gzip framing too
    ("identity", b'{"a": 1}'),
])
def test_decode_undoes_what_triton_undoes_on_infer(coding: str, packed: bytes) -> None:
    assert decode(packed, [coding], "infer", CAP) == b'{"a": 1}'


@pytest.mark.parametrize("kind,coding", [("generate", "gzip"), ("generate", "deflate"), ("generate", ""),
                                         ("generate", "IDENTITY"), ("infer", "GZIP"), ("infer", "br"),
                                         ("infer", "x-gzip"), ("infer", "gzip, identity"), ("infer", "")])
def test_encodings_triton_refuses_are_415(kind: str, coding: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode(gzip.compress(b"{}"), [coding], kind, CAP)
    assert info.value.http_status == 415


def test_two_content_encoding_headers_are_refused() -> None:
    refused("several_content_encodings", decode, b"{}", ["identity", "gzip"], "infer", CAP)


def test_compressed_bodies_that_two_inflaters_could_read_differently_are_refused() -> None:
    # Triton inflates the first gzip member and ignores the rest; gzip.decompress would read both.
    two_members = gzip.compress(b'{"inputs": []') + gzip.compress(b', "x": 1}')
    refused("data_after_compressed_body", decode, two_members, ["gzip"], "infer", CAP)
    refused("data_after_compressed_body", decode, gzip.compress(b"{}") + b"junk", ["gzip"], "infer", CAP)
    refused("truncated_compressed_body", decode, gzip.compress(b'{"a": 1}')[:-6], ["gzip"], "infer", CAP)
    refused("malformed_compressed_body", decode, b"\x1f\x8b not gzip", ["gzip"], "infer", CAP)
    raw_deflate = zlib.compressobj(wbits=-15)
    refused("malformed_compressed_body", decode, raw_deflate.compress(b"{}") + raw_deflate.flush(),
            ["deflate"], "infer", CAP)


@pytest.mark.parametrize("size", [DECODE_STEP - 1, DECODE_STEP, DECODE_STEP + 1, 10 * DECODE_STEP, 900_000])
def test_decode_inflates_in_steps_to_the_last_byte(size: int) -> None:
    """Output is taken DECODE_STEP at a time: what the inflater holds back after the last input byte counts."""
    raw = b"a" * size
    assert decode(gzip.compress(raw), ["gzip"], "infer", CAP) == raw
    assert decode(zlib.compress(raw), ["deflate"], "infer", CAP) == raw


def test_a_compression_bomb_stops_at_the_cap() -> None:
    with pytest.raises(PayloadTooLarge):
        decode(gzip.compress(b"0" * (8 * CAP)), ["gzip"], "infer", CAP)


# ------------------------------------------------------------------ JSON as rapidjson reads it

def test_escapes_are_decoded_before_any_check() -> None:
    view = infer('{"outputs": [{"name": "o", "parameters": {"shared\\u005fmemory_region": "r1"}}]}')
    assert keys(view) == [("output", "o", "shared_memory_region")]
    assert gen('{"text_input": "x", "max\\u005ftokens": 200}').max_tokens == (200,)


@pytest.mark.parametrize("body,reason", [
    ('{"max_tokens": 1, "max_tokens": 200}', "duplicate_key"),
    ('{"parameters": {"a": 1}, "parameters": {"shared_memory_region": "r"}}', "duplicate_key"),
    ('{"text_input": "x", "parameters": {"max_tokens": 200}, "max_tokens": 3}', "duplicate_key"),
    ('{"max_tokens\\u0000": 3}', "nul_in_key"),
    ('{"text_input": "\\ud800"}', "lone_surrogate"),
    ('{"text_input": "x"} {"text_input": "y"}', "malformed_json"),
    ('{"text_input": "x" /* c */}', "malformed_json"),
    ('{"t": Inf}', "malformed_json"),
    ('[1]', "json_not_object"),
    ('{"parameters": [1]}', "parameters_not_object"),
])
def test_json_two_parsers_could_read_differently_is_refused(body: str, reason: str) -> None:
    refused(reason, gen, body)


def test_non_utf8_bom_and_deep_nesting_are_refused() -> None:
    refused("not_utf8", gen, b'{"text_input": "\xff"}')
    refused("byte_order_mark", gen, b'\xef\xbb\xbf{"text_input": "x"}')
    refused("json_too_deep", gen, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_deep_nesting_around_a_lone_surrogate_is_a_refusal_at_every_depth() -> None:
    # The decoder takes nesting up to near the recursion limit; the surrogate walk must not overrun it.
    import sys
    for depth in range(sys.getrecursionlimit() - 120, sys.getrecursionlimit() + 20):
        body = '{"text_input": "hi", "p": ' + "[" * depth + '"\\ud800"' + "]" * depth + "}"
        with pytest.raises(BadRequest) as info:
            gen(body)
        assert info.value.reason in ("body: json_too_deep", "body: lone_surrogate"), depth


def test_json_never_guesses_utf16() -> None:
    refused("not_utf8", gen, '{"max_tokens": 200}'.encode("utf-16"))


def test_nan_and_infinity_parse_as_triton_parses_them() -> None:
    view = gen('{"text_input": "x", "temperature": NaN, "top_p": -Infinity}')
    assert [p.key for p in view.parameters] == ["text_input", "temperature", "top_p"]


def test_parse_json_returns_the_object() -> None:
    assert parse_json(b' {"a": [1, {"b": "\\u00e9"}]} ') == {"a": [1, {"b": "\u00e9"}]}


# ------------------------------------------------------------------ generate

def test_generate_fields_and_nested_parameters_are_all_seen() -> None:
    view = gen('{"text_input": "x", "temperature": 0.5, "parameters": {"max_tokens": 7, "priority": 3}}')
    assert keys(view) == [("generate", "", k) for k in ("text_input", "temperature", "max_tokens", "priority")]
    assert view.max_tokens == (7,) and view.asked_tokens() == 7


@pytest.mark.parametrize("value,want", [("200", (200,)), ("-0", (0,)), ("[[3], [4]]", (3, 4)), ("[9]", (9,))])
def test_generate_max_tokens_values(value: str, want: tuple[int, ...]) -> None:
    assert gen('{"text_input": "x", "max_tokens": ' + value + "}").max_tokens == want


@pytest.mark.parametrize("value", ["4294967297", "-4294967096", "2147483648", "7.0", "1e2", '"9"', "true",
                                   "null", '{"a": 1}', "[1.5]"])
def test_generate_max_tokens_that_triton_would_wrap_or_reject_is_refused(value: str) -> None:
    refused("max_tokens_not_integer", gen, '{"text_input": "x", "max_tokens": ' + value + "}")


@pytest.mark.parametrize("value", ["-5", "-65336", "[[3], [-1]]"])
def test_generate_max_tokens_below_zero_is_refused(value: str) -> None:
    # No datatype named: Triton casts to the model's, and an INT16 max_tokens reads -65336 as 200.
    refused("max_tokens_negative", gen, '{"text_input": "x", "max_tokens": ' + value + "}")


def test_asked_tokens_sums_rows_and_ignores_negatives() -> None:
    assert BodyView(max_tokens=(3, -4, 5)).asked_tokens() == 8
    assert EMPTY.asked_tokens() is None


# ------------------------------------------------------------------ infer, JSON and binary

def test_infer_parameters_at_every_level() -> None:
    body = {"parameters": {"binary_data_output": True},
            "inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"],
                        "parameters": {"q": 1}}],
            "outputs": [{"name": "o", "parameters": {"binary_data": False}}]}
    assert keys(infer(json.dumps(body))) == [("request", "", "binary_data_output"), ("input", "text_input", "q"),
                                             ("output", "o", "binary_data")]


def test_infer_max_tokens_from_json_data() -> None:
    body = {"inputs": [{"name": "max_tokens", "shape": [2, 1], "datatype": "INT32", "data": [[5], [7]]}]}
    assert infer(json.dumps(body)).max_tokens == (5, 7)
    assert infer('{"inputs": [{"name": "text_input", "data": ["max_tokens"]}]}').max_tokens is None


@pytest.mark.parametrize("datatype,value", [("INT32", 2 ** 31), ("INT32", -(2 ** 31) - 1), ("UINT8", 256),
                                            ("INT64", 2 ** 63), ("UINT32", -1), ("INT32", 7.0), ("FP32", 7),
                                            ("", 7)])
def test_infer_max_tokens_outside_its_datatype_is_refused(datatype: str, value: object) -> None:
    body = {"inputs": [{"name": "max_tokens", "shape": [1], "datatype": datatype, "data": [value]}]}
    refused("max_tokens_not_integer", infer, json.dumps(body))


def binary(inputs: list[tuple[str, str, bytes]]) -> tuple[bytes, int]:
    head = json.dumps({"inputs": [{"name": n, "shape": [1, len(d) // 4 or 1], "datatype": t,
                                   "parameters": {"binary_data_size": len(d)}} for n, t, d in inputs]}).encode()
    return head + b"".join(d for _, _, d in inputs), len(head)


def test_infer_max_tokens_from_binary_tensors_after_other_binary_inputs() -> None:
    body, head = binary([("text_input", "BYTES", struct.pack("<I", 2) + b"hi"),
                         ("max_tokens", "INT32", struct.pack("<ii", 12, -3))])
    assert infer(body, head).max_tokens == (12, -3)
    body, head = binary([("max_tokens", "UINT64", struct.pack("<Q", 2 ** 40))])
    assert infer(body, head).max_tokens == (2 ** 40,)


def test_binary_framing_that_does_not_add_up_is_refused() -> None:
    body, head = binary([("max_tokens", "INT32", struct.pack("<i", 12))])
    refused("binary_data_size_mismatch", infer, body + b"extra", head)
    refused("binary_data_short", infer, body[:-1], head)
    refused("malformed_json", infer, body, head - 1)   # the JSON header cut short
    for bad_length in ("12abc", " 1 2", "+5", "-0", "0x10", "\u0661\u0662", str(len(body) + 1)):
        refused("bad_header_length", view_http, "infer", body, [bad_length])
    refused("several_header_lengths", view_http, "infer", body, [str(head), str(head)])
    body, head = binary([("max_tokens", "FP32", struct.pack("<f", 12.0))])
    refused("max_tokens_not_integer", infer, body, head)


def test_header_length_zero_is_a_raw_binary_request() -> None:
    assert view_http("infer", b"\x00\x01raw tensor bytes", ["0"]) == EMPTY


def test_an_empty_body_without_header_length_is_a_raw_binary_request() -> None:
    """As Triton reads it (not JSON): it answers "Raw request must only have 1 input" for a model of several."""
    assert view_http("infer", b"", []) == EMPTY
    refused("malformed_json", view_http, "generate", b"", [])   # generate has no raw form


def test_duplicate_inputs_are_refused() -> None:
    body = {"inputs": [{"name": "max_tokens", "datatype": "INT32", "data": [1]},
                       {"name": "max_tokens", "datatype": "INT32", "data": [200]}]}
    refused("duplicate_input", infer, json.dumps(body))


def test_json_data_must_not_claim_a_shape_far_beyond_it() -> None:
    # Triton sizes the buffer from the shape first: 10^11 INT32 elements kill it (std::bad_alloc).
    huge = {"name": "temperature", "shape": [1, 10 ** 11], "datatype": "FP32", "data": [1.0]}
    refused("shape_data_mismatch", infer, json.dumps({"inputs": [huge]}))
    over = {"name": "x", "shape": [UNFILLED_ELEMENTS_MAX + 2], "datatype": "INT32", "data": [1]}
    refused("shape_data_mismatch", infer, json.dumps({"inputs": [over]}))
    # A small mismatch is Triton's to refuse, in its own words (tests/frontend/test_conformance.py).
    short = {"name": "max_tokens", "shape": [2, 1], "datatype": "INT32", "data": [[4]]}
    assert infer(json.dumps({"inputs": [short]})).max_tokens == (4,)
    assert infer(json.dumps({"inputs": [{**over, "shape": [UNFILLED_ELEMENTS_MAX + 1]}]}))
    assert infer(json.dumps({"inputs": [{**short, "data": [[4], [5]]}]})).max_tokens == (4, 5)
    # Binary and shared-memory tensors carry no `data`; shapes Triton refuses itself are left to it.
    assert infer(json.dumps({"inputs": [{**huge, "shape": "1"}, {"name": "x", "shape": [-1], "data": [1]}]}))


def test_duplicate_outputs_are_refused() -> None:
    # Triton answers the first (classified: no count comes back); a view keeping the last would think the
    # count readable, and a gRPC stream of such messages would go uncharged beside one plain message.
    outputs = [{"name": "output_tokens", "parameters": {"classification": 1}}, {"name": "output_tokens"},
               {"name": "input_tokens"}]
    refused("duplicate_output", infer, json.dumps({"inputs": [], "outputs": outputs}))


# ------------------------------------------------------------------ gRPC

def grpc_request(**params: object) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="m")
    for key, value in params.items():
        if isinstance(value, str):
            req.parameters[key].string_param = value
        else:
            req.parameters[key].int64_param = int(value)  # type: ignore[call-overload]
    return req


def test_grpc_parameters_at_every_level() -> None:
    req = grpc_request(priority=3, note="x")
    inp = req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    inp.parameters["shared_memory_region"].string_param = "r1"
    out = req.outputs.add(name="o")
    out.parameters["classification"].int64_param = 2
    view = view_grpc(req)
    assert set(view.parameters) == {Parameter("request", "", "priority", 3), Parameter("request", "", "note", "x"),
                                    Parameter("input", "text_input", "shared_memory_region", "r1"),
                                    Parameter("output", "o", "classification", 2)}


def test_grpc_max_tokens_raw_and_typed() -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    req.raw_input_contents.extend([struct.pack("<I", 2) + b"hi", struct.pack("<i", 13)])
    assert view_grpc(req).max_tokens == (13,)
    typed = service_pb2.ModelInferRequest(model_name="m")
    typed.inputs.add(name="max_tokens", datatype="INT64", shape=[2]).contents.int64_contents.extend([2, 4])
    assert view_grpc(typed).asked_tokens() == 6
    floats = service_pb2.ModelInferRequest(model_name="m")
    floats.inputs.add(name="max_tokens", datatype="FP32", shape=[1]).contents.fp32_contents.append(9.0)
    refused("max_tokens_not_integer", view_grpc, floats)
    assert view_grpc(service_pb2.ModelInferRequest(model_name="m")) == EMPTY
    assert view_grpc(service_pb2.ModelConfigRequest(name="m")) == EMPTY


@pytest.mark.parametrize("datatype, field, value", [
    ("INT32", "int64_contents", 2**32 + 200), ("INT32", "int64_contents", -(2**31) - 1),
    ("INT8", "int_contents", 200), ("UINT32", "int64_contents", -1), ("UINT8", "uint_contents", 256),
])
def test_grpc_typed_max_tokens_outside_its_datatype_is_refused(datatype: str, field: str, value: int) -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    getattr(req.inputs.add(name="max_tokens", datatype=datatype, shape=[1]).contents, field).append(value)
    refused("max_tokens_not_integer", view_grpc, req)


def test_grpc_typed_max_tokens_must_have_an_integer_datatype() -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    req.inputs.add(name="max_tokens", datatype="FP32", shape=[1]).contents.int_contents.append(4)
    refused("max_tokens_not_integer", view_grpc, req)


def test_grpc_duplicate_inputs_are_refused() -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(200)
    refused("duplicate_input", view_grpc, req)


def test_grpc_duplicate_outputs_are_refused() -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    req.outputs.add(name="output_tokens").parameters["classification"].int64_param = 1
    req.outputs.add(name="output_tokens")
    req.outputs.add(name="input_tokens")
    refused("duplicate_output", view_grpc, req)


# ------------------------------------------------------------------ the meter's bound

def test_prompt_bytes_and_hidden_counts_over_every_shape() -> None:
    assert (gen('{"text_input": "h\\u00e9llo", "max_tokens": 3}').prompt_bytes, gen('{"text_input": "hi"}').prompts) \
        == (6, 1)
    assert gen('{"text_input": "hi"}').prompt_bound() == 2 + 64
    text = {"name": "text_input", "shape": [2, 1], "datatype": "BYTES", "data": [["ab"], ["cde"]]}
    view = infer(json.dumps({"inputs": [text]}))
    assert (view.prompt_bytes, view.prompts, view.counts_hidden) == (5, 2, False)
    raw = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 3) + b"cde"
    header = json.dumps({"inputs": [{"name": "text_input", "shape": [2, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    assert (infer(header + raw, len(header)).prompt_bytes, infer(header + raw, len(header)).prompts) == (len(raw), 2)

    def outputs(*outs: dict[str, object]) -> bool:
        return infer(json.dumps({"inputs": [text], "outputs": list(outs)})).counts_hidden
    assert outputs({"name": "text_output"})
    assert outputs({"name": "input_tokens"}, {"name": "output_tokens", "parameters": {"classification": 1}})
    assert not outputs({"name": "input_tokens"}, {"name": "output_tokens", "parameters": {"binary_data": True}})
    req = service_pb2.ModelInferRequest(model_name="m")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
    assert (view_grpc(req).prompt_bytes, view_grpc(req).counts_hidden) == (5, False)
    req.outputs.add(name="text_output")
    assert view_grpc(req).counts_hidden
