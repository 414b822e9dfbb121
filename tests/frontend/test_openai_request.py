"""OpenAI request checks and translation, the stream's stop filter and the error shapes (pure functions)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.errors import Forbidden, RateLimited, Unauthenticated, UpstreamUnavailable
from proxy.frontend.openai_request import CHAT, COMPLETIONS, OpenAIBadRequest, parse_request
from proxy.frontend.openai_shapes import ChunkWriter, ModelNotFound, StopFilter, error_body
from proxy.steps.body_view import view_http


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "deepseek", "messages": [{"role": "user", "content": "hi"}], **kw}


def test_chat_translates_to_the_models_own_inputs_and_body_view_reads_them() -> None:
    req = parse_request(CHAT, chat(max_tokens=5, temperature=0.5, top_p=0.9, seed=7, stop="x", user="u1",
                                   messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                               {"type": "text", "text": "b"}]},
                                             {"role": "user", "content": "hi"}]))
    body = req.generate_body(16)
    assert json.loads(body["messages"]) == [{"role": "system", "content": "ab"}, {"role": "user", "content": "hi"}]
    assert (body["text_input"], body["max_tokens"], body["temperature"], body["seed"], "stop" in body) == (
        "", 5, 0.5, 7, False)   # stops are the relay's (StopFilter), for whole answers as for streams
    view = view_http("generate", json.dumps(body).encode(), [])
    assert view.asked_tokens() == 5
    assert {p.key for p in view.parameters} == {"text_input", "messages", "max_tokens", "temperature", "top_p",
                                                "seed"}


def test_defaults_and_max_completion_tokens_wins() -> None:
    body = parse_request(COMPLETIONS, {"model": "m", "prompt": ["p"]}).generate_body(16)
    assert (body["max_tokens"], body["temperature"], "stop" in body) == (16, 1.0, False)
    req = parse_request(COMPLETIONS, {"model": "m", "prompt": "p", "max_tokens": 9, "max_completion_tokens": 3})
    assert req.max_tokens == 3
    for stream in (True, False):
        req = parse_request(COMPLETIONS, {"model": "m", "prompt": "p", "stop": ["a"], "stream": stream})
        assert "stop" not in req.generate_body(16) and req.stop == ("a",)


def test_safety_identifier_wins_over_user() -> None:
    assert parse_request(CHAT, chat(user="a", safety_identifier="b", prompt_cache_key="k")).user == "b"
    assert parse_request(CHAT, chat(user="a")).user == "a"


@pytest.mark.parametrize("endpoint, doc, param", [
    (CHAT, chat(n=2), "n"),
    (CHAT, chat(tools=[{}]), "tools"),
    (CHAT, chat(logprobs=True), "logprobs"),
    (CHAT, chat(response_format={"type": "json_object"}), "response_format"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (CHAT, chat(temperature=2.5), "temperature"),
    (CHAT, chat(top_p=0), "top_p"),
    (CHAT, chat(max_tokens=0), "max_tokens"),
    (CHAT, chat(max_tokens=True), "max_tokens"),
    (CHAT, chat(stop=["a"] * 5), "stop"),
    (CHAT, chat(stream_options={"include_usage": True}), "stream_options"),
    (CHAT, chat(stream=True, stream_options={"include_usage": True, "x": 1}), "stream_options"),
    (CHAT, chat(stream=True, stream_options={"include_obfuscation": True}), "stream_options.include_obfuscation"),
    (CHAT, chat(frobnicate=1), "frobnicate"),
    (CHAT, chat(messages=[]), "messages"),
    (CHAT, chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content[0]"),
    (CHAT, chat(messages=[{"role": "assistant", "content": "a", "refusal": "no"}]), "messages[0].refusal"),
    (CHAT, chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{}]}]), "messages[0].tool_calls"),
    (CHAT, chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model"),
    (CHAT, chat(model="../etc"), "model"),
    (CHAT, chat(model="org/../etc"), "model"),
    (CHAT, chat(model="a/b/c"), "model"),
    (CHAT, chat(model="org/"), "model"),
    (CHAT, chat(model="/abs"), "model"),
    (COMPLETIONS, {"model": "m", "prompt": [1, 2]}, "prompt"),
    (COMPLETIONS, {"model": "m", "prompt": "p", "logprobs": 2}, "logprobs"),
    (COMPLETIONS, {"model": "m", "prompt": "p", "echo": "yes"}, "echo"),
    (CHAT, chat(safety_identifier="x" * 129), "safety_identifier"),
    (CHAT, chat(prompt_cache_key=1), "prompt_cache_key"),
    (COMPLETIONS, {"model": "m", "prompt": "p", "safety_identifier": "u"}, "safety_identifier"),
    (COMPLETIONS, {"model": "m", "prompt": "p", "messages": []}, "messages"),
])
def test_refusals_name_the_parameter(endpoint: str, doc: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIBadRequest) as err:
        parse_request(endpoint, doc)
    assert err.value.param == param and err.value.http_status == 400


def test_hugging_face_style_model_ids_are_well_formed() -> None:
    """organisation/name, as vLLM serves and OpenAI clients are set up with: one "/", each part a plain name."""
    assert parse_request(CHAT, chat(model="deepseek-ai/DeepSeek-V3")).model == "deepseek-ai/DeepSeek-V3"


def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    parse_request(CHAT, chat(logprobs=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tools=None))
    parse_request(COMPLETIONS, {"model": "m", "prompt": "p", "logprobs": 0, "best_of": 1})
    # include_obfuscation=false (a client saving bandwidth) asks for what seekgate's chunks are anyway.
    assert parse_request(CHAT, chat(stream=True, stream_options={"include_usage": True,
                                                                 "include_obfuscation": False})).include_usage


def test_stop_filter_never_streams_part_of_a_stop_sequence() -> None:
    f = StopFilter(("t?",))
    assert [f.feed(d) for d in ("=", "i", "t", "?", "more")] == ["=", "i", "", "", ""]
    assert f.stopped and f.flush() == ""
    g = StopFilter(("t?",))
    assert g.feed("=it") == "=i" and g.feed("x") == "tx" and not g.stopped
    h = StopFilter(("ab",))
    assert h.feed("xa") == "x" and h.flush() == "a"
    assert StopFilter(()).feed("abc") == "abc"


class _CountedStop(str):
    """A stop sequence that counts how often it is indexed or sliced: the hold-back's work on it."""

    uses = 0

    def __getitem__(self, key: Any) -> str:
        _CountedStop.uses += 1
        return str.__getitem__(self, key)


