"""model.py helpers and TritonPythonModel.execute, outside Triton (pb_utils stubbed at the module boundary)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests import pb_utils_stub

MODEL_PY = Path(__file__).resolve().parent.parent / "triton_models" / "deepseek" / "1" / "model.py"


def load_model_module() -> ModuleType:
    sys.modules["triton_python_backend_utils"] = pb_utils_stub  # type: ignore[assignment]
    spec = importlib.util.spec_from_file_location("deepseek_model", MODEL_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


m = load_model_module()
LIMITS = m.Limits(max_tokens_cap=64, default_max_tokens=8, context_length=128)


def b(text: str) -> np.ndarray:
    return np.array([[text.encode()]], dtype=np.object_)


def test_parse_prompt_and_params() -> None:
    assert m.parse_prompt({"text_input": b("hi")}) == "hi"
    p = m.parse_params({"max_tokens": np.array([[5]], np.int32), "temperature": np.array([[0.5]], np.float32),
                        "top_p": np.array([[0.9]], np.float32), "stop": np.array([[b"x", b"yz"]], np.object_),
                        "seed": np.array([[7]], np.int64)}, LIMITS)
    assert (p.max_tokens, p.stop, p.seed) == (5, ("x", "yz"), 7)
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert m.parse_params({}, LIMITS).max_tokens == LIMITS.default_max_tokens


@pytest.mark.parametrize("values, message", [
    ({}, "missing required input 'text_input'"),
    ({"text_input": b("   ")}, "is empty"),
    ({"text_input": np.array([[b"\xff\xfe"]], np.object_)}, "not valid UTF-8"),
    ({"text_input": np.array([[b"a", b"b"]], np.object_)}, "exactly one value"),
    ({"text_input": np.array([[3]], np.int32)}, "must be a string"),
])
def test_bad_prompt(values: dict, message: str) -> None:
    with pytest.raises(m.RequestError, match=message):
        m.parse_prompt(values)


@pytest.mark.parametrize("values, message", [
    ({"max_tokens": np.array([[65]], np.int32)}, "over this model's cap of 64"),
    ({"max_tokens": np.array([[0]], np.int32)}, "at least 1"),
    ({"temperature": np.array([[-1.0]], np.float32)}, "temperature"),
    ({"top_p": np.array([[0.0]], np.float32)}, "top_p"),
])
def test_bad_params(values: dict, message: str) -> None:
    with pytest.raises(m.RequestError, match=message):
        m.parse_params(values, LIMITS)


def test_read_inputs_takes_the_known_inputs_by_name_and_ignores_others() -> None:
    request = pb_utils_stub.InferenceRequest(text_input=b("hi"), max_tokens=np.array([[3]], np.int32),
                                             unknown=np.array([[1]], np.int32))
    values = m.read_inputs(request)
    assert sorted(values) == ["max_tokens", "text_input"] and values["text_input"][0, 0] == b"hi"


def test_worth_polling_skips_new_requests_and_rows_that_end_before_the_next_sweep() -> None:
    def seq(arrived: float, slot: int = -1, tokens: int = 0, max_tokens: int = 64) -> Any:
        return m.Sequence([1, 2], m.GenerationParams(max_tokens), slot=slot, tokens=[5] * tokens, arrived=arrived)

    now, interval, step = 100.0, 0.02, 0.003
    assert not m.worth_polling(seq(now - 0.01), now, interval, step)            # handed over 10 ms ago
    assert m.worth_polling(seq(now - 0.03), now, interval, step)                # still waiting for a slot
    assert m.worth_polling(seq(now - 0.03, slot=0), now, interval, step)        # being prefilled
    assert m.worth_polling(seq(now - 0.03, slot=0, tokens=3), now, interval, step)   # 61 steps to go
    assert not m.worth_polling(seq(now - 0.03, slot=0, tokens=60), now, interval, step)   # 4 steps: 12 ms
    # Steps longer than cancel_poll_ms (a big model): sweeps come once a step, and a row with a
    # step left finishes at the next one anyway; with two left, a cancel found now saves one.
    assert not m.worth_polling(seq(now - 0.06, slot=0, tokens=63), now, 0.05, 0.05)
    assert m.worth_polling(seq(now - 0.06, slot=0, tokens=62), now, 0.05, 0.05)


def test_context_length_check() -> None:
    m.check_context(120, m.GenerationParams(8), LIMITS)
    with pytest.raises(m.RequestError, match="context length of 128"):
        m.check_context(121, m.GenerationParams(8), LIMITS)


def test_cut_at_stop_and_safe_delta() -> None:
    assert m.cut_at_stop("hello world", ["o w", "ld"]) == ("hell", True)
    assert m.cut_at_stop("hello", ["z"]) == ("hello", False)
    assert m.safe_delta("ab\ufffd", 1) == ""
    assert m.safe_delta("abc", 1) == "bc"


def test_resolve_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    assert m.resolve_checkpoint({"checkpoint": "ck"}, {}, str(tmp_path)) == str(tmp_path / "ck")
    assert m.resolve_checkpoint({"checkpoint": "nope"}, {"SEEKGATE_CHECKPOINT": str(tmp_path / "ck")},
                                str(tmp_path)) == str(tmp_path / "ck")
    with pytest.raises(RuntimeError, match="no config.json"):
        m.resolve_checkpoint({"checkpoint": "nope"}, {}, str(tmp_path))


def test_parse_settings_reports_every_bad_value() -> None:
    settings = m.parse_settings({"max_running_sequences": "4", "prefill_chunk": "64", "token_budget": "512",
                                 "admit_wait_ms": "5"}, LIMITS)
    assert (settings.max_running, settings.prefill_chunk, settings.budget(), settings.scheduling,
            settings.admit_wait_ms) == (4, 64, 512, "inflight", 5.0)
    assert m.parse_settings({}, LIMITS).budget() == 32 * LIMITS.context_length
    with pytest.raises(RuntimeError) as err:
        m.parse_settings({"max_running_sequences": "0", "token_budget": "100", "scheduling": "fifo",
                          "admit_wait_ms": "-1"}, LIMITS)
    assert all(s in str(err.value) for s in ("max_running_sequences", "token_budget 100", "'fifo'",
                                             "admit_wait_ms"))


def test_intra_op_threads_sets_torchs_cpu_threads_and_refuses_bad_values(tiny_checkpoint: Path) -> None:
    assert m.parse_threads({}) == 0 and m.parse_threads({"intra_op_threads": "3"}) == 3
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(RuntimeError, match=f"intra_op_threads must be a whole number >= 0, got '{bad}'"):
            m.parse_threads({"intra_op_threads": bad})
    import torch

    before = torch.get_num_threads()
    config = {"model_transaction_policy": {"decoupled": False},
              "parameters": {"checkpoint": {"string_value": str(tiny_checkpoint)},
                             "intra_op_threads": {"string_value": "1"}}}
    instance = m.TritonPythonModel()
    try:
        torch.set_num_threads(2)
        instance.initialize({"model_config": json.dumps(config), "model_repository": "/nonexistent/deepseek",
                             "model_instance_kind": "CPU", "model_instance_device_id": "0", "model_name": "deepseek"})
        assert torch.get_num_threads() == 1
        instance.finalize()
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Iterator[object]:
    config = {"model_transaction_policy": {"decoupled": False},
              "parameters": {"checkpoint": {"string_value": str(tiny_checkpoint)},
                             "max_tokens_cap": {"string_value": "64"}}}
    instance = m.TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_repository": "/nonexistent/deepseek",
                         "model_instance_kind": "CPU", "model_instance_device_id": "0", "model_name": "deepseek"})
    yield instance
    instance.finalize()


def request(text: str, max_tokens: int, **extra: np.ndarray) -> pb_utils_stub.InferenceRequest:
    return pb_utils_stub.InferenceRequest(text_input=b(text), max_tokens=np.array([[max_tokens]], np.int32), **extra)


def execute(model: object, requests: list[pb_utils_stub.InferenceRequest]) -> list[pb_utils_stub.InferenceResponse]:
    """execute() returns at once; each answer arrives on the request's sender, the last with the final flag."""
    assert model.execute(requests) is None
    for r in requests:
        assert r.sender.finished.wait(60), "no final response"
    return [r.sender.sent[-1][0] for r in requests]


