"""The DeepSeek model on the real tritonserver: infer, generate, streams, batching, bad input."""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from proxy.local.triton import TritonProcess


def post(triton: TritonProcess, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(triton.http_url + path, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def generate(triton: TritonProcess, text: str, max_tokens: int, model: str = "deepseek") -> dict[str, Any]:
    status, body = post(triton, f"/v2/models/{model}/generate", {"text_input": text, "max_tokens": max_tokens})
    assert status == 200, body
    return json.loads(body)


def stream_events(triton: TritonProcess, body: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(triton.http_url + "/v2/models/deepseek_stream/generate_stream",
                                 data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    return [json.loads(chunk[len("data: "):]) for chunk in raw.split("\n\n") if chunk.startswith("data: ")]


def infer_inputs(module: Any, text: str, max_tokens: int) -> list[Any]:
    text_input = module.InferInput("text_input", [1, 1], "BYTES")
    text_input.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    limit = module.InferInput("max_tokens", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [text_input, limit]


def test_generate_plain_http(triton: TritonProcess) -> None:
    out = generate(triton, "Hello world", 6)
    assert out["output_tokens"] == 6 and out["input_tokens"] >= 1 and out["text_output"]


def test_infer_tritonclient_http_and_grpc_agree_with_generate(triton: TritonProcess) -> None:
    expected = generate(triton, "The quick brown fox", 7)
    http = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    result = http.infer("deepseek", infer_inputs(httpclient, "The quick brown fox", 7))
    assert result.as_numpy("text_output")[0, 0].decode() == expected["text_output"]
    assert result.as_numpy("output_tokens")[0, 0] == 7
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.launch.grpc_port}")
    result = grpc.infer("deepseek", infer_inputs(grpcclient, "The quick brown fox", 7))
    assert result.as_numpy("text_output")[0, 0].decode() == expected["text_output"]


def test_generate_stream_sse_delivers_tokens_incrementally(triton: TritonProcess) -> None:
    whole = generate(triton, "Hello world", 8)
    events = stream_events(triton, {"text_input": "Hello world", "max_tokens": 8})
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert [e["output_tokens"] for e in events][-1] == whole["output_tokens"]


def test_grpc_stream_infer(triton: TritonProcess) -> None:
    results: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.launch.grpc_port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("deepseek_stream", infer_inputs(grpcclient, "Hello world", 6))
        pieces = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error.message()
            pieces.append(result.as_numpy("text_output")[0, 0].decode())
            if result.get_response().parameters.get("triton_final_response", None) is not None \
                    and result.get_response().parameters["triton_final_response"].bool_param:
                break
            if int(result.as_numpy("output_tokens")[0, 0]) >= 6:
                break
    finally:
        client.stop_stream()
    assert len(pieces) > 1
    assert "".join(pieces) == generate(triton, "Hello world", 6)["text_output"], pieces


def stats(triton: TritonProcess) -> tuple[int, int]:
    """(inferences, executions) once they stop moving: Triton records them after responding."""
    previous = None
    while True:
        with urllib.request.urlopen(triton.http_url + "/v2/models/deepseek/stats") as r:
            s = json.loads(r.read())["model_stats"][0]
        current = (s["inference_count"], s["execution_count"])
        if current == previous:
            return current
        previous = current
        time.sleep(0.2)


def test_dynamic_batching_is_real_and_does_not_change_results(triton: TritonProcess) -> None:
    prompts = [(f"Request number {i}: hello", 2 + i % 9) for i in range(32)]
    inferences0, executions0 = stats(triton)
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: generate(triton, *p), prompts))
    inferences1, executions1 = stats(triton)
    assert inferences1 - inferences0 == 32
    assert executions1 - executions0 < 32
    alone = [generate(triton, *p) for p in prompts]
    assert [t["text_output"] for t in together] == [a["text_output"] for a in alone]
    # Mixed max_tokens inside one batch: each output is cut at its own limit.
    assert [t["output_tokens"] for t in together] == [n for _, n in prompts]


# Wrong JSON types are refused by Triton's own generate parser, which answers 500.
@pytest.mark.parametrize("body, code, message", [
    ({"max_tokens": 4}, 400, "missing required input 'text_input'"),
    ({"text_input": "", "max_tokens": 4}, 400, "is empty"),
    ({"text_input": "hi", "max_tokens": 100000}, 400, "over this model's cap"),
    ({"text_input": "hello " * 400, "max_tokens": 4}, 400, "over the context length"),
    ({"text_input": 123}, 500, "Unable to parse JSON bytes array"),
    ({"text_input": "hi", "max_tokens": "many"}, 500, "Unable to parse 'data'"),
])
def test_bad_input_is_a_clear_error_and_the_model_stays_up(triton: TritonProcess, body: dict, code: int,
                                                            message: str) -> None:
    status, raw = post(triton, "/v2/models/deepseek/generate", body)
    assert status == code and message in json.loads(raw)["error"]
    assert generate(triton, "still alive?", 3)["output_tokens"] == 3


def test_bad_input_on_stream_model(triton: TritonProcess) -> None:
    # An error before the first event: Triton answers 400 with the error as one SSE event.
    status, raw = post(triton, "/v2/models/deepseek_stream/generate_stream", {"text_input": "   ", "max_tokens": 3})
    assert status == 400 and raw.decode() == 'data: {"error":"input \'text_input\' is empty"}\n\n'
    assert len(stream_events(triton, {"text_input": "ok", "max_tokens": 3})) >= 1