def test_stop_filter_holds_back_where_a_stop_could_begin_not_at_every_length() -> None:
    """The hold-back is tried where a stop sequence could begin, not at every length of it: a client's
    stop sequence of 300,000 characters, sliced at every length for every piece, held the event loop
    about a second per token (300,000 slices per piece here before, a handful now)."""
    _CountedStop.uses = 0
    f = StopFilter((_CountedStop("a" * 300_000 + "b"), "zz"))
    assert [f.feed(d) for d in ("xa", "a", "z")] == ["x", "", "aa"]
    assert f.flush() == "z"
    assert _CountedStop.uses <= 10, _CountedStop.uses


def test_error_shapes_carry_the_codes_the_sdk_reads() -> None:
    assert error_body(Unauthenticated("bad_checksum"))["error"]["code"] == "invalid_api_key"
    assert error_body(Forbidden())["error"]["type"] == "permission_error"
    assert error_body(ModelNotFound("x"))["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert error_body(RateLimited("rate_limited:tpm"))["error"]["type"] == "tokens"
    assert error_body(UpstreamUnavailable())["error"]["code"] == "service_unavailable"
    # The audit reason never reaches the client.
    assert "bad_checksum" not in json.dumps(error_body(Unauthenticated("bad_checksum")))


def test_chunks_role_first_usage_last_then_done() -> None:
    req = parse_request(CHAT, chat(stream=True, stream_options={"include_usage": True}))
    w = ChunkWriter(req, "chatcmpl-1", 0)
    first = json.loads(w.first()[6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    events = w.last("stop", 3, 2).split(b"\n\n")
    assert json.loads(events[0][6:])["choices"][0]["finish_reason"] == "stop"
    assert json.loads(events[1][6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert events[2] == b"data: [DONE]"
