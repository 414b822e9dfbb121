"""OpenAI request bodies (/v1/chat/completions, /v1/completions) checked and translated to a Triton generate body.

Pure functions over the parsed JSON: every refusal is an `OpenAIBadRequest` naming the parameter
(what the SDK shows as `BadRequestError.param`). Fields OpenAI defines that this model cannot honour
(tools, a JSON response_format, log-probabilities, n > 1) are refused by name rather than ignored: a client
that asked for JSON mode must not silently get prose. Unknown fields are refused as OpenAI does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_STOPS = 4   # OpenAI's own limit
# One "/" admitted: Hugging Face-style ids (deepseek-ai/DeepSeek-V3) are what OpenAI clients are set up
# with; as an alias they name a Triton model (openai.aliases), otherwise they name none (404).
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9_.:-]{0,127})?$")
_ROLES = frozenset({"system", "developer", "user", "assistant"})
# What an answer's message carries back when a client replays it as history (the SDK's own pattern:
# messages.append(answer.choices[0].message) sends `refusal: null`): at null these ask for nothing.
_REPLAYED = frozenset({"refusal", "tool_calls", "function_call", "audio", "annotations"})

# Accepted only at the value that asks for nothing (None, or the value listed): the SDKs and
# frameworks send these defaults explicitly.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
    "logprobs": (False, 0), "top_logprobs": (0,), "best_of": (1,), "suffix": ("",),
    "parallel_tool_calls": (True, False), "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
    "response_format": ({"type": "text"},), "modalities": (["text"],),   # plain text: what every answer is
}
# Asking for any of these is refused: the model cannot do them.
_UNSUPPORTED = frozenset({"tools", "tool_choice", "functions", "function_call", "audio", "prediction",
                          "reasoning_effort", "web_search_options"})
_COMMON = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
                     "stream", "stream_options", "user"})
# safety_identifier and prompt_cache_key are chat's successors of `user` (the SDK's own advice): the first
# names the end user as `user` did, the second is a caching hint that changes no answer.
_FIELDS = {CHAT: _COMMON | {"messages", "safety_identifier", "prompt_cache_key"},
           COMPLETIONS: _COMMON | {"prompt", "echo"}}


class OpenAIBadRequest(BadRequest):
    """A 400 naming the offending parameter, as OpenAI's `invalid_request_error` (`code` where OpenAI has one)."""

    def __init__(self, param: str, message: str, code: str | None = None, reason: str = "") -> None:
        super().__init__(reason or f"openai_bad_request: {param}", public_message=message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """What one OpenAI request asks for, checked."""

    endpoint: str                          # CHAT | COMPLETIONS
    model: str                             # the id the client named (an alias stays an alias here)
    prompt: str = ""                       # completions
    messages: tuple[dict[str, str], ...] = ()   # chat, content flattened to text
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"   # the name the client gave it by (refusals about it name that)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    user: str | None = None

    def generate_body(self, default_max_tokens: int) -> dict[str, Any]:
        """The Triton generate body for this request: the model's own inputs, nothing else.

        max_tokens is always explicit, so the role cap, the token charge and finish_reason all read
        the same number the model gets. OpenAI samples at temperature 1 when none is named.
        Stop sequences never go to the model: every answer runs through the decoupled twin's token
        events (frontend/openai.py), and the relay applies them (openai_shapes.StopFilter), so OpenAI's
        stop semantics do not rest on the model's own: a model that streams the start of a stop
        sequence before it knows it is one (triton_models/deepseek holds it back; another model may not)
        and cuts the rest would leave the relay unable to tell what to withhold.
        """
        body: dict[str, Any] = {"text_input": self.prompt,
                                "max_tokens": default_max_tokens if self.max_tokens is None else self.max_tokens,
                                "temperature": 1.0 if self.temperature is None else self.temperature}
        if self.endpoint == CHAT:
            # Rendered by the checkpoint's own chat template inside the model (triton_models/deepseek).
            body["messages"] = json.dumps(list(self.messages), ensure_ascii=False)
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed
        return body


def parse_request(endpoint: str, doc: dict[str, Any]) -> OpenAIRequest:
    """`doc` (strictly parsed JSON, body_view.parse_json) checked against what `endpoint` takes."""
    for key, value in doc.items():
        if key in _UNSUPPORTED:
            if value is None:
                continue
            raise OpenAIBadRequest(key, f"'{key}' is not supported by this model")
        if key in _NEUTRAL:
            if value is None or any(value == v and type(value) is type(v) for v in _NEUTRAL[key]):
                continue
            raise OpenAIBadRequest(key, f"'{key}' is not supported by this model (got {_short(value)})")
        if key not in _FIELDS[endpoint]:
            raise OpenAIBadRequest(key, f"Unrecognized request argument supplied: {key[:64]}")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIBadRequest("model", "you must provide a model parameter")
    if not _MODEL_ID.match(model):
        raise OpenAIBadRequest("model", f"invalid model id {_short(model)}")
    n = doc.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise OpenAIBadRequest("n", "only n=1 is supported")
    stream = _bool(doc, "stream")
    options = doc.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise OpenAIBadRequest("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise OpenAIBadRequest("stream_options", "stream_options takes only include_usage and include_obfuscation")
        include_usage = _bool(options, "include_usage", "stream_options.include_usage")
        # OpenAI pads its chunks (an `obfuscation` field) unless a client sets this false to save bandwidth:
        # seekgate's never do, so false is honoured as asked and true is refused, not silently dropped.
        if _bool(options, "include_obfuscation", "stream_options.include_obfuscation"):
            raise OpenAIBadRequest("stream_options.include_obfuscation", "stream obfuscation is not supported")
    _text(doc, "prompt_cache_key", 1024)   # a caching hint: checked, and it changes no answer
    # The end user: safety_identifier, user's newer name, wins where both are given (as max_completion_tokens does).
    user, named = _text(doc, "user", 256), _text(doc, "safety_identifier", 128)
    user = user if named is None else named
    max_tokens, max_tokens_param = _max_tokens(doc)
    common = dict(model=model, max_tokens=max_tokens, max_tokens_param=max_tokens_param,
                  temperature=_number(doc, "temperature", 0.0, 2.0),
                  top_p=_top_p(doc), seed=_seed(doc), stop=_stop(doc), stream=stream, include_usage=include_usage,
                  user=user)
    if endpoint == CHAT:
        return OpenAIRequest(CHAT, messages=_messages(doc.get("messages")), **common)   # type: ignore[arg-type]
    return OpenAIRequest(COMPLETIONS, prompt=_prompt(doc.get("prompt")), echo=_bool(doc, "echo"),
                         **common)   # type: ignore[arg-type]


def _short(value: Any) -> str:
    return json.dumps(value)[:64]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool(doc: dict[str, Any], key: str, param: str | None = None) -> bool:
    value = doc.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OpenAIBadRequest(param or key, f"{param or key} must be a boolean")
    return value


def _text(doc: dict[str, Any], key: str, limit: int) -> str | None:
    value = doc.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > limit):
        raise OpenAIBadRequest(key, f"{key} must be a string of at most {limit} characters")
    return value


def _max_tokens(doc: dict[str, Any]) -> tuple[int | None, str]:
    """The completion budget and the field it came from."""
    # max_completion_tokens is OpenAI's newer name; where both are given it wins (as OpenAI's API does).
    for key in ("max_completion_tokens", "max_tokens"):
        value = doc.get(key)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= 2**31 - 1:
            raise OpenAIBadRequest(key, f"{key} must be an integer from 1 to {2**31 - 1}, got {_short(value)}")
        return int(value), key
    return None, "max_tokens"


def _number(doc: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OpenAIBadRequest(key, f"{key} must be a number from {low:g} to {high:g}, got {_short(value)}")
    return float(value)


def _top_p(doc: dict[str, Any]) -> float | None:
    value = _number(doc, "top_p", 0.0, 1.0)
    if value == 0.0:
        raise OpenAIBadRequest("top_p", "top_p must be greater than 0")
    return value


def _seed(doc: dict[str, Any]) -> int | None:
    value = doc.get("seed")
    if value is None:
        return None
    if not _is_int(value) or not -(2**63) <= value < 2**63:
        raise OpenAIBadRequest("seed", "seed must be a 64-bit integer")
    return int(value)


def _stop(doc: dict[str, Any]) -> tuple[str, ...]:
    value = doc.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIBadRequest("stop", f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them")
    return tuple(stops)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise OpenAIBadRequest("prompt", "prompt must be a string or a list of one string")
    if not value.strip():
        raise OpenAIBadRequest("prompt", "prompt must not be empty")
    return value


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise OpenAIBadRequest("messages", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIBadRequest(where, f"{where} must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise OpenAIBadRequest(f"{where}.role", f"{where}.role must be one of {', '.join(sorted(_ROLES))}")
        extra = {k for k, v in message.items() if not (k in _REPLAYED and v is None)} - {"role", "content", "name"}
        if extra:
            raise OpenAIBadRequest(f"{where}.{sorted(extra)[0]}", f"{where}.{sorted(extra)[0]} is not supported")
        content = message.get("content")
        if content is None and role == "assistant":   # optional on an assistant message, as OpenAI's API has it
            content = ""
        # developer is OpenAI's newer name for system; the chat template knows system.
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(content, f"{where}.content")})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined); images and audio are refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIBadRequest(f"{where}[{j}]", f"{where}[{j}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise OpenAIBadRequest(where, f"{where} must be a string or a list of text parts")
