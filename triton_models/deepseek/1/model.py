"""DeepSeek on Triton's Python backend: requests join and leave a running batch at every decode step.

The same file serves two model entries: `deepseek` (one response per request, the
generate / infer endpoints) and `deepseek_stream` (decoupled: one response per
token, for generate_stream and gRPC ModelStreamInfer). `initialize` reads which
one it is from the model's transaction policy.

The structure is that of Triton's vLLM backend: `execute` parses, validates and
tokenizes each request (a bad one gets its own error at once), hands it to the
engine thread (engine.py, beside this file) and returns; the engine decodes every
running request one token per step; one response thread alone calls the response
senders and asks them whether the client went away.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

try:  # Only present inside Triton's Python stub; unit tests inject a stand-in.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised only outside Triton
    pb_utils = None  # type: ignore[assignment]

# engine.py sits beside this file (deepseek_stream/1 links both): import it from here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import (  # noqa: E402
    INFLIGHT,
    STATIC,
    Engine,
    EngineSettings,
    Event,
    GenerationParams,
    RequestError,
    Sequence,
    cut_at_stop,
    safe_delta,
)

__all__ = ["GenerationParams", "RequestError", "cut_at_stop", "safe_delta"]

CHECKPOINT_ENV = "SEEKGATE_CHECKPOINT"


@dataclass(frozen=True)
class Limits:
    """Per-model caps from config.pbtxt `parameters`."""

    max_tokens_cap: int = 512
    default_max_tokens: int = 16
    context_length: int = 256
    max_prompt_chars: int = 0   # longer prompts are refused before tokenizing (0: no such check); see prompt_char_limit


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


# context_length 0 takes the checkpoint's max_position_embeddings, capped here: the KV
# cache is preallocated, max_running_sequences x context_length tokens, and a full-size
# checkpoint's max (163,840 for DeepSeek-V3) times 32 slots is ~370 GB of bf16 MLA latents.
# 4,096 x 32 slots is ~9 GB on DeepSeek-V3; a longer context must be asked for explicitly.
DEFAULT_CONTEXT_CAP = 4096


def parse_limits(params: dict[str, str], model_max_positions: int) -> Limits:
    context = int(params.get("context_length") or 0) or min(model_max_positions, DEFAULT_CONTEXT_CAP)
    return Limits(
        max_tokens_cap=int(params.get("max_tokens_cap") or 512),
        default_max_tokens=int(params.get("default_max_tokens") or 16),
        context_length=min(context, model_max_positions),
    )


# A token stands for at most its vocabulary entry's characters (bytes, for byte-level BPE), times
# this margin for normalizers that compose characters (NFC): a prompt longer than that many
# characters per context position is over the context whatever it holds.
CHARS_MARGIN = 4


def prompt_char_limit(tokenizer: Any, context_length: int) -> int:
    """Characters past which a prompt cannot fit the context, so it is refused without tokenizing.

    Tokenizing only to count was the costly part of refusing a huge prompt: 6 MB took 6 s of
    execute(), the one thread that parses every request, while all new requests waited.
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return context_length * longest * CHARS_MARGIN


def parse_threads(params: dict[str, str]) -> int:
    """`intra_op_threads`: torch's CPU threads in this stub (0: torch's default, one per core).

    Named after Triton's PyTorch backend's INTRA_OP_THREAD_COUNT. torch's OpenMP workers spin
    between operations: on a small model a one-row decode kept two cores busy (194% CPU) for
    the speed of one (100% with one thread), starving Triton's frontend, seekgate and the
    response thread on the same host.
    """
    raw = params.get("intra_op_threads") or "0"
    try:
        threads = int(raw)
    except ValueError:
        threads = -1
    if threads < 0:
        raise RuntimeError(f"config.pbtxt parameters: intra_op_threads must be a whole number >= 0, got {raw!r}")
    return threads


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
    text = _text(raw, "messages")   # outside the try: its RequestError is a ValueError, and not "not JSON"
    try:
        messages = json.loads(text)
    except (ValueError, RecursionError) as exc:   # RecursionError: arrays nested thousands deep
        raise RequestError("input 'messages' is not JSON") from exc
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise RequestError("input 'messages' must be a non-empty list of {role, content} strings")
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as exc:  # noqa: BLE001 - templates refuse what they do not support with raise_exception
        raise RequestError(f"the chat template refused these messages: {exc}") from exc


