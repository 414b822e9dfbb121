"""The OpenAI API under /v1, driven by the official `openai` SDK against the real Triton and the tiny DeepSeek."""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.local.triton import TritonLaunch, TritonProcess
from tests.frontend.test_http import (
    bearer,
    call,
    leave_mid_answer,
    leave_while_held,
    raw_request,
    read_until,
    streaming_200,
)
from tests.gateway import Gateway, audit_records, gateway_via, metric, wait_for
from tests.relay import TcpRelay
from tests.test_model_server import settled_metrics

MODEL = "deepseek"

# A role the OpenAI API is denied to (the README's example, inverted): kserve only.
DENY_OPENAI = """
rules:
  - id: no-openai-for-batch
    effect: deny
    subject: {roles: [batch]}
    resources: ["model:*"]
    actions: [infer, read]
    environment: {apis: [openai]}
"""

# Rules on the decoupled twin every /v1 answer runs on; loaded before default.yaml, so the limits
# rule is the twin's deciding allow rule for its role.
ON_THE_TWIN = """
rules:
  - id: nostream-twin
    effect: deny
    subject: {roles: [nostream]}
    resources: ["model:deepseek_stream"]
    actions: [infer]
  - id: twin-limit
    effect: allow
    subject: {roles: [twinlimited]}
    resources: ["model:deepseek_stream"]
    actions: [infer]
    limits: {rpm: 1}
"""


@pytest.fixture(scope="module")
def gw(relays: tuple[TcpRelay, TcpRelay], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("gw-openai")
    policies = root / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text((Path(__file__).resolve().parents[2] / "policies" / "default.yaml")
                                           .read_text())
    (policies / "openai.yaml").write_text(DENY_OPENAI)
    (policies / "00-twin.yaml").write_text(ON_THE_TWIN)
    # count_wait_s: the tests of what is charged past a stop or a leave read on to the model's last event.
    with gateway_via(root, *relays, **{"limits.max_tokens_by_role": "capped=4,capped40=40",
                                       "openai.aliases": f"deepseek-chat=deepseek,{HF_ID}=deepseek",
                                       "openai.count_wait_s": 1.0}) as g:
        yield g


HF_ID = "deepseek-ai/DeepSeek-V3"   # an alias as a vLLM-served model is named


def client(gw: Gateway, key: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, **kw)


def records_of(gw: Gateway, key_id: str, count: int = 1) -> list[dict[str, Any]]:
    assert wait_for(lambda: sum(r["key_id"] == key_id for r in audit_records(gw)) >= count, 10.0)
    return sorted((r for r in audit_records(gw) if r["key_id"] == key_id), key=lambda r: r["timestamp"])


# ------------------------------------------------------------------ models

def test_models_lists_triton_models_and_aliases_without_the_stream_twin(gw: Gateway) -> None:
    _, key = gw.key(owner="lister")
    ids = [m.id for m in client(gw, key).models.list()]
    assert ids == ["deepseek", HF_ID, "deepseek-chat"]
    assert client(gw, key).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client(gw, key).models.retrieve("deepseek_stream")
    assert err.value.code == "model_not_found"


def test_models_shows_only_what_the_key_may_use(gw: Gateway) -> None:
    _, key = gw.key(owner="narrow", models=("deepseek-nope",))
    assert [m.id for m in client(gw, key).models.list()] == []
    with pytest.raises(openai.NotFoundError):
        client(gw, key).models.retrieve(MODEL)


def test_models_hides_a_model_whose_twin_the_key_may_not_run(gw: Gateway) -> None:
    """Every /v1 answer runs on the twin: a model the key could read but never run there is not listed."""
    _, key = gw.key(owner="lister-nostream", roles=("nostream",))
    assert [m.id for m in client(gw, key).models.list()] == []
    with pytest.raises(openai.NotFoundError):
        client(gw, key).models.retrieve(MODEL)
    # The key's own model list must name the twin too (README): without it, nothing to list either.
    _, named_only = gw.key(owner="lister-named", models=("deepseek",))
    assert [m.id for m in client(gw, named_only).models.list()] == []
    _, both = gw.key(owner="lister-both", models=("deepseek", "deepseek_stream"))
    assert [m.id for m in client(gw, both).models.list()] == ["deepseek", HF_ID, "deepseek-chat"]
    # An alias is retrieved on the model it names, as it is listed: the key's list need not name the alias.
    assert client(gw, both).models.retrieve("deepseek-chat").id == "deepseek-chat"


def test_a_hugging_face_style_alias_is_listed_retrieved_and_served(gw: Gateway) -> None:
    """organisation/name ids, as vLLM serves them, work through an alias; one that is no alias is 404."""
    key_id, key = gw.key(owner="hf-style")
    c = client(gw, key, max_retries=0)
    assert c.models.retrieve(HF_ID).id == HF_ID
    answer = c.completions.create(model=HF_ID, prompt="Hello", max_tokens=2, temperature=0)
    assert answer.usage is not None and answer.usage.completion_tokens == 2
    assert records_of(gw, key_id, 2)[-1]["model"] == MODEL
    for call_ in (lambda: c.models.retrieve("deepseek-ai/other"),
                  lambda: c.completions.create(model="deepseek-ai/other", prompt="Hello", max_tokens=2)):
        with pytest.raises(openai.NotFoundError) as err:
            call_()
        assert err.value.code == "model_not_found" and "deepseek-ai/other" in err.value.message


def test_models_hides_a_model_without_a_twin(echo_triton: TritonProcess, tmp_path: Path) -> None:
    """Every /v1 answer runs on <model>_stream: tests/models' busy and conform, which have none, could
    only ever answer 404 (echo has echo_stream)."""
    from tests.conftest import free_ports
    g = Gateway(tmp_path, echo_triton.http_url, free_ports(3)).start()
    try:
        c = client(g, g.key(owner="twinless")[1], max_retries=0)
        assert [m.id for m in c.models.list()] == ["echo"]
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("busy")
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="busy", prompt="hi", max_tokens=2)
    finally:
        g.stop()


