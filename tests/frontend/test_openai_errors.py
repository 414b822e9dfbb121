"""Triton's refusals as OpenAI errors: which are the client's (400, the param) and which the server's (5xx)."""

from __future__ import annotations

from proxy.frontend.openai_errors import context_room, message_of, refusal
from proxy.frontend.openai_request import CHAT, COMPLETIONS
from proxy.frontend.openai_shapes import error_body


def test_generate_streams_sse_framing_is_taken_off() -> None:
    assert message_of(b'data: {"error":"max_tokens 600 is over this model\'s cap of 512"}\n\n') == \
        "max_tokens 600 is over this model's cap of 512"
    assert message_of(b'{"error":"x"}') == "x"
    assert message_of(b"not json") == "not json"


def test_a_server_fault_in_a_400_is_a_500_server_error_the_sdk_retries() -> None:
    err = refusal(400, "Stub process 'deepseek_stream_0_0' is not healthy.", "deepseek", CHAT)
    assert err.http_status == 500
    assert error_body(err)["error"]["type"] == "server_error"
    assert "Stub process" not in error_body(err)["error"]["message"] and "not healthy" in err.reason


def test_the_prompt_param_is_the_endpoints() -> None:
    too_long = "prompt of 3000 tokens plus max_tokens 8 is over the context length of 2048 tokens"
    assert error_body(refusal(400, too_long, "deepseek", COMPLETIONS))["error"]["param"] == "prompt"
    assert error_body(refusal(400, too_long, "deepseek", CHAT))["error"]["code"] == "context_length_exceeded"
    assert error_body(refusal(400, "input 'stop' is not valid UTF-8", "deepseek", CHAT))["error"]["param"] == "stop"


def test_the_room_a_context_refusal_leaves_for_a_default_max_tokens() -> None:
    """What the door asks again for when its default did not fit: the context less the model's prompt count."""
    def room(message: str, status: int = 400) -> int | None:
        return context_room(refusal(status, message, "deepseek", CHAT))

    assert room("prompt of 26 tokens plus max_tokens 512 is over the context length of 256 tokens") == 230
    assert room("prompt of 300 tokens plus max_tokens 512 is over the context length of 256 tokens") is None
    assert room("prompt of 255 tokens plus max_tokens 8 is over the context length of 256 tokens") == 1
    assert room("prompt of 256 tokens plus max_tokens 8 is over the context length of 256 tokens") is None
    assert room("max_tokens 600 is over this model's cap of 512") is None
    assert room("prompt of 26 tokens plus max_tokens 512 is over the context length of 256 tokens", 500) is None
