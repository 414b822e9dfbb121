"""The DeepSeek model on the real tritonserver: infer, generate, streams, batching, bad input."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from proxy.local.triton import TritonProcess, free_ports
from tests.gateway import Gateway, wait_for


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


def model_metrics(triton: TritonProcess, model: str = "deepseek") -> dict[str, float]:
    """The model's own metrics (pb_utils.MetricFamily) from Triton's metrics endpoint, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.launch.metrics_port}/metrics") as r:
        families = text_string_to_metric_families(r.read().decode())
    return {s.name: s.value for f in families for s in f.samples
            if s.name.startswith("deepseek_") and s.labels.get("model") == model and "le" not in s.labels}


def settled_metrics(triton: TritonProcess, model: str = "deepseek") -> dict[str, float]:
    """Once the batch is empty: the engine sets its metrics after the step that answered the last row."""
    previous: dict[str, float] = {}
    while True:
        current = model_metrics(triton, model)
        if current == previous and current["deepseek_running_sequences"] == 0:
            return current
        previous = current
        time.sleep(0.2)


def test_in_flight_batching_is_real_and_does_not_change_results(triton: TritonProcess) -> None:
    prompts = [(f"Request number {i}: hello", 2 + i % 9) for i in range(32)]
    inferences0, _ = stats(triton)
    before = settled_metrics(triton)
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: generate(triton, *p), prompts))
    inferences1, _ = stats(triton)
    after = settled_metrics(triton)
    assert inferences1 - inferences0 == 32
    tokens = after["deepseek_generated_tokens_total"] - before["deepseek_generated_tokens_total"]
    steps = after["deepseek_decode_steps_total"] - before["deepseek_decode_steps_total"]
    assert tokens == sum(n for _, n in prompts)
    assert steps < tokens / 2, (steps, tokens)    # rows shared decode steps
    assert after["deepseek_time_to_first_token_seconds_count"] - \
        before["deepseek_time_to_first_token_seconds_count"] == 32
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
    # Refused by its length alone: tokenizing megabytes held execute(), and every new request, for seconds.
    ({"text_input": "hello " * 100_000, "max_tokens": 4}, 400, "prompt of 600000 characters is over the context"),
    # Each is searched for at every token on the engine thread every request shares.
    ({"text_input": "hi", "max_tokens": 4, "stop": [f"stop {i}" for i in range(17)]}, 400, "at most 16 are allowed"),
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