def test_models_hides_a_model_whose_twin_is_not_ready(tmp_path: Path) -> None:
    """Triton under explicit model control (production's, where an operator unloads models): every /v1 answer runs
    on the twin, so a model whose twin is unloaded could only ever fail and is not listed or retrieved; one whose
    own version is unloaded still answers on its ready twin and stays listed."""
    from tests.conftest import REPO, free_ports
    http, grpc_, metrics = free_ports(3)
    launch = TritonLaunch(REPO / "tests" / "models", tmp_path / "triton", None, http_port=http, grpc_port=grpc_,
                          metrics_port=metrics, config_name="default", startup_timeout_s=120,
                          extra_args=("--model-control-mode=explicit", "--load-model=*"))
    triton = TritonProcess(launch).__enter__()

    def unload(model: str) -> None:
        assert call(f"{triton.http_url}/v2/repository/models/{model}/unload", "POST", {})[0] == 200
        assert wait_for(lambda: all(m["state"] == "UNAVAILABLE" for m in json.loads(
            call(triton.http_url + "/v2/repository/index", "POST", {})[2]) if m["name"] == model), 30.0)
    try:
        g = Gateway(tmp_path / "gw", triton.http_url, free_ports(3)).start()
        try:
            c = client(g, g.key(owner="twin-unloaded")[1], max_retries=0)
            assert [m.id for m in c.models.list()] == ["echo"]
            unload("echo")   # its twin still answers every /v1 request for it
            assert [m.id for m in c.models.list()] == ["echo"]
            assert c.completions.create(model="echo", prompt="hi", max_tokens=2).choices
            unload("echo_stream")
            assert [m.id for m in c.models.list()] == []
            with pytest.raises(openai.NotFoundError):
                c.models.retrieve("echo")
        finally:
            g.stop()
    finally:
        triton.stop()


def test_a_whole_answer_without_token_counts_is_charged_its_bound(echo_triton: TritonProcess, tmp_path: Path) -> None:
    """tests/models' echo_stream answers with no input_tokens/output_tokens, as a model may: unread counts are
    charged the bound (fail closed), as on /v2 and on a stream, never read as 0 tokens used."""
    from tests.conftest import free_ports
    g = Gateway(tmp_path, echo_triton.http_url, free_ports(3)).start()
    try:
        key_id, key = g.key(owner="countless", limits={"daily_tokens": 100})
        c = client(g, key, max_retries=0)
        assert c.completions.create(model="echo", prompt="hello", max_tokens=30).choices
        (rec,) = records_of(g, key_id)
        assert (rec["http_status"], rec["input_tokens"], rec["output_tokens"]) == (200, None, None)
        with pytest.raises(openai.RateLimitError):   # charged: the whole budget is no longer left
            c.completions.create(model="echo", prompt="hello", max_tokens=100)
    finally:
        g.stop()


# ------------------------------------------------------------------ chat and completions

def test_chat_not_streamed_usage_matches_the_audit_record(gw: Gateway) -> None:
    key_id, key = gw.key(owner="chatter")
    answer = client(gw, key).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=8, temperature=0, user="end-user-42")
    assert answer.object == "chat.completion" and answer.model == MODEL
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = answer.usage
    assert u is not None and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 1 <= u.completion_tokens <= 8 and (choice.finish_reason == "length") == (u.completion_tokens == 8)
    (rec,) = records_of(gw, key_id)
    assert (rec["input_tokens"], rec["output_tokens"]) == (u.prompt_tokens, u.completion_tokens)
    assert rec["protocol"] == "openai" and rec["openai"] == {"endpoint": "/v1/chat/completions",
                                                             "user": "end-user-42", "runs_on": "deepseek_stream"}
    assert (rec["resource"], rec["action"], rec["model"], rec["status"]) == ("model:deepseek", "infer", MODEL,
                                                                             "allowed")
    assert metric(gw, "seekgate_requests_total", protocol="openai", model=MODEL, code="200") >= 1


def test_safety_identifier_names_the_user_and_prompt_cache_key_is_taken(gw: Gateway) -> None:
    """The SDK's successors of `user` (it says to use them instead): the end user is audited under either."""
    key_id, key = gw.key(owner="successor")
    answer = client(gw, key, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=2, safety_identifier="end-user-7",
        prompt_cache_key="conversation-1")
    assert answer.choices[0].message.content
    (rec,) = records_of(gw, key_id)
    assert rec["openai"]["user"] == "end-user-7"


def test_chat_uses_the_checkpoints_chat_template(gw: Gateway, triton: TritonProcess) -> None:
    """The prompt the model saw is the template's rendering: its token count matches a generate of that text."""
    _, key = gw.key(owner="templ")
    answer = client(gw, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                     max_tokens=4, temperature=0)
    rendered = "<|begin_of_sentence|><|User|>Hello<|Assistant|>"
    # generate adds no BOS of its own with this tokenizer: the same text is the same prompt.
    status, _, body = call(triton.http_url + "/v2/models/deepseek/generate", "POST",
                           {"text_input": rendered, "max_tokens": 4, "temperature": 0})
    assert status == 200, body
    direct = json.loads(body)
    assert answer.usage is not None and answer.usage.prompt_tokens == direct["input_tokens"]
    assert answer.choices[0].message.content == direct["text_output"]


def test_an_answer_replayed_as_history_is_taken_as_openais_api_takes_it(gw: Gateway) -> None:
    """The SDK's multi-turn pattern appends the answer's message as is, `refusal: null` with it; an assistant
    turn may also come with `content: null`. Both are rendered as the plain text turn they are."""
    c = client(gw, gw.key(owner="multi-turn")[1], max_retries=0)
    first = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=3,
                                      temperature=0)
    said = first.choices[0].message

    def reply(assistant: Any) -> str | None:
        history: list[Any] = [{"role": "user", "content": "Hello"}, assistant, {"role": "user", "content": "And?"}]
        return c.chat.completions.create(model=MODEL, messages=history, max_tokens=3,
                                         temperature=0).choices[0].message.content

    assert reply(said) == reply({"role": "assistant", "content": said.content})
    assert reply({"role": "assistant", "content": None}) == reply({"role": "assistant", "content": ""})