# Every stop string is searched for at every token, on the engine thread all requests share:
# 200,000 of them (one request's JSON) held it 1.4 s over a 50-token answer. TGI's default is 4.
MAX_STOPS = 16


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
        stops = np.asarray(stop_arr).reshape(-1)
        if stops.size > MAX_STOPS:
            raise RequestError(f"input 'stop' holds {stops.size} strings, at most {MAX_STOPS} are allowed")
        stop = tuple(s for s in (_text(v, "stop") for v in stops) if s)
    seed = _scalar(values, "seed")
    return GenerationParams(max_tokens, temperature, top_p, stop, None if seed is None else int(seed))


def check_context(prompt_len: int, params: GenerationParams, limits: Limits) -> None:
    if prompt_len + params.max_tokens > limits.context_length:
        raise RequestError(
            f"prompt of {prompt_len} tokens plus max_tokens {params.max_tokens} is over "
            f"the context length of {limits.context_length} tokens")


def parse_settings(params: dict[str, str], limits: Limits) -> EngineSettings:
    """The engine's scheduler settings; a bad value stops the model from loading, naming the key."""
    settings = EngineSettings(
        max_running=int(params.get("max_running_sequences") or 32),
        context_length=limits.context_length,
        token_budget=int(params.get("token_budget") or 0),
        prefill_chunk=int(params.get("prefill_chunk") or 1024),
        scheduling=params.get("scheduling") or INFLIGHT,
        admit_wait_ms=float(params.get("admit_wait_ms") or 0),
    )
    problems = []
    if settings.max_running < 1:
        problems.append("max_running_sequences must be at least 1")
    if settings.prefill_chunk < 1:
        problems.append("prefill_chunk must be at least 1")
    if settings.token_budget and settings.token_budget < settings.context_length:
        problems.append(f"token_budget {settings.token_budget} is under the context length "
                        f"{settings.context_length}: a full-length request could never start")
    if not 0 <= settings.admit_wait_ms <= 1000:
        problems.append(f"admit_wait_ms must be between 0 and 1000, got {settings.admit_wait_ms}")
    if settings.scheduling not in (INFLIGHT, STATIC):
        problems.append(f"scheduling must be {INFLIGHT!r} or {STATIC!r}, got {settings.scheduling!r}")
    if problems:
        raise RuntimeError("config.pbtxt parameters: " + "; ".join(problems))
    return settings


# ------------------------------------------------------------------ request parsing

INPUT_NAMES = ("text_input", "max_tokens", "temperature", "top_p", "stop", "seed", "messages")


def read_inputs(request: Any) -> dict[str, np.ndarray]:
    """The request's known inputs by name, in one pass (get_input_tensor_by_name lists them all per name)."""
    values = {}
    for tensor in request.inputs():
        name = tensor.name()
        if name in INPUT_NAMES:
            values[name] = tensor.as_numpy()
    return values


@dataclass(frozen=True)
class Prompt:
    text: str
    special: bool   # the tokenizer adds its special tokens: a rendered chat carries them already


def parse_request(values: dict[str, np.ndarray], limits: Limits, tokenizer: Any) -> tuple[Prompt, GenerationParams]:
    """One request's inputs -> (its prompt, sampling parameters), or RequestError. See encode_prompts."""
    chat = "messages" in values   # a chat (seekgate's /v1/chat/completions): text_input left empty or out
    # Triton does not require text_input (the generate endpoint passes what the JSON has): a chat
    # without one was refused as "text_input must be a string".
    if chat and "text_input" in values and _text(_scalar(values, "text_input"), "text_input"):
        raise RequestError("give text_input or messages, not both")
    prompt = render_messages(tokenizer, _scalar(values, "messages")) if chat else parse_prompt(values)
    if limits.max_prompt_chars and len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"prompt of {len(prompt)} characters is over the context length of "
                           f"{limits.context_length} tokens")
    return Prompt(prompt, special=not chat), parse_params(values, limits)


