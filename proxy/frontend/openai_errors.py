"""Triton's refusals of the generate requests the OpenAI door sends, as OpenAI errors.

The model's own refusals of what it was asked (its RequestError texts: max_tokens over the cap, a
prompt over the context length, a bad sampling value) are the client's: 400 naming the parameter,
with OpenAI's `context_length_exceeded` code for a prompt too long. Anything else is the server's
fault (a crashed stub, an internal error), whatever status Triton gave it: a 5xx `server_error`, so
SDKs retry, with a generic message; the audit record keeps Triton's text.
"""

from __future__ import annotations

import json
import re

from ..errors import SeekgateError, UpstreamUnavailable
from .openai_request import CHAT, OpenAIBadRequest
from .openai_shapes import ModelNotFound, error_body

KEPT = 512   # characters of Triton's message kept in the audit reason
# The model's RequestError texts, most specific first: (what the text says, the OpenAI parameter, code).
# "prompt" stands for the endpoint's prompt parameter (messages on chat).
_CLIENT_ERRORS = (
    (re.compile(r"over the context length"), "prompt", "context_length_exceeded"),
    (re.compile(r"\bmax_tokens\b"), "max_tokens", None),
    (re.compile(r"\btemperature\b"), "temperature", None),
    (re.compile(r"\btop_p\b"), "top_p", None),
    (re.compile(r"chat template"), "messages", None),
    (re.compile(r"input '(\w+)'"), "", None),   # the input it names
)
# triton_models/deepseek's check_context text: what a request's max_tokens must fit in.
_CONTEXT = re.compile(r"prompt of (\d+) tokens plus max_tokens (\d+) is over the context length of (\d+) tokens")
_INPUT_PARAM = {"text_input": "prompt", "messages": "messages", "stop": "stop", "seed": "seed"}


class UpstreamFailed(SeekgateError):
    """A server-side failure in Triton: the client gets a generic message, the audit record Triton's."""

    default_message = "The inference server had an error while processing your request."


def message_of(body: bytes) -> str:
    """Triton's error text: `{"error": ...}`, also as generate_stream frames it (an SSE `data:` event)."""
    text = body.strip()
    if text.startswith(b"data:"):
        text = text[len(b"data:"):].split(b"\n\n", 1)[0].strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        return str(doc["error"])
    return body[:KEPT].decode("utf-8", "replace")


def refusal(status: int, message: str, model: str, endpoint: str) -> SeekgateError:
    """Triton's refusal (its HTTP status, or an error event in place of a token) as an OpenAI error."""
    if status >= 500:
        return (UpstreamUnavailable(f"upstream_error: {message[:KEPT]}") if status == 503
                else UpstreamFailed(f"upstream_error: {message[:KEPT]}"))
    if "unknown model" in message or "is not found" in message or status == 404:
        return ModelNotFound(model, "upstream_unknown_model")
    return model_error(message, endpoint)


def model_error(message: str, endpoint: str) -> SeekgateError:
    """The model's own refusal as a 400 naming its parameter; any other error is the server's (500)."""
    for pattern, param, code in _CLIENT_ERRORS:
        found = pattern.search(message)
        if found is None:
            continue
        if not param:
            param = _INPUT_PARAM.get(found.group(1), found.group(1))
        if param == "prompt" and endpoint == CHAT:
            param = "messages"
        return OpenAIBadRequest(param, message[:1024], code, reason=f"model_refused: {message[:256]}")
    return UpstreamFailed(f"model_error: {message[:KEPT]}")


def context_room(err: SeekgateError) -> int | None:
    """The max_tokens that fits a refusal's prompt in the model's context (`context_length_exceeded`:
    the context length less the prompt, as the model counted it); None when this is no such refusal or
    nothing fits."""
    if not isinstance(err, OpenAIBadRequest) or err.code != "context_length_exceeded":
        return None
    found = _CONTEXT.search(err.public_message)
    if found is None:
        return None
    prompt, asked, context = (int(g) for g in found.groups())
    room = context - prompt
    return room if 0 < room < asked else None


def without_default(err: SeekgateError) -> SeekgateError:
    """A context refusal of a request that named no max_tokens (no room was left to ask again for): said as
    the prompt over the context, without the max_tokens the door chose, which the client never sent and
    no smaller one of which would fit."""
    if not isinstance(err, OpenAIBadRequest) or err.code != "context_length_exceeded":
        return err
    found = _CONTEXT.search(err.public_message)
    if found is None:
        return err
    prompt, _, context = found.groups()
    return OpenAIBadRequest(err.param, f"prompt of {prompt} tokens is over the context length of {context} tokens",
                            err.code, reason=err.reason)


def as_asked(err: SeekgateError, max_tokens_param: str) -> SeekgateError:
    """A refusal about max_tokens (the role's cap, the model's) naming the field the client sent instead:
    the generate body only knows `max_tokens`, but a client that sent `max_completion_tokens` must find
    that in `BadRequestError.param`."""
    if max_tokens_param == "max_tokens" or error_body(err)["error"]["param"] != "max_tokens":
        return err
    return OpenAIBadRequest(max_tokens_param, err.public_message, getattr(err, "code", None), reason=err.reason)