def test_chat_streamed_chunks_role_first_finish_last_and_usage(gw: Gateway) -> None:
    key_id, key = gw.key(owner="streamer")
    chunks = list(client(gw, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client(gw, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=12, temperature=0)
    assert text == whole.choices[0].message.content
    rec = records_of(gw, key_id, 2)[0]
    assert (rec["input_tokens"], rec["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_completions_at_temperature_0_equal_tritons_generate(gw: Gateway, triton: TritonProcess) -> None:
    _, key = gw.key(owner="completer")
    prompt = "The quick brown fox"
    answer = client(gw, key).completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    status, _, body = call(triton.http_url + "/v2/models/deepseek/generate", "POST",
                           {"text_input": prompt, "max_tokens": 10, "temperature": 0})
    direct = json.loads(body)
    assert status == 200 and answer.object == "text_completion"
    assert answer.choices[0].text == direct["text_output"]
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (direct["input_tokens"],
                                                                            direct["output_tokens"])
    echoed = client(gw, key).completions.create(model=MODEL, prompt=[prompt], max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + direct["text_output"]
    streamed = client(gw, key).completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                  stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == direct["text_output"]


def test_stop_sequences_cut_the_answer(gw: Gateway) -> None:
    _, key = gw.key(owner="stopper")
    c = client(gw, key)
    full = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=16, temperature=0).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]   # a sequence the greedy answer is known to contain
    cut = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=16, temperature=0, stop=[stop, "@@"])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=16, temperature=0, stop=stop,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == full[:full.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_generated_past_a_stop_are_charged(gw: Gateway, triton: TritonProcess, stream: bool) -> None:
    """usage counts up to the stop, as OpenAI's; the record (and the charge) what the model generated."""
    key_id, key = gw.key(owner=f"stop-charged-{stream}")
    c = client(gw, key)
    full = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0).choices[0].text
    stop = full[2:4]   # early in the greedy answer: most of it is generated after the stop
    before = settled_metrics(triton, "deepseek_stream")["deepseek_generated_tokens_total"]
    if stream:
        chunks = list(c.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0,
                                           stop=stop, stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
    else:
        usage = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0,
                                     stop=stop).usage
    generated = settled_metrics(triton, "deepseek_stream")["deepseek_generated_tokens_total"] - before
    rec = records_of(gw, key_id, 2)[1]
    assert usage is not None and usage.completion_tokens < generated
    assert rec["output_tokens"] == generated and rec["openai"]["completion_tokens"] == usage.completion_tokens


def test_seed_reproduces_at_temperature_above_0(gw: Gateway) -> None:
    _, key = gw.key(owner="seeder")
    c = client(gw, key)

    def ask(seed: int) -> str:
        return c.completions.create(model=MODEL, prompt="Inference servers", max_tokens=24, temperature=1.5,
                                    seed=seed).choices[0].text
    first = ask(1234)
    assert ask(1234) == first
    assert any(ask(s) != first for s in (1, 2, 3))


def test_stream_chunks_arrive_as_triton_sends_them(gw: Gateway, relays: tuple[TcpRelay, TcpRelay]) -> None:
    """Triton's events after the first are held in the relay: the client has its first chunk while Triton is
    still 'generating', so chunks are relayed as they come, not gathered into one burst at the end."""
    relay = relays[0]
    _, key = gw.key(owner="pacer")
    marker = f"pace-{uuid.uuid4().hex}"
    relay.hold_after(b"data:")
    try:
        stream = client(gw, key).completions.create(model=MODEL, prompt=marker, max_tokens=20, temperature=0,
                                                    stream=True)
        it = iter(stream)
        first = next(it)
        got_first = time.monotonic()
        assert first.choices and first.choices[0].finish_reason is None
        time.sleep(0.5)
    finally:
        relay.let_flow()
    rest = list(it)
    assert time.monotonic() - got_first >= 0.5 and rest and rest[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_generation_time_is_upstream_time_not_seekgates_overhead(gw: Gateway, relays: tuple[TcpRelay, TcpRelay],
                                                                 stream: bool) -> None:
    """Triton's events after the first are held for 1 s: that second is Triton's, in upstream_ms, not overhead."""
    key_id, key = gw.key(owner=f"timed-{stream}")
    overhead = metric(gw, "seekgate_overhead_seconds_sum", protocol="openai")
    relays[0].hold_after(b"data:")
    threading.Timer(1.0, relays[0].let_flow).start()
    answer = client(gw, key).completions.create(model=MODEL, prompt="timed", max_tokens=8, stream=stream)
    if stream:
        list(answer)
    (rec,) = records_of(gw, key_id)
    assert rec["upstream_ms"] >= 800 and rec["duration_ms"] - rec["upstream_ms"] < 500
    assert wait_for(lambda: metric(gw, "seekgate_overhead_seconds_sum", protocol="openai") > overhead, 5.0)
    assert metric(gw, "seekgate_overhead_seconds_sum", protocol="openai") - overhead < 0.5


def test_client_leaving_mid_stream_cancels_in_triton_and_the_audit_counts(gw: Gateway,
                                                                           relays: tuple[TcpRelay, TcpRelay]) -> None:
    relay = relays[0]
    key_id, key = gw.key(owner="leaver")
    marker = f"leave-{uuid.uuid4().hex}"
    # 150: with the chat template the marker is 51 to 56 tokens, and 200 beside the longest is at the context's end.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": marker}], "max_tokens": 150,
                       "stream": True}).encode()
    leave_mid_answer(relay, marker,
                     lambda: raw_request(gw, "POST", "/v1/chat/completions", body,
                                         {**bearer(key), "Content-Type": "application/json"}),
                     streaming_200)
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["reason"], rec["http_status"]) == ("error", "client_disconnected", 499)
    assert 1 <= rec["output_tokens"] < 150 and rec["openai"]["endpoint"] == "/v1/chat/completions"