def encode_prompts(prompts: list[Prompt], encode_many: Any) -> list[list[int]]:
    """Token ids per prompt, in order, with one tokenizer call per kind of prompt.

    A batch call costs the tokenizer's Python overhead once: 0.54 ms for a burst's 32 prompts
    against 1.41 ms one by one, time in which the engine waited for the burst.
    """
    ids: list[list[int]] = [[] for _ in prompts]
    for special in (True, False):
        which = [i for i, p in enumerate(prompts) if p.special == special]
        if which:
            for i, encoded in zip(which, encode_many([prompts[i].text for i in which], special)):
                ids[i] = encoded
    return ids


# ------------------------------------------------------------------ metrics

PUBLISH_S = 0.05   # engine gauges and counters: fresh enough for any scrape, cheap for the engine
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class ModelMetrics:
    """Triton custom metrics (served on Triton's :8002/metrics beside its own), labelled like Triton's."""

    def __init__(self, model: str, version: str) -> None:
        fam = pb_utils.MetricFamily
        labels = {"model": model, "version": version}

        def metric(name: str, help_: str, kind: Any, **extra: Any) -> Any:
            family = fam(name=name, description=help_, kind=kind)
            self._families.append(family)   # a family must outlive its metrics
            return family.Metric(labels=labels, **extra)

        self._families: list[Any] = []
        self.running = metric("deepseek_running_sequences", "Sequences in the running batch", fam.GAUGE)
        self.waiting = metric("deepseek_waiting_requests", "Requests queued for the running batch", fam.GAUGE)
        self.kv_usage = metric("deepseek_kv_cache_usage_ratio", "KV cache tokens held / capacity (0-1)", fam.GAUGE)
        self.tokens = metric("deepseek_generated_tokens_total", "Tokens generated", fam.COUNTER)
        self.steps = metric("deepseek_decode_steps_total", "Decode steps (one forward pass each)", fam.COUNTER)
        self.ttft = metric("deepseek_time_to_first_token_seconds", "Time from arrival to first token",
                           fam.HISTOGRAM, buckets=TTFT_BUCKETS)
        self._tokens_seen = 0
        self._steps_seen = 0
        self._published = 0.0

    def engine_step(self, engine: Engine) -> None:
        """Called by the engine thread after every step; publishes at most every PUBLISH_S, and when idle.

        Each metric update is a round trip from this stub to the Triton server process: five per
        step would cost the engine more than a small model's step itself.
        """
        stats = engine.stats()
        now = time.monotonic()
        if now - self._published < PUBLISH_S and (stats.running or stats.waiting):
            return
        self._published = now
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_used_tokens / stats.kv_capacity_tokens)
        tokens, steps = engine.generated, engine.steps
        self.tokens.increment(tokens - self._tokens_seen)
        self.steps.increment(steps - self._steps_seen)
        self._tokens_seen, self._steps_seen = tokens, steps


# ------------------------------------------------------------------ Triton glue


def worth_polling(seq: Sequence, now: float, interval_s: float, step_s: float) -> bool:
    """Whether asking Triton if `seq`'s client went away could save work (each ask is a round trip).

    Not before the request has been here one interval: a client gone that soon is found a sweep
    later (within two intervals of its arrival instead of one). Not once a decoding row will be
    done within an interval: its final answer releases it in Triton as a cancel would. A poll
    took 0.1-6 ms here while the engine stepped, and an answer ready meanwhile waits for it: a
    tiny burst's sixteen short answers had up to 32 polls run beside them, now up to 16.
    """
    if now - seq.arrived < interval_s:
        return False
    if seq.slot >= 0 and seq.tokens:   # decoding: at most max_tokens - len(tokens) steps left
        return (seq.params.max_tokens - len(seq.tokens)) * step_s > interval_s
    return True


# How long the engine thread may wait, before a step, for final answers still being sent.
ANSWER_WAIT_S = 0.01


@dataclass
class Handle:
    """What the response thread needs to answer one request."""

    sender: Any
    first_seen: bool = False


