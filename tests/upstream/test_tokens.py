"""Token counts read from Triton response bodies."""

from __future__ import annotations

import json
import struct

from proxy.upstream import tokens


def test_from_generate() -> None:
    body = json.dumps({"text_output": "x" * 100, "input_tokens": 12, "output_tokens": 7}).encode()
    assert tokens.from_generate(body) == (12, 7)
    assert tokens.from_generate(b'{"error":"nope"}') == (None, None)


def test_from_infer_json() -> None:
    body = json.dumps({"outputs": [
        {"name": "text_output", "datatype": "BYTES", "shape": [1, 1], "data": ["hi"]},
        {"name": "input_tokens", "datatype": "INT32", "shape": [1, 1], "data": [3]},
        {"name": "output_tokens", "datatype": "INT32", "shape": [1, 1], "data": [5]},
    ]}).encode()
    assert tokens.from_infer(body, None) == (3, 5)


def test_from_infer_binary_extension() -> None:
    text = struct.pack("<I", 2) + b"hi"
    header = json.dumps({"outputs": [
        {"name": "text_output", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(text)}},
        {"name": "input_tokens", "datatype": "INT32", "shape": [1, 1], "parameters": {"binary_data_size": 4}},
        {"name": "output_tokens", "datatype": "INT32", "shape": [1, 1], "parameters": {"binary_data_size": 4}},
    ]}).encode()
    body = header + text + struct.pack("<i", 9) + struct.pack("<i", 4)
    assert tokens.from_infer(body, len(header)) == (9, 4)


def test_from_infer_garbage_is_none() -> None:
    assert tokens.from_infer(b"not json output_tokens", None) == (None, None)
    assert tokens.from_infer(b"{}", None) == (None, None)


def test_sse_counter_across_chunk_boundaries() -> None:
    events = b"".join(b'data: {"text_output":"a","input_tokens":4,"output_tokens":%d}\n\n' % n for n in range(1, 6))
    counter = tokens.SseTokenCounter()
    for i in range(0, len(events), 7):
        counter.feed(events[i:i + 7])
    assert (counter.input_tokens, counter.output_tokens) == (4, 5)


def test_inflated_copy_for_counting() -> None:
    import gzip
    import zlib
    body = json.dumps({"input_tokens": 5, "output_tokens": 2}).encode()
    assert tokens.inflated(gzip.compress(body), "gzip", 1 << 20) == body
    assert tokens.inflated(zlib.compress(body), "deflate", 1 << 20) == body
    assert tokens.inflated(body, None, 1 << 20) == body
    # Past the limit, truncated, garbage or an unknown coding: unreadable, never a partial count.
    assert tokens.inflated(gzip.compress(b"x" * 4096), "gzip", 1024) is None
    assert tokens.inflated(gzip.compress(body)[:-4], "gzip", 1 << 20) is None
    assert tokens.inflated(b"not gzip", "gzip", 1 << 20) is None
    assert tokens.inflated(body, "br", 1 << 20) is None