def test_client_leaving_a_whole_answer_cancels_in_triton_and_the_audit_counts(
        gw: Gateway, relays: tuple[TcpRelay, TcpRelay]) -> None:
    """Not streamed: the client waits for one answer at the end, and leaves while Triton generates it."""
    relay = relays[0]
    key_id, key = gw.key(owner="whole-leaver")
    marker = f"leave-whole-{uuid.uuid4().hex}"
    body = json.dumps({"model": MODEL, "prompt": marker, "max_tokens": 200, "temperature": 0}).encode()
    # Nothing reaches the client before the end: under way means Triton's first token reached
    # seekgate, and the next ones wait in the relay while the client waits too.
    def first_token_held(_: socket.socket) -> None:
        assert relay.holding.wait(60), "no token from Triton"
    leave_mid_answer(relay, marker,
                     lambda: raw_request(gw, "POST", "/v1/completions", body,
                                         {**bearer(key), "Content-Type": "application/json"}),
                     first_token_held)
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["reason"], rec["http_status"]) == ("error", "client_disconnected", 499)
    assert 1 <= rec["output_tokens"] < 200 and rec["input_tokens"] >= 1
    assert rec["openai"]["endpoint"] == "/v1/completions"


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_cut_short_by_its_client_is_charged_exactly_its_records_counts(gw: Gateway, relay: TcpRelay,
                                                                               endpoint: str) -> None:
    """One record for the stream the client left (usage asked for, never sent), and the budget spent is exactly
    that record's tokens: seen through the next chat without max_tokens, which gets all that is left."""
    key_id, key = gw.key(owner=f"cut-short-{endpoint[4:8]}", limits={"daily_tokens": 300})
    marker = f"cut-short-{uuid.uuid4().hex}"
    asked: dict[str, Any] = ({"messages": [{"role": "user", "content": marker}]} if endpoint.endswith("chat/completions")
                             else {"prompt": marker})
    # 150: the chat template and a random hex marker make up to 60 prompt tokens, and 200 beside them could be
    # over the tiny model's context (a 400, no stream).
    body = json.dumps({"model": MODEL, **asked, "max_tokens": 150, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    leave_mid_answer(relay, marker,
                     lambda: raw_request(gw, "POST", endpoint, body, {**bearer(key), "Content-Type": "application/json"}),
                     streaming_200)
    (rec,) = records_of(gw, key_id)
    assert (rec["reason"], rec["http_status"]) == ("client_disconnected", 499)
    assert rec["input_tokens"] >= 1 and 1 <= rec["output_tokens"] < 150
    time.sleep(0.5)   # nothing more comes of it: still one record
    assert sum(r["key_id"] == key_id for r in audit_records(gw)) == 1
    after = f"m1234abcd {uuid.uuid4().hex[:8]} hi"
    client(gw, key, max_retries=0).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": after}],
                                                           temperature=0)
    assert forwarded_max_tokens(relay, after)[0] == 300 - rec["input_tokens"] - rec["output_tokens"]


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_before_the_first_token_is_499_at_once(gw: Gateway, relays: tuple[TcpRelay, TcpRelay],
                                                              stream: bool) -> None:
    """Gone while its request waits for Triton: dropped then (not prefilled for nobody), audited 499, not 200."""
    key_id, key = gw.key(owner=f"early-leaver-{stream}")
    marker = f"early-{uuid.uuid4().hex}"
    body = json.dumps({"model": MODEL, "prompt": marker, "max_tokens": 200, "stream": stream}).encode()
    leave_while_held(relays[0], marker,
                     lambda: raw_request(gw, "POST", "/v1/completions", body,
                                         {**bearer(key), "Content-Type": "application/json"}),
                     lambda: any(r["key_id"] == key_id for r in audit_records(gw)))
    time.sleep(0.5)   # released: nothing more comes of it
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["reason"], rec["http_status"]) == ("error", "client_disconnected", 499)


def test_tokens_generated_after_a_client_left_are_charged(gw: Gateway, triton: TritonProcess,
                                                          relays: tuple[TcpRelay, TcpRelay]) -> None:
    """Triton finishes the answer into the relay's buffers while the client leaves: seekgate reads on to
    the last event (openai.count_wait_s) and the record holds what was generated, not the first token."""
    relay = relays[0]
    key_id, key = gw.key(owner="leave-charged")
    marker = f"leave-charged-{uuid.uuid4().hex}"
    body = json.dumps({"model": MODEL, "prompt": marker, "max_tokens": 24, "temperature": 0,
                       "stream": True}).encode()
    before = settled_metrics(triton, "deepseek_stream")["deepseek_generated_tokens_total"]
    relay.hold_after(b"data:")
    try:
        sock = raw_request(gw, "POST", "/v1/completions", body, {**bearer(key), "Content-Type": "application/json"})
        streaming_200(sock)
        sock.close()
        time.sleep(0.3)   # seekgate notices the leave before the rest of the answer flows
    finally:
        relay.let_flow()
    generated = settled_metrics(triton, "deepseek_stream")["deepseek_generated_tokens_total"] - before
    (rec,) = records_of(gw, key_id)
    assert (rec["reason"], rec["http_status"]) == ("client_disconnected", 499)
    assert rec["output_tokens"] == generated > 1


def test_triton_breaking_off_mid_stream_is_an_error_event_the_sdk_raises(gw: Gateway,
                                                                          relays: tuple[TcpRelay, TcpRelay]) -> None:
    """Headers and the first chunks are out when Triton's answer breaks off: the stream ends with OpenAI's
    error event (the SDK raises APIError from it), never a finish_reason and [DONE] the SDK would take for a
    whole answer; one record, an error, with the tokens counted before the break."""
    relay = relays[0]
    key_id, key = gw.key(owner="broken-stream")
    marker = f"broken-{uuid.uuid4().hex}"
    relay.hold_after(b"data:")
    try:
        stream = client(gw, key, max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": marker}], max_tokens=50, temperature=0, stream=True,
            stream_options={"include_usage": True})
        it = iter(stream)
        assert next(it).choices[0].delta.role == "assistant"
        upstream = relay.connection_carrying(marker.encode())
        assert upstream is not None
        relay.cut(upstream)
        assert upstream.closed.wait(30)
    finally:
        relay.let_flow()
    got: list[Any] = []
    with pytest.raises(openai.APIError) as err:
        got.extend(it)
    assert not isinstance(err.value, openai.APIStatusError)   # raised from the event, the status was 200
    assert isinstance(err.value.body, dict) and (err.value.body["type"], err.value.body["code"]) == (
        "server_error", "service_unavailable")
    assert not any(ch.choices and ch.choices[0].finish_reason for ch in got) and all(ch.usage is None for ch in got)
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["http_status"]) == ("error", 200)
    assert rec["reason"].startswith("upstream_broke_mid_response") and 1 <= rec["output_tokens"] < 50


def test_triton_breaking_off_mid_answer_is_a_clean_503(gw: Gateway, relays: tuple[TcpRelay, TcpRelay]) -> None:
    """Not streamed, nothing was sent yet: a clean 503 (InternalServerError, which the SDK would retry), never
    the part gathered so far as if it were the answer; one record, with the tokens Triton made before the break."""
    relay = relays[0]
    key_id, key = gw.key(owner="broken-whole")
    marker = f"broken-whole-{uuid.uuid4().hex}"
    relay.hold_after(b"data:")

    def cut_when_held() -> None:
        try:
            assert relay.holding.wait(60), "no token from Triton"
            upstream = relay.connection_carrying(marker.encode())
            assert upstream is not None
            relay.cut(upstream)
            upstream.closed.wait(30)
        finally:
            relay.let_flow()
    cutter = threading.Thread(target=cut_when_held)
    cutter.start()
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client(gw, key, max_retries=0).completions.create(model=MODEL, prompt=marker, max_tokens=50,
                                                              temperature=0)
    finally:
        cutter.join(90)
    assert (err.value.status_code, err.value.code) == (503, "service_unavailable")
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["http_status"]) == ("error", 503)
    assert rec["reason"].startswith("upstream_broke_mid_response") and 1 <= rec["output_tokens"] < 50


