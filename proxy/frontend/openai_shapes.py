"""OpenAI's response shapes: completions, stream chunks, model objects, and errors with the statuses the SDK maps.

The SDK picks its exception class by HTTP status alone (400 BadRequestError, 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError) and retries
429 and 5xx honouring `Retry-After`; the body's `code` and `param` are what a client program reads.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import BadRequest, Forbidden, NotFound, RateLimited, SeekgateError, Unauthenticated
from .openai_request import CHAT, OpenAIBadRequest, OpenAIRequest

SSE_DONE = b"data: [DONE]\n\n"


class ModelNotFound(NotFound):
    """The model id names no model this key may use (or none Triton serves): OpenAI's model_not_found."""

    def __init__(self, model: str, reason: str = "model_not_found") -> None:
        super().__init__(f"{reason}: {model[:128]}",
                         public_message=f"The model '{model[:128]}' does not exist or you do not have access to it.")


class MethodNotAllowed(SeekgateError):
    """A method the path does not take; `Allow` names the one it does (RFC 9110 requires it)."""

    http_status = 405
    default_message = "method not allowed"
    audit_status = "denied"

    def __init__(self, method: str, allow: str) -> None:
        super().__init__(f"method_not_allowed: {method[:16]}", public_message=f"method {method[:16]} not allowed; "
                                                                              f"this path takes {allow}")
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


def error_body(err: SeekgateError) -> dict[str, Any]:
    """`{"error": {message, type, param, code}}` for a refusal; the audit reason never appears in it."""
    param: str | None = None
    code: str | None = None
    kind = "invalid_request_error"
    if isinstance(err, Unauthenticated):
        code = "invalid_api_key"
    elif isinstance(err, Forbidden):
        kind, code = "permission_error", "permission_denied"
    elif isinstance(err, ModelNotFound):
        param, code = "model", "model_not_found"
    elif isinstance(err, NotFound):
        code = "not_found"
    elif isinstance(err, RateLimited):
        # OpenAI says which budget ran out: requests or tokens.
        kind = "tokens" if "tpm" in err.reason or "tokens" in err.reason else "requests"
        code = "rate_limit_exceeded"
    elif isinstance(err, OpenAIBadRequest):
        param, code = err.param, err.code
    elif isinstance(err, BadRequest):
        param = _param_of(err.reason)
    elif err.http_status >= 500:
        kind = "server_error"
        code = {503: "service_unavailable", 504: "timeout"}.get(err.http_status)
    return {"error": {"message": err.public_message, "type": kind, "param": param, "code": code}}


def _param_of(reason: str) -> str | None:
    """The request parameter a check_body refusal is about (its reason names the generate field)."""
    if reason.startswith("max_tokens"):
        return "max_tokens"
    if reason.startswith("parameter_"):   # parameter_not_allowed: <name> (...)
        return reason.partition(": ")[2].split(" ", 1)[0] or None
    return None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(req: OpenAIRequest, max_tokens: int, completion_tokens: int) -> str:
    """`length` when the model stopped at its budget, else `stop` (EOS or a stop sequence)."""
    return "length" if completion_tokens >= max_tokens else "stop"


def completion(req: OpenAIRequest, response_id: str, created: int, text: str, reason: str,
               prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The non-streamed answer: chat.completion or text_completion."""
    if req.endpoint == CHAT:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                  "logprobs": None, "finish_reason": reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": (req.prompt + text) if req.echo else text, "logprobs": None,
                  "finish_reason": reason}
        kind = "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": req.model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


class ChunkWriter:
    """Renders one stream's SSE events: chat.completion.chunk or text_completion chunks."""

    def __init__(self, req: OpenAIRequest, response_id: str, created: int) -> None:
        self.req = req
        self.head = {"id": response_id, "object": "chat.completion.chunk" if req.endpoint == CHAT
                     else "text_completion", "created": created, "model": req.model, "system_fingerprint": None}

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        doc = {**self.head, "choices": choices, **extra}
        if self.req.include_usage and "usage" not in doc:
            doc["usage"] = None   # as OpenAI: every chunk has the field, only the last one a value
        return b"data: " + json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def first(self) -> bytes:
        """Chat streams open with the role (OpenAI's first delta); completions with the echoed prompt."""
        if self.req.endpoint == CHAT:
            return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])
        return self.text(self.req.prompt) if self.req.echo else b""

    def text(self, delta: str) -> bytes:
        if not delta:
            return b""
        if self.req.endpoint == CHAT:
            return self._event([{"index": 0, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}])
        return self._event([{"index": 0, "text": delta, "logprobs": None, "finish_reason": None}])

    def last(self, reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The finish_reason chunk, the usage chunk if asked for, and [DONE]."""
        if self.req.endpoint == CHAT:
            choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        out = self._event([choice])
        if self.req.include_usage:
            out += self._event([], usage=usage(prompt_tokens, completion_tokens))
        return out + SSE_DONE

    @staticmethod
    def error(err: SeekgateError) -> bytes:
        """An error after the stream began (headers are out): one error event, as OpenAI sends it."""
        return b"data: " + json.dumps(error_body(err)).encode() + b"\n\n"


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "seekgate"}


class StopFilter:
    """A stream's text with OpenAI's stop semantics: nothing of a stop sequence ever reaches the client.

    The model streams each new piece as it decodes it, and gets no stop sequences (OpenAIRequest.
    generate_body): the start of one ("t" of "t?") would go out before the rest shows it was one. So
    the relay holds back any ending that could begin a stop sequence until the next piece decides it,
    and cuts where one is complete: the streamed text then equals the non-streamed answer.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """What of `delta` (and of what was held back) may go out now."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.sent = self.text[self.sent:cut], max(self.sent, cut)
            return out
        hold = max(_held(self.text, s) for s in self.stops)
        safe = len(self.text) - hold
        if safe <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        """At the stream's end: what was held back, unless a stop sequence ended the answer."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def _held(text: str, stop: str) -> int:
    """How long an ending of `text` (shorter than `stop`) begins `stop`: what must wait for the next piece.

    Tried from the longest such ending, only where `stop`'s first character is: each piece of every
    stream runs this, and trying every length of `stop` (a client's, up to the body's size) instead
    would take seconds of the event loop per token for a stop sequence of a few hundred thousand characters.
    """
    if len(stop) < 2:
        return 0
    tail = text[-(len(stop) - 1):]
    at = tail.find(stop[0])
    while at >= 0:
        if stop.startswith(tail[at:]):
            return len(tail) - at
        at = tail.find(stop[0], at + 1)
    return 0