class TritonPythonModel:
    """Thin adapter: parse in execute, the Engine decodes, one response thread answers."""

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
        threads = parse_threads(params)
        if threads:
            torch.set_num_threads(threads)

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
        self.limits = parse_limits(params, int(getattr(self.model.config, "max_position_embeddings", 4096)))
        self.limits = replace(self.limits, max_prompt_chars=prompt_char_limit(self.tokenizer, self.limits.context_length))
        self.settings = parse_settings(params, self.limits)
        self.drain_s = float(params.get("drain_timeout_s") or 30)
        self.cancel_poll_s = float(params.get("cancel_poll_ms") or 20) / 1000
        self.metrics = ModelMetrics(args["model_name"], str(args.get("model_version", "1")))

        self._responses: queue.Queue[Event | list[Sequence] | None] = queue.Queue()
        self._ttft_due: list[float] = []   # response thread only
        self._finals = 0                   # final answers queued and not yet sent (under _sent)
        self._sent = threading.Condition()
        self.engine = Engine(self.model, self.tokenizer, device, self.settings, self._post)
        self.engine.on_step = self.metrics.engine_step
        self.engine.before_step = self._answers_first
        self._response_thread = threading.Thread(target=self._response_loop, name="deepseek-responses",
                                                 daemon=True)
        self._response_thread.start()
        pb_utils.Logger.log_info(
            f"{args['model_name']}: loaded {path} on {device_map} ({dtype}) in "
            f"{time.perf_counter() - started:.2f}s; decoupled={self.decoupled}; {torch.get_num_threads()} CPU threads; "
            f"{self.limits}; {self.settings}")

    def execute(self, requests: list[Any]) -> None:
        """Parses each request and hands them to the engine together; every answer goes out on its sender."""
        with self.engine.handover():   # an idle engine waits for these before its first step
            seqs = [Sequence([], GenerationParams(1), handle=Handle(request.get_response_sender()),
                             streams=self.decoupled) for request in requests]
            # Registered first, so the response thread watches them before any event for them; in
            # one item, so it wakes once, not once per request while this thread parses.
            self._responses.put(seqs)
            parsed: list[tuple[Sequence, Prompt]] = []
            for seq, request in zip(seqs, requests):
                try:
                    prompt, seq.params = parse_request(read_inputs(request), self.limits, self.engine.tokenizer)
                except RequestError as exc:
                    self._refuse(seq, exc)
                except Exception as exc:  # noqa: BLE001 - see below
                    # Never out of execute(): Triton would answer the whole batch with this error and
                    # free its requests while the response thread still polls their senders (tritonserver
                    # died of SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled). Not a RequestError: an
                    # internal error, not blamed on the client.
                    self._post(Event(seq, "", True, f"request not parsed: {type(exc).__name__}: {exc}"))
                else:
                    parsed.append((seq, prompt))
            ready: list[Sequence] = []
            for (seq, _), ids in zip(parsed, encode_prompts([p for _, p in parsed], self.engine.encode_many)):
                try:
                    check_context(len(ids), seq.params, self.limits)
                except RequestError as exc:
                    self._refuse(seq, exc)
                else:
                    seq.prompt_ids = ids
                    ready.append(seq)
            for seq, error in self.engine.submit_many(ready):
                self._refuse(seq, error)
        return None

    def _refuse(self, seq: Sequence, error: RequestError) -> None:
        """This request's own error, as its final answer; the rest of the batch goes on."""
        self._post(Event(seq, "", True, str(error), kind=error.kind))

    def _post(self, event: Event) -> None:
        """Queues an event for the response thread (the engine's sink), counting final answers."""
        if event.done:
            with self._sent:
                self._finals += 1
        self._responses.put(event)

    def _answers_first(self) -> None:
        """Engine thread, before each step: final answers already made go out first.

        A step and the response thread's sends share the GIL and the CPU. In a tiny burst the
        sixteen short answers, ready together, went out one per GIL hand-off while the next
        steps ran: short p50 40 ms through Triton, 33 ms holding the step until they are sent
        (at most ANSWER_WAIT_S), throughput unchanged. Per-token events of streams are not
        waited for: they would hold every step.
        """
        with self._sent:
            self._sent.wait_for(lambda: not self._finals, timeout=ANSWER_WAIT_S)

    # ---------------------------------------------------------- response thread

    def _response_loop(self) -> None:
        """The only caller of response senders: answers events and polls for cancelled requests.

        `is_cancelled()` is a round trip to the Triton server: polling 32 running requests in one
        sweep held answers back by up to tens of ms. A sweep therefore polls only while no event
        waits and goes on where it stopped, so answers go out first (a poll between each of a
        burst's sixteen answers spaced them out too) and every request is still polled within a
        poll interval or two. Sweeps start every `cancel_poll_ms`, or
        every engine step when steps are longer: a cancelled row leaves at a step boundary
        anyway, and on a compute-bound model four sweeps a step took 20% of a burst's
        throughput (their GIL hand-offs stall the engine thread). A sweep asks only about
        requests a cancel could still save work on (worth_polling).

        Time-to-first-token observations are round trips too (one per request): they wait, like
        the sweep, until no answer does. With an observation before each, a burst's sixteen
        answers went out 0.4-0.5 ms apart; without, 0.25-0.3 ms.
        """
        active: dict[int, Sequence] = {}
        to_poll: list[Sequence] = []        # the current sweep's requests not yet asked
        next_poll = time.monotonic() + self.cancel_poll_s
        while True:
            item: Event | list[Sequence] | None | bool
            try:
                item = self._responses.get(timeout=self.cancel_poll_s)
            except queue.Empty:
                item = False   # a timeout: only poll below
            if item is None:
                for seconds in self._ttft_due:
                    self.metrics.ttft.observe(seconds)
                return
            if isinstance(item, list):
                active.update((id(seq), seq) for seq in item)
            elif isinstance(item, Event):
                try:
                    self._answer(item)
                except Exception as exc:  # noqa: BLE001 - a client gone mid-send must not stop the others
                    pb_utils.Logger.log_info(f"response not delivered: {exc}")
                if item.done:
                    active.pop(id(item.seq), None)
                    with self._sent:
                        self._finals -= 1
                        if not self._finals:
                            self._sent.notify_all()
            while self._ttft_due and self._responses.empty():
                self.metrics.ttft.observe(self._ttft_due.pop())
            now = time.monotonic()
            if not to_poll and now >= next_poll:
                interval = max(self.cancel_poll_s, self.engine.step_s)
                next_poll = now + interval
                clock = time.perf_counter()   # Sequence.arrived's clock
                to_poll = [seq for seq in active.values() if worth_polling(seq, clock, interval, self.engine.step_s)]
            while to_poll and self._responses.empty():   # answers first; the sweep goes on after them
                seq = to_poll.pop()
                # Answered since the sweep began: Triton frees a sender after its final response.
                if id(seq) in active and not seq.done and not seq.cancelled and seq.handle.sender.is_cancelled():
                    self.engine.cancel(seq)

    def _answer(self, event: Event) -> None:
        seq, handle = event.seq, event.seq.handle
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not handle.first_seen and seq.first_token_at is not None:
            handle.first_seen = True
            self._ttft_due.append(seq.first_token_at - seq.arrived)   # observed once no answer waits
        if event.error is not None:
            # The code sets the status: without one every refusal was INTERNAL, so a bad request got
            # HTTP 500 from /infer and gRPC INTERNAL (seekgate's audit and metrics: a server fault).
            code = {"invalid": pb_utils.TritonError.INVALID_ARG,
                    "unavailable": pb_utils.TritonError.UNAVAILABLE}.get(event.kind, pb_utils.TritonError.INTERNAL)
            handle.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(event.error, code)),
                               flags=final)
        elif seq.cancelled and event.done:
            # The final flag releases the request in Triton, even when the client is gone.
            if self.decoupled:
                handle.sender.send(flags=final)
            else:
                handle.sender.send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("request cancelled")), flags=final)
        elif self.decoupled:
            # Each event carries the new text and the running token counts, so the
            # last event a client (or seekgate's audit) sees holds the totals.
            handle.sender.send(pb_utils.InferenceResponse(output_tensors=self._outputs(event.delta, event)),
                               flags=final if event.done else 0)
        elif event.done:
            handle.sender.send(pb_utils.InferenceResponse(output_tensors=self._outputs(seq.text, event)),
                               flags=final)

    @staticmethod
    def _outputs(text: str, event: Event) -> list[Any]:
        # The counts as of the event: this thread runs behind the engine, which keeps appending tokens.
        # Shape [1, 1]: this request's slice of the batch dimension, then the value.
        return [
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("input_tokens", np.array([[len(event.seq.prompt_ids)]], dtype=np.int32)),
            pb_utils.Tensor("output_tokens", np.array([[event.tokens]], dtype=np.int32)),
        ]

    def finalize(self) -> None:
        """Drains: running requests finish (up to drain_timeout_s) or fail cleanly, all with the final flag."""
        self.engine.stop(self.drain_s)
        self._responses.put(None)
        self._response_thread.join()
        self.model = None