def test_under_strict_audit_each_answer_is_recorded_once_before_the_client_has_it(
        relays: tuple[TcpRelay, TcpRelay], tmp_path: Path) -> None:
    """audit.durability strict on /v1: a whole answer and a stream's last chunk (usage, [DONE]) leave only once
    their record is durable, so it is there when the SDK returns; one record each, with usage's counts."""
    with gateway_via(tmp_path, *relays, **{"audit.durability": "strict"}) as g:
        key_id, key = g.key(owner="strict-openai")
        c = client(g, key, max_retries=0)
        whole = c.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
        now = [r for r in audit_records(g) if r["key_id"] == key_id]   # read at once: no waiting for the writer
        assert whole.usage is not None and [(r["http_status"], r["input_tokens"], r["output_tokens"]) for r in now] \
            == [(200, whole.usage.prompt_tokens, whole.usage.completion_tokens)]
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        now = [r for r in audit_records(g) if r["key_id"] == key_id]
        assert usage is not None and [(r["http_status"], r["input_tokens"], r["output_tokens"]) for r in now[1:]] \
            == [(200, usage.prompt_tokens, usage.completion_tokens)]
        time.sleep(0.5)   # finish() adds no second record for either
        assert len([r for r in audit_records(g) if r["key_id"] == key_id]) == 2


# ------------------------------------------------------------------ refusals, as the SDK raises them

def test_a_wrong_key_is_authentication_error(gw: Gateway) -> None:
    _, key = gw.key(owner="typo")
    with pytest.raises(openai.AuthenticationError) as err:
        client(gw, key[:-2] + ("aa" if not key.endswith("aa") else "bb")).models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(gw, "not-a-key").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_policy_denying_the_openai_api_to_a_role(gw: Gateway) -> None:
    _, key = gw.key(owner="batcher", roles=("batch",))
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(gw, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)
    assert err.value.status_code == 403
    assert [m.id for m in client(gw, key).models.list()] == []
    # The same key keeps Triton's own protocol.
    status, _, _ = call(gw.url + "/v2/models/deepseek/generate", "POST", {"text_input": "hi", "max_tokens": 2}, key)
    assert status == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_deny_on_the_twin_that_runs_holds_on_v1(gw: Gateway, stream: bool) -> None:
    key_id, key = gw.key(owner=f"nostream-{stream}", roles=("nostream",))
    status, _, _ = call(gw.url + "/v2/models/deepseek_stream/generate_stream", "POST",
                        {"text_input": "hi", "max_tokens": 2}, key)
    assert status == 403
    with pytest.raises(openai.PermissionDeniedError):
        client(gw, key, max_retries=0).completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=stream)
    rec = records_of(gw, key_id, 2)[1]
    assert (rec["status"], rec["http_status"], rec["rule"]) == ("denied", 403, "nostream-twin")
    assert rec["resource"] == "model:deepseek" and rec["openai"]["runs_on"] == "deepseek_stream"


def test_a_rules_limits_on_the_twin_hold_on_v1(gw: Gateway) -> None:
    _, key = gw.key(owner="twinlimited", roles=("twinlimited",))
    c = client(gw, key, max_retries=0)
    c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2)


def test_a_keys_model_list_must_name_the_twin_too(gw: Gateway) -> None:
    _, named_only = gw.key(owner="listed", models=("deepseek",))
    with pytest.raises(openai.PermissionDeniedError):
        client(gw, named_only).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    _, both = gw.key(owner="listed2", models=("deepseek", "deepseek_stream"))
    assert client(gw, both).completions.create(model=MODEL, prompt="hi", max_tokens=2).choices


def test_an_unknown_v1_route_is_not_found_in_openais_shape(gw: Gateway) -> None:
    _, key = gw.key(owner="embedder")
    with pytest.raises(openai.NotFoundError) as err:
        client(gw, key, max_retries=0).embeddings.create(model=MODEL, input="hi")
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["message"].startswith("Invalid URL (POST /v1/embeddings)")
    with pytest.raises(openai.AuthenticationError):   # authentication first, as on every route
        client(gw, "not-a-key", max_retries=0).embeddings.create(model=MODEL, input="hi")
    # /v1/sessions is seekgate's own, in Triton's shape
    status, _, body = call(gw.url + "/v1/sessions", "POST", {}, key)
    assert status == 200 and "error" not in json.loads(body)


def test_a_wrong_method_is_405_naming_the_allowed_one_once_authenticated(gw: Gateway) -> None:
    _, key = gw.key(owner="wrong-method")
    with pytest.raises(openai.APIStatusError) as err:   # OpenAI's stored chat completions: GET, not served here
        client(gw, key, max_retries=0).chat.completions.list()
    assert err.value.status_code == 405 and err.value.response.headers["allow"] == "POST"
    with pytest.raises(openai.AuthenticationError):   # authentication first, as on every route
        client(gw, "not-a-key", max_retries=0).chat.completions.list()
    status, headers, _ = call(gw.url + "/v1/models", "POST", {}, key)
    assert status == 405 and headers["Allow"] == "GET"
    assert call(gw.url + "/v1/models", "POST", {})[0] == 401


