"""frontend/openai.py's stream relay alone, where only a stand-in transport can say when the client goes: at the
very last write, after the relay's last await (the live tests in test_openai.py cover every other leave)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.test_utils import make_mocked_request

from proxy.context import RequestContext
from proxy.frontend.openai import _stream
from proxy.frontend.openai_request import CHAT, parse_request


class _Triton:
    """generate_stream's answer as Triton sends it: token events, then the end (no socket: see the module doc)."""

    status = 200

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._chunks = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]

    async def iter_any(self) -> AsyncIterator[bytes]:
        while self._chunks:
            yield self._chunks.pop(0)

    def release(self) -> None:
        pass


def _client_gone_at(marker: bytes) -> mock.Mock:
    """A response writer whose client closed its connection just before the write carrying `marker`."""
    async def write(data: bytes) -> None:
        if marker in bytes(data):
            raise ClientConnectionResetError("Cannot write to closing transport")
    writer = mock.Mock()
    writer.write_headers = mock.AsyncMock()
    writer.write = mock.AsyncMock(side_effect=write)
    writer.write_eof = mock.AsyncMock()
    writer.drain = mock.AsyncMock()
    writer.buffer_size = writer.output_size = 0
    return writer


@pytest.mark.parametrize("events, marker", [
    # The whole answer relayed, the client gone as its finish_reason, usage and [DONE] go out.
    ([{"text_output": "Hi", "input_tokens": 3, "output_tokens": 1},
      {"text_output": " there", "input_tokens": 3, "output_tokens": 2}], b"[DONE]"),
    # The model's error after a token, the client gone as its error event goes out.
    ([{"text_output": "Hi", "input_tokens": 3, "output_tokens": 1}, {"error": "the model is shutting down"}],
     b'"error"'),
])
async def test_a_client_gone_at_the_last_write_is_a_499_not_an_internal_error(events: list[dict[str, Any]],
                                                                              marker: bytes) -> None:
    req = parse_request(CHAT, {"model": "deepseek", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                               "stream_options": {"include_usage": True}, "max_tokens": 8})
    request = make_mocked_request("POST", "/v1/chat/completions", writer=_client_gone_at(marker))
    state: Any = SimpleNamespace(settings=SimpleNamespace(openai=SimpleNamespace(count_wait_s=0.0)),
                                 audit=SimpleNamespace(strict=False))
    ctx = RequestContext(request_id="r-gone-at-the-end", client_ip="127.0.0.1", protocol="openai")
    ctx.extra["openai"] = {}
    upstream: Any = _Triton(events)
    response = await _stream(request, state, ctx, req, upstream, 8, "deepseek", None, time.perf_counter())
    assert response.prepared
    assert (ctx.status, ctx.http_status) == ("error", 499)
    assert (ctx.input_tokens, ctx.output_tokens) == (3, events[-1].get("output_tokens", 1))


async def test_the_models_error_mid_stream_ends_it_with_openais_error_event() -> None:
    """The model fails after a token (it is unloaded mid-generation: "the model is shutting down"): the headers
    are out, so the stream ends with one error event in OpenAI's shape (the SDK raises APIError from it),
    with no finish_reason, usage or [DONE] that would pass it off as a whole answer."""
    sent: list[bytes] = []
    writer = _client_gone_at(b"never sent")
    writer.write.side_effect = lambda data: sent.append(bytes(data))
    req = parse_request(CHAT, {"model": "deepseek", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                               "stream_options": {"include_usage": True}, "max_tokens": 8})
    state: Any = SimpleNamespace(settings=SimpleNamespace(openai=SimpleNamespace(count_wait_s=0.0)),
                                 audit=SimpleNamespace(strict=False))
    ctx = RequestContext(request_id="r-model-error", client_ip="127.0.0.1", protocol="openai")
    ctx.extra["openai"] = {}
    upstream: Any = _Triton([{"text_output": "Hi", "input_tokens": 3, "output_tokens": 1},
                             {"error": "the model is shutting down"}])
    await _stream(make_mocked_request("POST", "/v1/chat/completions", writer=writer), state, ctx, req, upstream, 8,
                  "deepseek", None, time.perf_counter())
    body = b"".join(sent).decode()
    events = [json.loads(e.removeprefix("data: ")) for e in body.split("\n\n") if e.strip()]
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert events[-1] == {"error": {"message": "The inference server had an error while processing your request.",
                                    "type": "server_error", "param": None, "code": None}}
    assert "[DONE]" not in body and all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert (ctx.status, ctx.http_status, ctx.output_tokens) == ("error", 200, 1)
    assert ctx.reason == "model_error: the model is shutting down"