def test_batch_equals_one_at_a_time_and_honours_max_tokens(model: object) -> None:
    prompts = [("Hello world", 3), ("The quick brown fox jumps over the lazy", 9), ("a", 5), ("seekgate", 12)]
    batched = execute(model, [request(t, n) for t, n in prompts])
    for (text, n), response in zip(prompts, batched, strict=True):
        single = execute(model, [request(text, n)])[0]
        assert response.output("text_output")[0, 0] == single.output("text_output")[0, 0]
        assert response.output("output_tokens")[0, 0] == single.output("output_tokens")[0, 0] <= n
    assert [int(r.output("output_tokens")[0, 0]) for r in batched] == [n for _, n in prompts]


def test_non_decoupled_sends_exactly_one_final_response(model: object) -> None:
    r = request("Hello world", 5)
    execute(model, [r])
    (response, flags), = r.sender.sent
    assert flags == pb_utils_stub.TRITONSERVER_RESPONSE_COMPLETE_FINAL and response.error is None


def test_bad_request_in_batch_gets_its_own_error(model: object) -> None:
    responses = execute(model, [request("Hello", 4), pb_utils_stub.InferenceRequest(text_input=b("")),
                                request("Hello", 1000), request("world", 2)])
    assert responses[0].error is None and responses[3].error is None
    assert "empty" in responses[1].error.message()
    assert "cap of 64" in responses[2].error.message()
    assert int(responses[3].output("output_tokens")[0, 0]) == 2