def test_an_unknown_model_is_not_found(gw: Gateway) -> None:
    _, key = gw.key(owner="lost")
    with pytest.raises(openai.NotFoundError) as err:
        client(gw, key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_the_models_own_refusals_are_clean_and_name_the_param(gw: Gateway, stream: bool) -> None:
    """Triton frames generate_stream's refusal as an SSE event; the client reads the model's message alone."""
    c = client(gw, gw.key(owner=f"refused-{stream}")[1], max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=600, stream=stream)
    assert err.value.body == {"message": "max_tokens 600 is over this model's cap of 512", "type": "invalid_request_error",
                              "param": "max_tokens", "code": None}
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=8,
                                  stream=stream)
    assert (err.value.param, err.value.code) == ("messages", "context_length_exceeded")
    assert isinstance(err.value.body, dict) and "over the context length" in err.value.body["message"]
    assert "data:" not in err.value.body["message"]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_prompt_that_fills_the_context_without_max_tokens_is_refused_without_naming_one(gw: Gateway,
                                                                                          relay: TcpRelay,
                                                                                          endpoint: str) -> None:
    """No max_tokens named and no room beside the prompt: 400 context_length_exceeded after one try, whose
    message names the prompt and the context, not the max_tokens seekgate chose (the client sent none, and
    no smaller one would fit)."""
    c = client(gw, gw.key(owner=f"fills-{endpoint}")[1], max_retries=0)
    marker = f"m1234abcd {uuid.uuid4().hex[:8]}"
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker + " word" * 300}])
        else:
            c.completions.create(model=MODEL, prompt=marker + " word" * 300)
    assert (err.value.param, err.value.code) == ("messages" if endpoint == "chat" else "prompt",
                                                 "context_length_exceeded")
    assert isinstance(err.value.body, dict)
    assert re.fullmatch(rf"prompt of \d+ tokens is over the context length of {CONTEXT} tokens",
                        err.value.body["message"]), err.value.body
    assert relay.seen().count(marker.encode()) == 1   # one try: no retry asks for a room that is not there


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 5}, "max_tokens"),          # over the role cap of 4
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_parameters_are_bad_request_naming_the_param(gw: Gateway, kwargs: dict[str, Any], param: str) -> None:
    _, key = gw.key(owner="capped", roles=("capped",))
    with pytest.raises(openai.BadRequestError) as err:
        client(gw, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kwargs)
    assert err.value.status_code == 400 and err.value.param == param


