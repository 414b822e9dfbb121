"""DeepSeek on Triton's Python backend: one padded, batched decode per batch the dynamic batcher hands us.

The same file serves two model entries: `deepseek` (one response per request, the
generate / infer endpoints) and `deepseek_stream` (decoupled: one response per
token, for generate_stream and gRPC ModelStreamInfer). `initialize` reads which
one it is from the model's transaction policy.

Each batch is decoded together: one forward pass per step for every request in
it, with per-row sampling so that `max_tokens`, `temperature`, `top_p`, `stop` and
`seed` stay per request. A request that is invalid gets its own error response;
the rest of the batch is served.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

try:  # Only present inside Triton's Python stub; unit tests inject a stand-in.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised only outside Triton
    pb_utils = None  # type: ignore[assignment]

CHECKPOINT_ENV = "SEEKGATE_CHECKPOINT"


class RequestError(ValueError):
    """A problem with one request: reported to that request only."""


@dataclass(frozen=True)
class Limits:
    """Per-model caps from config.pbtxt `parameters`."""

    max_tokens_cap: int = 512
    default_max_tokens: int = 16
    context_length: int = 256


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


# ---------------------------------------------------------------- pure helpers


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """Flattens config.pbtxt `parameters { key: ... value { string_value: ... } }`."""
    params = model_config.get("parameters", {}) or {}
    return {k: str(v.get("string_value", "")) for k, v in params.items()}


def resolve_checkpoint(params: dict[str, str], env: dict[str, str] | os._Environ[str],
                       repository_dir: str) -> str:
    """The environment wins over config.pbtxt so ops can swap checkpoints without editing it."""
    path = env.get(CHECKPOINT_ENV) or params.get("checkpoint", "")
    if not path:
        raise RuntimeError(f"no checkpoint: set parameters.checkpoint in config.pbtxt or ${CHECKPOINT_ENV}")
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(repository_dir, path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(f"checkpoint directory {path!r} has no config.json")
    return path


def parse_limits(params: dict[str, str], model_max_positions: int) -> Limits:
    context = int(params.get("context_length") or 0) or model_max_positions
    return Limits(
        max_tokens_cap=int(params.get("max_tokens_cap") or 512),
        default_max_tokens=int(params.get("default_max_tokens") or 16),
        context_length=min(context, model_max_positions),
    )


def _scalar(values: dict[str, np.ndarray], name: str) -> Any:
    arr = values.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got {flat.size}")
    return flat[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"input '{name}' is not valid UTF-8") from exc
    if isinstance(value, str):
        return value
    raise RequestError(f"input '{name}' must be a string (BYTES)")


def parse_prompt(values: dict[str, np.ndarray]) -> str:
    """The prompt from `text_input`; missing, non-text or empty prompts are refused."""
    if values.get("text_input") is None:
        raise RequestError("missing required input 'text_input'")
    text = _text(_scalar(values, "text_input"), "text_input")
    if not text.strip():
        raise RequestError("input 'text_input' is empty")
    return text


def render_messages(tokenizer: Any, raw: Any) -> str:
    """The prompt for a chat: `messages` (a JSON list of {role, content}) in the checkpoint's own chat template.

    The template is the tokenizer's, so a chat reads as the model was trained on; the rendered text
    carries its special tokens already (`encode` must not add them again).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template: send text_input instead of messages")
    try:
        messages = json.loads(_text(raw, "messages"))
    except ValueError as exc:
        raise RequestError("input 'messages' is not JSON") from exc
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise RequestError("input 'messages' must be a non-empty list of {role, content} strings")
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def parse_params(values: dict[str, np.ndarray], limits: Limits) -> GenerationParams:
    """Sampling parameters for one request, checked against the model's caps."""
    max_tokens = _scalar(values, "max_tokens")
    max_tokens = limits.default_max_tokens if max_tokens is None else int(max_tokens)
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if max_tokens > limits.max_tokens_cap:
        raise RequestError(f"max_tokens {max_tokens} is over this model's cap of {limits.max_tokens_cap}")
    temperature = _scalar(values, "temperature")
    temperature = 0.0 if temperature is None else float(temperature)
    if not (0.0 <= temperature <= 100.0) or temperature != temperature:
        raise RequestError(f"temperature must be between 0 and 100, got {temperature}")
    top_p = _scalar(values, "top_p")
    top_p = 1.0 if top_p is None else float(top_p)
    if not (0.0 < top_p <= 1.0):
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    stop_arr = values.get("stop")
    stop: tuple[str, ...] = ()
    if stop_arr is not None:
        stop = tuple(s for s in (_text(v, "stop") for v in np.asarray(stop_arr).reshape(-1)) if s)
    seed = _scalar(values, "seed")
    return GenerationParams(max_tokens, temperature, top_p, stop, None if seed is None else int(seed))