def test_a_batch_of_plain_prompts_and_chats_is_tokenized_as_each_alone(model: object) -> None:
    # execute() tokenizes a batch in one call per kind of prompt; order, special tokens and the
    # per-request context check are each request's own.
    chat = json.dumps([{"role": "user", "content": "Hello there"}]).encode()

    def chat_request(n: int) -> pb_utils_stub.InferenceRequest:
        return request("", n, messages=np.array([[chat]], dtype=np.object_))

    def batch() -> list[pb_utils_stub.InferenceRequest]:
        return [request("Hello world", 3), chat_request(3), request("word " * 300, 4), request("seekgate", 2)]
    together = execute(model, batch())
    alone = [execute(model, [r])[0] for r in batch()]
    assert "context length of 256" in together[2].error.message() and "context length" in alone[2].error.message()
    for i in (0, 1, 3):
        for name in ("text_output", "input_tokens", "output_tokens"):
            assert together[i].output(name)[0, 0] == alone[i].output(name)[0, 0], (i, name)
    rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                                   add_generation_prompt=True)
    assert int(together[1].output("input_tokens")[0, 0]) == len(model.engine.encode(rendered, special=False))


def test_encode_prompts_keeps_the_order_across_kinds() -> None:
    calls: list[tuple[list[str], bool]] = []

    def encode_many(texts: list[str], special: bool) -> list[list[int]]:
        calls.append((texts, special))
        return [[len(t), int(special)] for t in texts]
    prompts = [m.Prompt("aa", True), m.Prompt("b", False), m.Prompt("cccc", True)]
    assert m.encode_prompts(prompts, encode_many) == [[2, 1], [1, 0], [4, 1]]
    assert calls == [(["aa", "cccc"], True), (["b"], False)]
    assert m.encode_prompts([], encode_many) == [] and len(calls) == 2


def test_seeded_sampling_is_reproducible(model: object) -> None:
    def sampled(seed: int) -> bytes:
        extra = {"temperature": np.array([[5.0]], np.float32), "seed": np.array([[seed]], np.int64)}
        return execute(model, [request("Hello world", 10, **extra)])[0].output("text_output")[0, 0]
    assert sampled(1) == sampled(1)
    assert len({sampled(s) for s in range(6)}) > 1


def test_stop_string_cuts_output(model: object) -> None:
    full = execute(model, [request("Hello world", 10)])[0].output("text_output")[0, 0].decode()
    stop = full[3:5]
    cut = execute(model, [request("Hello world", 10, stop=np.array([[stop.encode()]], np.object_))])[0]
    text = cut.output("text_output")[0, 0].decode()
    assert stop not in text and full.startswith(text) and len(text) <= 3