@pytest.mark.parametrize("body, message", [
    (b'{"model": "deepseek", "messages": [', "malformed JSON"),
    (b"", "malformed JSON"),
    (b'[{"model": "deepseek"}]', "request JSON must be an object"),
    (b'{"model": "deepseek", "prompt": "\xff"}', "request body is not UTF-8"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_that_is_no_json_object_is_a_bad_request_in_openais_shape(gw: Gateway, relay: TcpRelay, path: str,
                                                                        body: bytes, message: str) -> None:
    """What the SDK cannot send (raw HTTP can): 400 in OpenAI's shape, which every OpenAI client parses, audited
    as denied, and nothing reaches Triton."""
    key_id, key = gw.key(owner=f"unparsed-{uuid.uuid4().hex[:6]}")
    forwarded = relay.seen().count(b"generate_stream")   # seekgate's health checks go on meanwhile: not those
    status, headers, answer = call(gw.url + path, "POST", body, key, {"Content-Type": "application/json"})
    assert (status, headers["Content-Type"].split(";")[0]) == (400, "application/json")
    error = json.loads(answer)["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)
    assert error["message"].startswith(message)
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["http_status"], rec["protocol"]) == ("denied", 400, "openai")
    assert relay.seen().count(b"generate_stream") == forwarded


def test_no_credential_and_a_compressed_body_are_refused_in_openais_shape(gw: Gateway) -> None:
    """Raw HTTP without an Authorization header (the SDK always sends one): 401 with OpenAI's invalid_api_key;
    a gzip body, which OpenAI's API does not take either: 415, in the same shape."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    for path in ("/v1/completions", "/v1/models"):
        status, headers, answer = call(gw.url + path, "POST" if path != "/v1/models" else "GET",
                                       body if path != "/v1/models" else None)
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="seekgate"')
        assert json.loads(answer)["error"]["code"] == "invalid_api_key"
    _, key = gw.key(owner="gzipper")
    status, _, answer = call(gw.url + "/v1/completions", "POST", gzip.compress(body), key,
                             {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 415
    assert json.loads(answer)["error"]["type"] == "invalid_request_error"


def test_an_integer_past_pythons_digit_limit_is_a_bad_request_not_a_500(gw: Gateway) -> None:
    """json's int() raises past 4300 digits: refused as out of range, in OpenAI's shape, not an internal error
    the SDK would retry. (The SDK cannot send one: its own json.dumps raises; raw HTTP does.)"""
    _, key = gw.key(owner="digits")
    body = b'{"model": "deepseek", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}"
    status, _, answer = call(gw.url + "/v1/chat/completions", "POST", body, key, {"Content-Type": "application/json"})
    assert status == 400
    error = json.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and "outside the 64-bit range" in error["message"]


def test_asking_for_plain_text_explicitly_is_taken(gw: Gateway) -> None:
    """response_format {"type": "text"} and modalities ["text"] are OpenAI's defaults, which frameworks send as
    such: they ask for what every answer is. JSON mode is still refused (above)."""
    c = client(gw, gw.key(owner="plain-text")[1], max_retries=0)
    answer = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       response_format={"type": "text"}, modalities=["text"])
    assert answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  modalities=["text", "audio"])
    assert err.value.param == "modalities"


def test_a_max_tokens_past_any_budget_is_refused_as_too_large(gw: Gateway) -> None:
    """Not told it "must be at least 1" when it is far above: the refusal states the range."""
    with pytest.raises(openai.BadRequestError) as err:
        client(gw, gw.key(owner="huge-budget")[1], max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2**40)
    assert err.value.param == "max_tokens"
    assert isinstance(err.value.body, dict)
    assert err.value.body["message"] == f"max_tokens must be an integer from 1 to 2147483647, got {2**40}"


def test_max_completion_tokens_wins_and_the_role_cap_applies(gw: Gateway) -> None:
    _, key = gw.key(owner="capped2", roles=("capped",))
    c = client(gw, key)
    answer = c.completions.create(model=MODEL, prompt="Hello", max_tokens=100, temperature=0,
                                  extra_body={"max_completion_tokens": 3})
    assert answer.usage is not None and answer.usage.completion_tokens <= 3
    # The default of 16 is over the cap of 4: held to it, not refused (the client did not ask for more).
    held = c.completions.create(model=MODEL, prompt="Hello", temperature=0)
    assert held.usage is not None and 1 <= held.usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError) as err:   # asked for, it is refused
        c.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=5)
    assert err.value.param == "max_tokens"


# ------------------------------------------------------------------ max_tokens left out

CONTEXT = 256   # the tiny checkpoint's max_position_embeddings: config.pbtxt's context_length 0 takes it


def forwarded_max_tokens(relay: TcpRelay, marker: str) -> list[int]:
    """The max_tokens of each generate body seekgate sent Triton for the request carrying `marker`."""
    bodies = relay.seen().split(b'{"text_input": ')[1:]   # the door's bodies begin so (generate_body)
    return [int(n) for body in bodies if marker.encode() in body[:300]
            for n in re.findall(rb'"max_tokens": (\d+)', body[:300])[:1]]


def test_chat_without_max_tokens_generates_to_the_models_cap_or_the_context_end(gw: Gateway, relay: TcpRelay) -> None:
    """As OpenAI and vLLM: no max_tokens is no cut at 16 (that is legacy completions' default). The model's
    cap (512) is over what fits beside the prompt in the tiny checkpoint's context: what fits is asked."""
    key_id, key = gw.key(owner="chat-default")
    marker = "m1234abcd Hello"   # greedy, the tiny model answers this with no end of sequence for 200 tokens
    answer = client(gw, key, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0)
    u, choice = answer.usage, answer.choices[0]
    assert u is not None and u.completion_tokens > 16
    assert (choice.finish_reason, u.prompt_tokens + u.completion_tokens) == ("length", CONTEXT)
    # Explicit in what was forwarded: the model's cap first, then the room its refusal named.
    assert forwarded_max_tokens(relay, marker) == [512, CONTEXT - u.prompt_tokens]
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["output_tokens"]) == ("allowed", u.completion_tokens)
    assert rec["openai"]["default_max_tokens"] == CONTEXT - u.prompt_tokens   # what seekgate chose, in the end


def test_streamed_chat_without_max_tokens_is_not_cut_at_16(gw: Gateway) -> None:
    c = client(gw, gw.key(owner="chat-default-stream")[1], max_retries=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage   # greedy, "Hello there" runs 200 tokens and more: to the context's end
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens > 16
    assert (finals, usage.total_tokens) == (["length"], CONTEXT)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_chat_without_max_tokens_is_held_to_the_role_cap_not_refused(gw: Gateway, relay: TcpRelay) -> None:
    """A role cap under the model's: the default is clipped to it (no 400), and it is what the model got."""
    c = client(gw, gw.key(owner="chat-capped40", roles=("capped40",))[1], max_retries=0)
    marker = "m1234abcd Write a poem"   # greedy: 200 tokens and more
    answer = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0)
    u = answer.usage
    assert u is not None and 1 <= u.completion_tokens <= 40
    assert (answer.choices[0].finish_reason, u.completion_tokens) == ("length", 40)
    assert forwarded_max_tokens(relay, marker) == [40]
    streamed = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage is not None and 1 <= streamed[-1].usage.completion_tokens <= 40
    with pytest.raises(openai.BadRequestError) as err:   # asked for over the cap: refused, as before
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=41)
    assert err.value.param == "max_tokens"


def test_legacy_completions_without_max_tokens_keep_openais_16(gw: Gateway, relay: TcpRelay) -> None:
    c = client(gw, gw.key(owner="completions-default")[1], max_retries=0)
    marker = "m1234abcd The quick brown fox"
    answer = c.completions.create(model=MODEL, prompt=marker, temperature=0)
    assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 16
    assert (answer.choices[0].finish_reason == "length") == (answer.usage.completion_tokens == 16)
    assert forwarded_max_tokens(relay, marker) == [16]


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_completions_default_that_does_not_fit_is_asked_again_for_the_room(gw: Gateway, relay: TcpRelay,
                                                                                  triton: TritonProcess,
                                                                                  stream: bool) -> None:
    """The context retry on /v1/completions (chat's is above): OpenAI's default of 16 beside a prompt that leaves
    fewer is asked again for what fits, read from the model's refusal, and answers to the context's end."""
    marker = f"m1234abcd {uuid.uuid4().hex[:8]}"
    prompt, prompt_tokens = "", 0
    for words in range(70, 90):   # a prompt that leaves room, under 16 tokens of it, in the context
        prompt = marker + " word" * words
        status, _, direct = call(triton.http_url + "/v2/models/deepseek/generate", "POST",
                                 {"text_input": prompt, "max_tokens": 1})
        prompt_tokens = json.loads(direct).get("input_tokens", CONTEXT) if status == 200 else CONTEXT
        if CONTEXT - 16 < prompt_tokens < CONTEXT:
            break
    assert CONTEXT - 16 < prompt_tokens < CONTEXT
    key_id, key = gw.key(owner=f"completions-room-{stream}")
    c = client(gw, key, max_retries=0)
    if stream:
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        usage, reason = chunks[-1].usage, [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
    else:
        answer = c.completions.create(model=MODEL, prompt=prompt, temperature=0)
        usage, reason = answer.usage, answer.choices[0].finish_reason
    assert usage is not None and (usage.prompt_tokens, usage.total_tokens, reason) == (prompt_tokens, CONTEXT,
                                                                                        "length")
    sent = re.findall(rb'"text_input": "' + re.escape(prompt.encode()) + rb'", "max_tokens": (\d+)', relay.seen())
    assert [int(n) for n in sent] == [16, CONTEXT - prompt_tokens]
    (rec,) = records_of(gw, key_id)
    assert (rec["status"], rec["input_tokens"], rec["output_tokens"]) == ("allowed", prompt_tokens,
                                                                          CONTEXT - prompt_tokens)
    assert rec["openai"]["default_max_tokens"] == CONTEXT - prompt_tokens


def test_a_budget_smaller_than_the_default_grants_what_is_left(gw: Gateway, relay: TcpRelay) -> None:
    """The default is reserved up front like any max_tokens, but it is seekgate's choice, not the client's:
    a daily budget with 30 tokens left answers with at most 30 (what is left), not a 429 for the cap.
    A max_tokens the client names over what is left is refused, as OpenAI's limits do."""
    key_id, key = gw.key(owner="small-budget", limits={"daily_tokens": 30})
    c = client(gw, key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=31)
    marker = "m1234abcd Tell me a story"
    answer = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0)
    assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 30
    assert forwarded_max_tokens(relay, marker) == [30]
    assert records_of(gw, key_id, 2)[-1]["openai"]["default_max_tokens"] == 30
    # Settled to the real use (prompt included): the budget is spent, and the next default finds none left.
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_a_client_gone_during_the_context_retry_is_charged_what_the_retry_could_use(gw: Gateway,
                                                                                   relay: TcpRelay) -> None:
    """The default (512, the model's cap) was reserved up front; the model's context refusal had it asked again
    for the room (about 230). A client that leaves while that retry waits for Triton has no count read, so it
    is charged fail-closed, the most the request could have used: the retry's prompt and room, not the
    512 that never ran. Seen through the next default, which gets exactly the budget then left."""
    marker = f"m1234abcd {uuid.uuid4().hex[:8]}"
    messages = [{"role": "user", "content": marker + " hello" * 45}]
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    headers = {**bearer(gw.key(owner="retry-probe")[1]), "Content-Type": "application/json"}
    probe = raw_request(gw, "POST", "/v1/chat/completions", body, headers)
    assert read_until(probe, b"\r\n").startswith(b"HTTP/1.1 200")
    probe.close()
    first, room = forwarded_max_tokens(relay, marker)   # 512, then what fits beside this prompt
    assert first == 512 and 0 < room < 300
    # The retry's generate body from its max_tokens through the prompt: over the 256 bytes of a connection's
    # previous request the relay also matches in, so it holds the retry and not the first try.
    retry = json.dumps({"max_tokens": room, "temperature": 1.0, "messages": json.dumps(messages)})[1:-1]
    assert len(retry) > 256
    key_id, key = gw.key(owner="retry-leaver", limits={"daily_tokens": 600})
    headers = {**bearer(key), "Content-Type": "application/json"}
    leave_while_held(relay, retry,
                     lambda: raw_request(gw, "POST", "/v1/chat/completions", body, headers),
                     lambda: any(r["key_id"] == key_id for r in audit_records(gw)))
    (gone,) = records_of(gw, key_id)
    assert (gone["http_status"], gone["openai"]["default_max_tokens"]) == (499, room)
    after = f"m1234abcd {uuid.uuid4().hex[:8]} hi"
    client(gw, key, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": after}], temperature=0)
    left = forwarded_max_tokens(relay, after)[0]
    assert left > 600 - 512, "charged the 512 that never ran, not what the retry could use"


@pytest.fixture
def gw_redis(relays: tuple[TcpRelay, TcpRelay], tmp_path_factory: pytest.TempPathFactory, redis_server_url: str,
             redis_prefix: str) -> Iterator[Gateway]:
    """A seekgate whose limits are counted in the real Redis (redis.url), under a key prefix of this test alone;
    its keys are deleted after it (only those: the server may be shared)."""
    import redis

    root = tmp_path_factory.mktemp("gw-openai-redis")
    try:
        with gateway_via(root, *relays, **{"redis.url": redis_server_url, "redis.key_prefix": redis_prefix}) as g:
            yield g
    finally:
        r = redis.Redis.from_url(redis_server_url)
        for k in list(r.scan_iter(match=redis_prefix + "*", count=1000)):
            r.delete(k)
        r.close()


@pytest.mark.parametrize("budget", ["daily_tokens", "tpm"])
def test_a_budget_in_redis_smaller_than_the_default_grants_exactly_what_is_left(gw_redis: Gateway, relay: TcpRelay,
                                                                                budget: str, redis_server_url: str,
                                                                                redis_prefix: str) -> None:
    """The default's fit on the shared limiter (the Lua script's refusal names what is left): a chat request
    without max_tokens gets exactly the remainder of a budget under the model's cap (512), while a max_tokens
    or max_completion_tokens the client names over it is a 429 that charges nothing."""
    gw = gw_redis
    key_id, key = gw.key(owner=f"redis-budget-{budget}", limits={budget: 30})
    c = client(gw, key, max_retries=0)
    hi: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=hi, max_tokens=31)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=hi, max_completion_tokens=31)
    marker = f"m1234abcd {budget} Tell me a story"
    answer = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], temperature=0)
    assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 30
    assert forwarded_max_tokens(relay, marker) == [30]   # the refusals charged nothing: all 30 are left
    assert records_of(gw, key_id, 3)[-1]["openai"]["default_max_tokens"] == 30
    import redis
    with redis.Redis.from_url(redis_server_url) as r:   # counted in Redis, not in the process
        assert list(r.scan_iter(match=f"{redis_prefix}{key_id}:d:*"))
    with pytest.raises(openai.RateLimitError):   # settled to the real use, prompt included: none left
        c.chat.completions.create(model=MODEL, messages=hi)