def check_context(prompt_len: int, params: GenerationParams, limits: Limits) -> None:
    if prompt_len + params.max_tokens > limits.context_length:
        raise RequestError(
            f"prompt of {prompt_len} tokens plus max_tokens {params.max_tokens} is over "
            f"the context length of {limits.context_length} tokens")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left padding keeps every row's last real token in the last column, where decoding continues."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cuts `text` before the earliest stop string; says whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def safe_delta(text: str, emitted: int) -> str:
    """New text since `emitted` chars, held back while it ends inside a UTF-8 sequence."""
    if text.endswith("\ufffd"):
        return ""
    return text[emitted:]


# ------------------------------------------------------------- batched decoding


@dataclass
class Row:
    """Decoding state of one request inside a batch."""

    prompt_ids: list[int]
    params: GenerationParams
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    done: bool = False


StepCallback = Callable[[int, Row, str], None]


class BatchDecoder:
    """Runs one padded decode over a batch: a forward pass per step for all rows."""

    def __init__(self, model: Any, tokenizer: Any, device: Any) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # transformers renamed `past_key_values` to `cache` (5.x); support both.
        forward_params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _next_tokens(self, logits: Any, rows: list[Row], generators: list[Any]) -> list[int]:
        torch = self.torch
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, row in enumerate(rows):
            p = row.params
            if row.done or p.temperature == 0.0:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
        return out

    def run(self, rows: list[Row], on_step: StepCallback | None = None,
            cancelled: Callable[[int], bool] | None = None) -> list[Row]:
        """Decodes every row to its own limit, EOS or stop string; `on_step` sees each new piece."""
        torch = self.torch
        ids_np, mask_np = left_pad([r.prompt_ids for r in rows], self.pad_id)
        ids = torch.from_numpy(ids_np).to(self.device)
        mask = torch.from_numpy(mask_np).to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = []
        for r in rows:
            g = torch.Generator(device="cpu")
            g.manual_seed(r.params.seed if r.params.seed is not None else int.from_bytes(os.urandom(4), "little"))
            generators.append(g)
        past = None
        step_input, step_pos = ids, positions
        longest = max(r.params.max_tokens for r in rows)
        with torch.inference_mode():
            for _ in range(longest):
                out = self.model(input_ids=step_input, attention_mask=mask, position_ids=step_pos,
                                 use_cache=True, **{self.cache_arg: past})
                past = getattr(out, self.cache_arg)
                logits = out.logits[:, -1, :].float().cpu()
                nxt = self._next_tokens(logits, rows, generators)
                for i, (row, tok) in enumerate(zip(rows, nxt)):
                    if row.done:
                        continue
                    if cancelled is not None and cancelled(i):
                        row.done = True
                        continue
                    self._advance(i, row, tok, on_step)
                if all(r.done for r in rows):
                    break
                step_input = torch.tensor(nxt, device=self.device).unsqueeze(1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step_pos = step_pos[:, -1:] + 1
        return rows

    def _advance(self, i: int, row: Row, tok: int, on_step: StepCallback | None) -> None:
        if tok == self.eos_id:
            row.done = True
        else:
            row.tokens.append(tok)
            full = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            row.text, hit = cut_at_stop(full, row.params.stop)
            row.done = hit or len(row.tokens) >= row.params.max_tokens
        # At the end, flush whatever was held back as a partial UTF-8 sequence.
        delta = row.text[row.emitted:] if row.done else safe_delta(row.text, row.emitted)
        row.emitted += len(delta)
        if on_step is not None and (delta or row.done):
            on_step(i, row, delta)


# ------------------------------------------------------------------ Triton glue

INPUT_NAMES = ("text_input", "max_tokens", "temperature", "top_p", "stop", "seed", "messages")


class TritonPythonModel:
    """Thin adapter: Triton requests in, BatchDecoder, Triton responses out."""

    def initialize(self, args: dict[str, Any]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        params = model_parameters(config)
        repo_dir = os.path.dirname(args["model_repository"].rstrip("/"))
        path = resolve_checkpoint(params, os.environ, repo_dir)

        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device_map: Any = f"cuda:{args['model_instance_device_id']}"
            dtype = torch.bfloat16
        elif params.get("device_map") == "auto" and torch.cuda.is_available():
            device_map, dtype = "auto", torch.bfloat16   # one instance spread over every GPU
        else:
            device_map, dtype = "cpu", torch.float32
        # device_map makes transformers read safetensors straight onto the target
        # device, shard by shard, instead of building the model in host memory first.
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=device_map, local_files_only=True)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        device = self.model.device if device_map != "auto" else next(self.model.parameters()).device
        self.decoder = BatchDecoder(self.model, self.tokenizer, device)
        self.limits = parse_limits(params, int(getattr(self.model.config, "max_position_embeddings", 4096)))
        pb_utils.Logger.log_info(
            f"{args['model_name']}: loaded {path} on {device_map} ({dtype}) in "
            f"{time.perf_counter() - started:.2f}s; decoupled={self.decoupled}; {self.limits}")

    def _read(self, request: Any) -> dict[str, np.ndarray]:
        values = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values[name] = tensor.as_numpy()
        return values

    def _prepare(self, request: Any) -> Row:
        values = self._read(request)
        chat = "messages" in values   # a chat (seekgate's /v1/chat/completions): text_input left empty
        if chat and _text(_scalar(values, "text_input"), "text_input"):
            raise RequestError("give text_input or messages, not both")
        prompt = render_messages(self.tokenizer, _scalar(values, "messages")) if chat else parse_prompt(values)
        params = parse_params(values, self.limits)
        ids = self.decoder.encode(prompt, special=not chat)
        check_context(len(ids), params, self.limits)
        return Row(ids, params)

    @staticmethod
    def _outputs(text: str, row: Row) -> list[Any]:
        # Shape [1, 1]: this request's slice of the batch dimension, then the value.
        return [
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("input_tokens", np.array([[len(row.prompt_ids)]], dtype=np.int32)),
            pb_utils.Tensor("output_tokens", np.array([[len(row.tokens)]], dtype=np.int32)),
        ]

    def execute(self, requests: list[Any]) -> list[Any] | None:
        rows: list[Row] = []
        owners: list[int] = []
        errors: dict[int, str] = {}
        for n, request in enumerate(requests):
            try:
                rows.append(self._prepare(request))
                owners.append(n)
            except RequestError as exc:
                errors[n] = str(exc)
        if self.decoupled:
            self._execute_stream(requests, rows, owners, errors)
            return None
        if rows:
            self.decoder.run(rows)
        done = dict(zip(owners, rows))
        return [
            pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[n])) if n in errors
            else pb_utils.InferenceResponse(output_tensors=self._outputs(done[n].text, done[n]))
            for n in range(len(requests))
        ]

    def _execute_stream(self, requests: list[Any], rows: list[Row], owners: list[int],
                        errors: dict[int, str]) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [r.get_response_sender() for r in requests]
        for n, message in errors.items():
            senders[n].send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=final)
        if not rows:
            return

        finished: set[int] = set()

        def on_step(i: int, row: Row, delta: str) -> None:
            # Each event carries the new text and the running token counts, so the
            # last event a client (or seekgate's audit) sees holds the totals.
            response = pb_utils.InferenceResponse(output_tensors=self._outputs(delta, row))
            senders[owners[i]].send(response, flags=final if row.done else 0)
            if row.done:
                finished.add(i)

        def cancelled(i: int) -> bool:
            # Never ask a sender after its final response: Triton has freed it by then.
            return i not in finished and senders[owners[i]].is_cancelled()

        self.decoder.run(rows, on_step=on_step, cancelled=cancelled)
        # A cancelled row never sent its final flag; Triton needs one to release the request.
        for i in range(len(rows)):
            if i not in finished:
                senders[owners[i]].send(flags=final)

    def finalize(self) -> None:
        self.model = None
        self.decoder = None