def test_decoupled_streams_one_response_per_token(model: object) -> None:
    model.decoupled = True
    try:
        good, bad = request("Hello world", 6), pb_utils_stub.InferenceRequest(text_input=b(" "))
        execute(model, [good, bad])
    finally:
        model.decoupled = False
    assert len(good.sender.sent) >= 2
    assert good.sender.sent[-1][1] == pb_utils_stub.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert all(flags == 0 for _, flags in good.sender.sent[:-1])
    counts = [int(r.output("output_tokens")[0, 0]) for r, _ in good.sender.sent]
    assert counts == sorted(counts) and counts[-1] <= 6
    (response, flags), = bad.sender.sent
    assert "empty" in response.error.message() and flags == pb_utils_stub.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def test_cancelled_stream_stops_early_and_is_released(model: object) -> None:
    # Steps of 5 ms, as a bigger model's: warm, the tiny one decoded all 40 tokens in less than the
    # 20 ms poll interval, before a cancel could be found (the request then ended normally).
    answers_first = model.engine.before_step
    model.engine.before_step = lambda: (time.sleep(0.005), answers_first())
    model.decoupled = True
    try:
        cancelled, other = request("Hello world", 40), request("The quick brown fox", 12)
        cancelled.sender.cancel_after = 2
        execute(model, [cancelled, other])
    finally:
        model.decoupled = False
        model.engine.before_step = answers_first
    sent = cancelled.sender.sent
    # The response thread polls is_cancelled() every cancel_poll_ms: a few more tokens may go out first.
    assert 3 <= len(sent) < 40 and sent[-1] == (None, pb_utils_stub.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    assert int(other.sender.sent[-1][0].output("output_tokens")[0, 0]) == 12


class _Templated:
    chat_template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

    def apply_chat_template(self, messages: list, tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_render_messages_uses_the_tokenizers_template_and_refuses_bad_input() -> None:
    raw = np.array([json.dumps([{"role": "user", "content": "hi"}]).encode()], dtype=np.object_)
    assert m.render_messages(_Templated(), raw[0]) == "<user>hi<assistant>"
    for bad, message in ((b"not json", "not JSON"), (b"[]", "non-empty list"), (b'[{"role": 1}]', "non-empty list")):
        with pytest.raises(m.RequestError, match=message):
            m.render_messages(_Templated(), bad)
    with pytest.raises(m.RequestError, match="no chat template"):
        m.render_messages(object(), raw[0])
    with pytest.raises(m.RequestError, match="input 'messages' is not valid UTF-8"):
        m.render_messages(_Templated(), b"\xff")


def test_metrics_follow_the_engine(model: object) -> None:
    def settled(observations: int = 0) -> None:
        # Metrics are set after the step whose events finished the rows; time-to-first-token
        # observations once the response thread has no answer waiting.
        deadline = time.monotonic() + 10
        while (metrics.running.value or model.engine.generated != metrics.tokens.value
               or len(metrics.ttft.observations) < observations) and time.monotonic() < deadline:
            time.sleep(0.01)

    metrics = model.metrics
    settled()
    tokens0, steps0, ttft0 = metrics.tokens.value, metrics.steps.value, len(metrics.ttft.observations)
    execute(model, [request(f"Hello {i}", 6) for i in range(4)])
    settled(ttft0 + 4)
    assert metrics.tokens.value - tokens0 == 24
    assert 0 < metrics.steps.value - steps0 < 24                 # four rows shared the decode steps
    assert len(metrics.ttft.observations) - ttft0 == 4 and all(t > 0 for t in metrics.ttft.observations)
    assert metrics.running.value == 0 and metrics.waiting.value == 0 and metrics.kv_usage.value == 0
    assert metrics.ttft.labels == {"model": "deepseek", "version": "1"}


def test_context_length_0_is_the_checkpoint_max_capped_for_the_preallocated_kv_cache() -> None:
    assert m.parse_limits({}, 256).context_length == 256
    assert m.parse_limits({}, 163840).context_length == m.DEFAULT_CONTEXT_CAP == 4096
    assert m.parse_limits({"context_length": "32768"}, 163840).context_length == 32768   # asked for explicitly
    assert m.parse_limits({"context_length": "999999"}, 163840).context_length == 163840


def test_an_answer_is_not_held_behind_a_sweep_of_slow_cancellation_polls(model: object) -> None:
    """is_cancelled() is a round trip to Triton: 8 running requests at 100 ms each made an 800 ms
    sweep, and an answer ready meanwhile waited for all of it. Now it waits for one poll at most
    (the bound leaves room for a loaded CI machine's slower engine steps)."""
    long_ = [request(f"Long story {i}", 60) for i in range(8)]
    for r in long_:
        r.sender.poll_s = 0.1
    assert model.execute(long_) is None
    time.sleep(0.15)   # a sweep is under way
    short = request("Hello", 1)
    started = time.monotonic()
    assert model.execute([short]) is None
    assert short.sender.finished.wait(10)
    assert short.sender.finished_at is not None and short.sender.finished_at - started < 0.8
    for r in long_:
        assert r.sender.finished.wait(60)


def test_answers_ready_together_are_not_spaced_out_by_cancellation_polls(model: object) -> None:
    """A sweep used to poll one request after each answer: eight answers ready together went out
    one 20 ms poll apart. A sweep now waits while any answer does, so they leave back to back."""
    long_ = [request(f"Long story {i}", 60) for i in range(8)]
    shorts = [request(f"Hello {i}", 1) for i in range(8)]
    for r in long_ + shorts:
        r.sender.poll_s = 0.02
    assert model.execute(long_) is None
    time.sleep(0.1)   # sweeps are under way
    assert model.execute(shorts) is None
    for r in shorts:
        assert r.sender.finished.wait(10)
    finished = [r.sender.finished_at for r in shorts]
    assert max(finished) - min(finished) < 0.06, finished   # seven polls between them: 0.14 s
    for r in long_:
        assert r.sender.finished.wait(60)


def test_the_engine_sends_final_answers_before_its_next_step(model: object) -> None:
    """Eight 1-token answers are ready after one pass while a long request keeps decoding.
    Each send takes 2 ms here: the engine holds its next step until they are out (up to
    ANSWER_WAIT_S), so few steps run between the first and the last; without the wait the
    steps went on between the sends, and the answers queued behind them."""
    engine = model.engine
    long_ = request("The quick brown fox", 60)
    shorts = [request(f"Hello {i}", 1) for i in range(8)]
    steps_at_send: list[int] = []

    def slow(send: Any) -> Any:
        def wrapped(response: Any = None, flags: int = 0) -> None:
            steps_at_send.append(engine.steps)
            time.sleep(0.002)
            send(response, flags)
        return wrapped
    for r in shorts:
        r.sender.send = slow(r.sender.send)  # type: ignore[method-assign]
    assert model.execute([long_, *shorts]) is None
    for r in [long_, *shorts]:
        assert r.sender.finished.wait(60)
    assert len(steps_at_send) == 8 and max(steps_at_send) - min(steps_at_send) <= 2, steps_at_send


def test_answers_go_out_before_the_time_to_first_token_observations(model: object) -> None:
    """An observation is a round trip to Triton too: one before each answer slowed a burst's
    answers by half again. Eight answers ready together now leave before the 50 ms
    observations, and every observation is still made."""
    ttft = model.metrics.ttft
    seen = len(ttft.observations)
    ttft.observe_s = 0.05
    try:
        burst = [request(f"Hello {i}", 1) for i in range(8)]
        started = time.monotonic()
        assert model.execute(burst) is None
        for r in burst:
            assert r.sender.finished.wait(10)
        assert max(r.sender.finished_at for r in burst) - started < 0.2   # eight observations: 0.4 s
        deadline = time.monotonic() + 10
        while len(ttft.observations) - seen < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ttft.observations) - seen == 8
    finally:
        ttft.observe_s = 0.0


def test_a_chat_template_refusing_the_messages_is_that_requests_error(tiny_checkpoint: Path) -> None:
    # Llama- and Mistral-style templates raise_exception on roles they do not support: that jinja
    # error escaped execute() and failed the whole batch.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.chat_template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(m.RequestError, match="the chat template refused these messages: user first"):
        m.render_messages(tokenizer, json.dumps([{"role": "tool", "content": "x"}]).encode())