def test_a_refusal_of_max_completion_tokens_names_max_completion_tokens(gw: Gateway) -> None:
    """The generate body knows only max_tokens; the client that sent max_completion_tokens reads its own name."""
    _, capped = gw.key(owner="capped3", roles=("capped",))
    with pytest.raises(openai.BadRequestError) as err:   # over the role's cap (seekgate's check_body)
        client(gw, capped).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_completion_tokens=9)
    assert err.value.param == "max_completion_tokens"
    _, key = gw.key(owner="uncapped-mct")
    with pytest.raises(openai.BadRequestError) as err:   # over the model's cap (the model's own refusal)
        client(gw, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_completion_tokens=600)
    assert err.value.param == "max_completion_tokens" and "cap of 512" in err.value.message


def test_rate_limited_429_is_retried_by_the_sdk_after_retry_after(gw: Gateway,
                                                                   relays: tuple[TcpRelay, TcpRelay]) -> None:
    key_id, key = gw.key(owner="retrier", limits={"concurrency": 1})
    no_retry = client(gw, key, max_retries=0)
    relays[0].hold_after(b"data:")   # the stream below stays open until its client closes it
    try:
        held = no_retry.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hold"}],
                                                max_tokens=60, stream=True)
        next(iter(held))   # the one slot is taken while this stream is open
        with pytest.raises(openai.RateLimitError) as err:
            no_retry.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert err.value.code == "rate_limit_exceeded" and err.value.response.headers["retry-after"] == "1"
        # The SDK (max_retries=2) gets a 429, waits Retry-After and tries again; the slot is freed meanwhile.
        # The relay holds every connection's answers: it flows again once the stream is closed.
        threading.Timer(0.3, lambda: (held.close(), relays[0].let_flow())).start()
        answer = client(gw, key, max_retries=2).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=2)
    finally:
        relays[0].let_flow()
    assert answer.http_response.status_code == 200
    records = records_of(gw, key_id, 4)
    assert [r["http_status"] for r in records[1:]] == [429, 429, 200]
    gap = _when(records[3]) - _when(records[2])
    assert gap >= 0.9, f"retried {gap:.2f}s after the 429, before its Retry-After of 1 s"


def _when(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def test_triton_down_is_503_internal_server_error(tmp_path: Path) -> None:
    from tests.conftest import free_ports
    (port,) = free_ports(1)   # nothing listens there
    relay = TcpRelay("127.0.0.1", port).start()
    try:
        with gateway_via(tmp_path, relay) as gw:
            _, key = gw.key(owner="orphan")
            with pytest.raises(openai.InternalServerError) as err:
                client(gw, key, max_retries=0).completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert err.value.status_code == 503 and err.value.code == "service_unavailable"
    finally:
        relay.stop()