def test_short_request_joins_and_leaves_a_running_stream(triton: TritonProcess) -> None:
    long_body = {"text_input": "Tell me everything", "max_tokens": 200}   # no EOS before 200 on the tiny model
    first_event, long_done = threading.Event(), threading.Event()
    long_events: list[dict[str, Any]] = []

    def long_stream() -> None:
        req = urllib.request.Request(triton.http_url + "/v2/models/deepseek_stream/generate_stream",
                                     data=json.dumps(long_body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    long_events.append(json.loads(line[len(b"data: "):]))
                    first_event.set()
        long_done.set()

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert first_event.wait(60)
    short = stream_events(triton, {"text_input": "Quick one", "max_tokens": 3})
    assert not long_done.is_set(), "the short request waited for the long one"
    worker.join(120)
    assert short[-1]["output_tokens"] == 3 and long_events[-1]["output_tokens"] == 200
    # Token-identical to each request alone.
    assert "".join(e["text_output"] for e in short) == generate(triton, "Quick one", 3)["text_output"]
    assert "".join(e["text_output"] for e in long_events) == generate(triton, "Tell me everything", 200)["text_output"]


def test_client_disconnect_through_seekgate_cancels_the_sequence(triton: TritonProcess, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, triton.http_url, free_ports(3)).start()
    try:
        _, key = gw.key(owner="leaver")
        before = settled_metrics(triton, "deepseek_stream")
        body = json.dumps({"text_input": "Goodbye", "max_tokens": 240}).encode()
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v2/models/deepseek_stream/generate_stream HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + key.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            got = b""
            while b"data:" not in got:
                got += sock.recv(65536)
        # Gone after the first event: seekgate cancels upstream, Triton tells the model, the
        # engine drops the row at its next step and sends the final flag, which releases the request.
        after = settled_metrics(triton, "deepseek_stream")
        generated = after["deepseek_generated_tokens_total"] - before["deepseek_generated_tokens_total"]
        assert 1 <= generated < 240
        assert wait_for(lambda: pending(triton, "deepseek_stream") == 0, 30)
        assert stream_events(triton, {"text_input": "still serving", "max_tokens": 3})[-1]["output_tokens"] == 3
    finally:
        gw.stop()


def pending(triton: TritonProcess, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.launch.metrics_port}/metrics") as r:
        families = text_string_to_metric_families(r.read().decode())
    return sum(s.value for f in families for s in f.samples
               if s.name == "nv_inference_pending_request_count" and s.labels.get("model") == model)


def test_model_metrics_are_exported_for_both_models(triton: TritonProcess) -> None:
    stream_events(triton, {"text_input": "metrics", "max_tokens": 2})
    generate(triton, "metrics", 2)
    for model in ("deepseek", "deepseek_stream"):
        names = set(settled_metrics(triton, model))
        assert {"deepseek_running_sequences", "deepseek_waiting_requests", "deepseek_kv_cache_usage_ratio",
                "deepseek_generated_tokens_total", "deepseek_decode_steps_total",
                "deepseek_time_to_first_token_seconds_count"} <= names, (model, names)


def test_a_tiny_temperature_samples_like_greedy_and_fails_no_neighbour(triton: TritonProcess) -> None:
    # 1e-40 is a valid FP32 temperature: logits / 1e-40 overflowed to inf, softmax gave NaN, and
    # multinomial's error failed the whole step, every request in the batch with it.
    bodies = [{"text_input": "Hello world", "max_tokens": 12, "temperature": 1e-40, "seed": 1},
              {"text_input": "A neighbour", "max_tokens": 12},
              {"text_input": "Another one", "max_tokens": 12, "temperature": 0.8, "seed": 5}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(triton, "/v2/models/deepseek/generate", b), bodies))
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert json.loads(answers[0][1])["text_output"] == generate(triton, "Hello world", 12)["text_output"]


def test_a_request_that_breaks_parsing_gets_its_own_error_and_the_server_stays_up(triton: TritonProcess) -> None:
    # json.loads raised RecursionError (not a ValueError) out of execute(): Triton failed the whole
    # batch and freed its requests, and the response thread's next poll of them killed tritonserver.
    bodies = [{"text_input": "", "messages": "[" * 100_000, "max_tokens": 4},
              {"text_input": "A neighbour", "max_tokens": 4}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        (bad, bad_body), (good, _) = pool.map(lambda b: post(triton, "/v2/models/deepseek/generate", b), bodies)
    assert (bad, json.loads(bad_body)["error"]) == (400, "input 'messages' is not JSON")
    assert good == 200
    assert generate(triton, "still alive?", 3)["output_tokens"] == 3


def test_a_stream_never_sends_the_start_of_a_stop_string(triton: TritonProcess) -> None:
    # A stop string spanning two tokens: its first part went out with the first token, before the
    # second showed it was a stop, so the stream's text did not match the one answer's.
    pieces = [e["text_output"] for e in stream_events(triton, {"text_input": "Hello world", "max_tokens": 12})]
    i = next(i for i in range(len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[i][-1] + pieces[i + 1][0]
    body = {"text_input": "Hello world", "max_tokens": 12, "stop": [stop]}
    streamed = "".join(e["text_output"] for e in stream_events(triton, body))
    status, raw = post(triton, "/v2/models/deepseek/generate", body)
    assert status == 200 and streamed == json.loads(raw)["text_output"] == "".join(pieces)[:"".join(pieces).index(stop)]


def test_a_bad_request_is_the_clients_error_on_infer_and_grpc(triton: TritonProcess) -> None:
    # Sent without a code, every refusal was INTERNAL: /infer answered 500 and gRPC INTERNAL, so
    # seekgate's audit and metrics counted a client's mistake as a server fault.
    inputs = infer_inputs(grpcclient, "hi", 0)
    with pytest.raises(InferenceServerException) as err:
        grpcclient.InferenceServerClient(f"127.0.0.1:{triton.launch.grpc_port}").infer("deepseek", inputs)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "max_tokens must be at least 1" in err.value.message()
    body = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": ["   "]}]}
    status, raw = post(triton, "/v2/models/deepseek/infer", body)
    assert (status, json.loads(raw)["error"]) == (400, "input 'text_input' is empty")


def test_a_chat_needs_no_text_input(triton: TritonProcess) -> None:
    messages = json.dumps([{"role": "user", "content": "Hello"}])
    status, raw = post(triton, "/v2/models/deepseek/generate", {"messages": messages, "max_tokens": 4})
    assert status == 200, raw
    with_empty = post(triton, "/v2/models/deepseek/generate", {"text_input": "", "messages": messages, "max_tokens": 4})
    assert json.loads(raw)["text_output"] == json.loads(with_empty[1])["text_output"]
