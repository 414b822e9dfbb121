"""In-flight batching for a Hugging Face causal LM: one running batch, joined and left at every decode step.

The interface model.py (and a future vLLM or transformers engine) relies on is small:
`Engine(model, tokenizer, device, settings, sink)`, `submit(sequence)` (or `submit_many`), `cancel(sequence)`,
`stats()` and `stop(drain_s)`. Everything a request needs back comes through `sink` as
`Event`s, from the engine thread, in order per sequence; the last one has `done=True`.

One step of the engine thread (the scheduler of vLLM and TGI, in miniature):
  1. drop rows that finished or were cancelled (their KV slots are reused);
  2. admit waiting sequences while there is a free slot and the token budget allows;
  3. prefill the newcomers together, at most `prefill_chunk` prompt tokens a step, so a
     long prompt is spread over several steps instead of stalling every running stream;
     a sequence whose prompt is done samples its first token and joins the running rows;
  4. decode one token for every running row in one forward pass.

The KV cache is preallocated: one slot (row) per running sequence, `context_length`
columns, per layer. Rows decode at their own column, so nothing is padded on the left and
nothing is shifted; the running rows are kept in slots [0, n) so a decode step reads a
view, never a gathered copy. Attention masks are built here, 4D, per row.

`scheduling="static"` reproduces the old behaviour for the benchmark: a batch is admitted
only when the previous one has finished, and every row is decoded until the longest is done.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence as Seq

STATIC, INFLIGHT = "static", "inflight"


class RequestError(ValueError):
    """A problem with one request: reported to that request only."""

    kind = "invalid"       # the client's to fix: HTTP 400, gRPC INVALID_ARGUMENT (see Event.kind)


class ShuttingDown(RequestError):
    """No fault of the request's: another replica, or this one later, can answer it."""

    kind = "unavailable"


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class EngineSettings:
    """Scheduler knobs, from config.pbtxt `parameters` (see parse_settings in model.py)."""

    max_running: int = 32          # KV slots: sequences decoded together
    context_length: int = 256      # KV columns per slot: prompt + max_tokens of one sequence
    token_budget: int = 0          # admission: sum of (prompt + max_tokens) over running rows; 0 = slots x context
    prefill_chunk: int = 1024      # prompt tokens prefilled per step, over all newcomers
    scheduling: str = INFLIGHT     # or STATIC: the old whole-batch behaviour, for the benchmark
    # An idle engine woken by a request waits this long (ms) for the rest of a burst, so
    # requests Triton hands over a few at a time are prefilled in one forward pass, not several
    # (longer while a handover is under way or requests keep coming: see Engine._gather_burst).
    admit_wait_ms: float = 0.0

    def budget(self) -> int:
        return self.token_budget or self.max_running * self.context_length


@dataclass
class Sequence:
    """One request inside the engine. `handle` is the caller's (model.py keeps its sender there)."""

    prompt_ids: list[int]
    params: GenerationParams
    handle: Any = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    raw: str = ""                  # decoded output before stop strings are cut (grown token by token)
    emitted: int = 0
    done: bool = False
    cancelled: bool = False        # set by any thread; read by the engine at the next step
    prefilled: int = 0             # prompt tokens already in the KV cache
    slot: int = -1
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: Any = None
    stream: Any = None             # the incremental detokenizer's state (tokenizers.decoders.DecodeStream)
    streams: bool = True           # an event per new text; False: only the final one (one response)

    def need(self) -> int:
        """KV columns this sequence may use: what admission reserves for it."""
        return len(self.prompt_ids) + self.params.max_tokens


@dataclass(frozen=True)
class Event:
    """New text for one sequence; `done` marks its last event, `error` a failure (then done)."""

    seq: Sequence
    delta: str
    done: bool
    error: str | None = None
    tokens: int = 0     # output tokens when this event was made (the engine keeps decoding meanwhile)
    kind: str = "internal"   # whose fault an error is: "invalid" (the request's), "unavailable" or "internal"


@dataclass(frozen=True)
class Stats:
    running: int
    waiting: int
    kv_used_tokens: int
    kv_capacity_tokens: int


Sink = Callable[[Event], None]


# ---------------------------------------------------------------- pure helpers


def incremental_detokenizer(tokenizer: Any) -> Callable[[], Any] | None:
    """A factory of per-sequence streaming decoders giving the same text as a full decode, or None.

    Only for fast tokenizers that do not clean up spaces after decoding (transformers does
    that in Python, after the Rust decoder, so a stream would not match it).
    """
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    if getattr(tokenizer, "backend_tokenizer", None) is None or getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                        False):
        return None
    return lambda: DecodeStream(skip_special_tokens=True)


def cut_at_stop(text: str, stops: Seq[str], start: int = 0) -> tuple[str, bool]:
    """Cuts `text` before the earliest stop string at or after `start`; says whether one was found.

    The engine passes the first position where a stop could begin in text grown since the
    last check, so a long answer is not searched from its beginning at every token.
    """
    cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_holdback(text: str, stops: Seq[str]) -> int:
    """How many chars at the end of `text` could begin a stop string: a stream holds them back.

    Sent at once, a stop string's first part reached the client before the next token showed it
    was a stop, and the stream's text no longer matched the one answer's (which is cut before it).
    Each stop is looked for from where its first char occurs in the tail (str.find, not one
    endswith per length: this runs on the engine thread at every token).
    """
    held = 0
    for s in stops:
        tail = text[max(0, len(text) - len(s) + 1):]
        i = tail.find(s[0]) if tail else -1
        while 0 <= i and len(tail) - i > held:   # earliest first: the longest candidate
            if s.startswith(tail[i:]):
                held = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return held


def safe_delta(text: str, emitted: int) -> str:
    """New text since `emitted` chars, held back while it ends inside a UTF-8 sequence."""
    if text.endswith("\ufffd"):
        return ""
    return text[emitted:]


def prefill_plan(remaining: Seq[int], chunk: int) -> list[int]:
    """How many prompt tokens each waiting-to-prefill row gets this step, first come first served."""
    left, plan = chunk, []
    for r in remaining:
        w = min(r, left)
        plan.append(w)
        left -= w
    return plan


# ------------------------------------------------------------------- KV cache


class SlotCache:
    """Preallocated per-layer latent KV ([slots, 1, context, dim]), written in place by the model.

    transformers' attention calls `update(new_a, new_b, layer_idx, ...)` and attends over what
    it returns; `plan_*` says where this forward pass writes. DeepSeek's MLA caches two
    latents per token (kv_nope and k_rot); any model caching (key, value) works the same way.
    """

    def __init__(self, slots: int, context: int, device: Any) -> None:
        self.slots, self.context, self.device = slots, context, device
        self.a: list[Any] = []    # per layer, allocated on first use (dims come from the model)
        self.b: list[Any] = []
        self._rows: slice = slice(0, 0)
        self._write: Callable[[Any, Any, Any], None] | None = None
        self._width = 0

    def _alloc(self, layer: int, new_a: Any, new_b: Any) -> None:
        import torch

        while len(self.a) <= layer:
            self.a.append(None)
            self.b.append(None)
        shape = (self.slots, new_a.shape[1], self.context)
        self.a[layer] = torch.zeros(*shape, new_a.shape[-1], dtype=new_a.dtype, device=self.device)
        self.b[layer] = torch.zeros(*shape, new_b.shape[-1], dtype=new_b.dtype, device=self.device)

    def plan_decode(self, n: int, positions: Any, width: int) -> None:
        """Rows [0, n) write one column each, at `positions`; attention reads columns [0, width)."""
        import torch

        rows = torch.arange(n, device=positions.device)

        def write(store: Any, new: Any, _: Any) -> None:
            store[rows, :, positions] = new[:, :, 0]
        self._rows, self._write, self._width = slice(0, n), write, width

    def plan_prefill(self, first: int, offsets: Seq[int], width: int) -> int:
        """Rows [first, first+len(offsets)) write `width` columns from their own offset, in one indexed copy.

        Rows are padded to the widest: a row at a late offset (its prompt's last chunk beside a
        wider one) would pad past its slot's end. Those padding columns land on the slot's last
        column, which holds nothing: a sequence's last KV column is prompt + max_tokens - 2, and
        admission keeps prompt + max_tokens within the context. Attention reads at most `context`:
        returns the columns it reads, the mask's width.
        """
        import torch

        rows = torch.arange(first, first + len(offsets), device=self.device).view(-1, 1)
        cols = torch.tensor(offsets, device=self.device).view(-1, 1) + torch.arange(width, device=self.device)
        cols.clamp_(max=self.context - 1)

        def write(store: Any, new: Any, _: Any) -> None:
            store[rows, :, cols] = new.transpose(1, 2)   # new: [rows, heads, width, dim]
        self._rows = slice(first, first + len(offsets))
        self._write = write
        self._width = min(max(offsets) + width, self.context)
        return self._width

    def update(self, new_a: Any, new_b: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if layer_idx >= len(self.a) or self.a[layer_idx] is None:
            self._alloc(layer_idx, new_a, new_b)
        assert self._write is not None, "SlotCache used without a plan"
        a, b = self.a[layer_idx], self.b[layer_idx]
        self._write(a, new_a, None)
        self._write(b, new_b, None)
        return a[self._rows, :, :self._width], b[self._rows, :, :self._width]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies one row's first `length` columns to another slot (row compaction)."""
        if src == dst or length <= 0:
            return
        for store in (*self.a, *self.b):
            if store is not None:
                store[dst, :, :length] = store[src, :, :length]

    def swap(self, i: int, j: int, len_i: int, len_j: int) -> None:
        if i == j:
            return
        for store in (*self.a, *self.b):
            if store is not None:
                tmp = store[i, :, :len_i].clone()
                store[i, :, :len_j] = store[j, :, :len_j]
                store[j, :, :len_i] = tmp

    def reset(self) -> None:
        self.a, self.b = [], []


# --------------------------------------------------------------------- engine


class Engine:
    """The engine thread and its running batch. See the module docstring for one step."""

    def __init__(self, model: Any, tokenizer: Any, device: Any, settings: EngineSettings, sink: Sink) -> None:
        import inspect

        import torch

        self.torch, self.model, self.tokenizer, self.device = torch, model, tokenizer, device
        self.settings, self.sink = settings, sink
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # transformers renamed `past_key_values` to `cache` (5.x); support both.
        forward_params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        # A prefill needs each row's last prompt position's logits only: with a 129k vocabulary a
        # 1024-token chunk's full logits would be ~0.5 GB of bf16 computed and thrown away.
        self.keeps_logits = "logits_to_keep" in forward_params
        self.cache = SlotCache(settings.max_running, settings.context_length, device)
        self.dtype = next(model.parameters()).dtype
        self.mask_min = torch.finfo(self.dtype).min
        self._new_stream = incremental_detokenizer(tokenizer)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._handovers = 0                   # callers inside handover(): more requests are on their way
        self._rows: list[Sequence] = []       # slots [0, n): decoding; slots [n, n+k): prefilling
        self._n = 0
        self._finished: list[Sequence] = []   # answered by the last decode; their slots freed next step
        self._held: list[Event] = []          # static mode: answers held until the batch is done
        self._stopping = False
        self._cancelled_waiting = False        # a cancel() since the queue was last searched for them
        self._drain_until = 0.0
        self.steps = 0                        # decode steps run (tokens / steps = rows per step)
        self.generated = 0                    # tokens output (EOS is not one)
        self.step_s = 0.0                     # recent seconds per step (moving average)
        self.on_step: Callable[[Engine], None] | None = None   # metrics hook, engine thread
        self.before_step: Callable[[], None] | None = None     # engine thread; may block briefly
        self._thread = threading.Thread(target=self._loop, name="deepseek-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.encode_many([text], special)[0]

    def encode_many(self, texts: Seq[str], special: bool = True) -> list[list[int]]:
        """encode() of each text, in one tokenizer call (a fast tokenizer encodes the batch in Rust)."""
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=special)["input_ids"]]

    @contextmanager
    def handover(self) -> Iterator[None]:
        """Marks requests on their way in: an idle engine's admission window stays open until they are submitted.

        Triton hands execute() a burst a few requests at a time, and parsing 31 of them took
        3-7 ms here: the 5 ms window closed meanwhile, the first arrival was prefilled alone and
        the other 31 a whole step later. Without a window (admit_wait_ms 0) this changes nothing.
        """
        with self._cond:
            self._handovers += 1
        try:
            yield
        finally:
            with self._cond:
                self._handovers -= 1
                self._cond.notify()

    def submit(self, seq: Sequence) -> None:
        """Queues a validated sequence; raises RequestError if the engine can never admit it."""
        for _, error in self.submit_many([seq]):
            raise error

    def submit_many(self, seqs: Seq[Sequence]) -> list[tuple[Sequence, RequestError]]:
        """Queues validated sequences together (one wake-up of the engine); returns those refused.

        Triton hands execute() a handful of requests at a time: woken per request, the engine would
        start a forward pass for the first while execute() still parses the rest (the two share the
        GIL), and the others would join a step later.
        """
        refused: list[tuple[Sequence, RequestError]] = []
        queued: list[Sequence] = []
        cap = min(self.settings.context_length, self.settings.budget())
        for seq in seqs:
            if seq.need() > cap:
                refused.append((seq, RequestError(
                    f"prompt of {len(seq.prompt_ids)} tokens plus max_tokens {seq.params.max_tokens} "
                    f"is over this model's token budget of {cap}")))
                continue
            g = self.torch.Generator(device="cpu")
            g.manual_seed(seq.params.seed if seq.params.seed is not None else int.from_bytes(os.urandom(4), "little"))
            seq.generator = g
            queued.append(seq)
        with self._cond:
            if self._stopping:
                return refused + [(seq, ShuttingDown("the model is shutting down")) for seq in queued]
            self._waiting.extend(queued)
            if queued:
                self._cond.notify()
        return refused

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cond:
            self._cancelled_waiting = True   # it may still be queued: looked for at the next step
            self._cond.notify()

    def stats(self) -> Stats:
        rows = list(self._rows)
        return Stats(running=sum(not s.done for s in rows), waiting=len(self._waiting),
                     kv_used_tokens=sum(s.prefilled + len(s.tokens) for s in rows),
                     kv_capacity_tokens=self.settings.max_running * self.settings.context_length)

    def stop(self, drain_s: float) -> None:
        """Refuses new work, lets running rows finish for up to `drain_s`, fails the rest, joins."""
        with self._cond:
            self._stopping = True
            self._drain_until = time.monotonic() + drain_s
            for seq in self._waiting:
                self.sink(Event(seq, "", True, "the model is shutting down", kind=ShuttingDown.kind))
            self._waiting.clear()
            self._cond.notify()
        self._thread.join()

    # ------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                idle = all(s.done for s in self._rows)   # rows left, if any, only wait to free their slots
                while not self._waiting and not self._rows and not self._stopping:
                    self._cond.wait()
                if idle and self._waiting:
                    self._gather_burst()
                if self._stopping and (idle or time.monotonic() > self._drain_until):
                    for seq in self._rows:
                        if not seq.done:
                            self.sink(Event(seq, "", True, "the model is shutting down", kind=ShuttingDown.kind))
                    self._rows, self._n, self._finished = [], 0, []
                    return
            if self.before_step is not None:
                self.before_step()
            started, steps = time.perf_counter(), self.steps
            try:
                # The cache tensors are inference tensors: every in-place move happens in this mode too.
                with self.torch.inference_mode():
                    self._step()
            except Exception as exc:  # noqa: BLE001 - one bad step fails its rows, not the engine
                self._fail_running(f"generation failed: {type(exc).__name__}: {exc}")
            if self.steps != steps:
                # A moving average of decode steps (not of a step that only freed slots): how often
                # a cancelled row can leave the batch (model.py polls no faster).
                self.step_s += (time.perf_counter() - started - self.step_s) / 8
            if self.on_step is not None:
                self.on_step(self)

    def _gather_burst(self) -> None:
        """Called with the lock held by an idle engine with work: waits up to `admit_wait_ms` for more.

        Triton's dynamic batcher (no queue delay) hands a burst over a few requests at a time;
        without a window each handful is prefilled in a forward pass of its own, and the next
        ones join a step later. The wait ends early once every slot would be taken. It goes on
        past `admit_wait_ms` while a handover() is under way (its requests are being parsed), and
        while requests keep coming: up to half a window after the latest, at most four windows
        in all. Through seekgate a 32-request burst reaches Triton over ~10 ms, and a fixed 5 ms
        window often left a third of it to a second prefill pass that held up every row.
        """
        wait_s = self.settings.admit_wait_ms / 1000
        if wait_s <= 0 or self.settings.scheduling != INFLIGHT:
            return
        start = time.monotonic()
        deadline, cap, seen = start + wait_s, start + 4 * wait_s, len(self._waiting)
        while not self._stopping and len(self._waiting) < self.settings.max_running:
            if len(self._waiting) > seen:   # more came: the rest of the burst may be right behind
                seen = len(self._waiting)
                deadline = min(cap, max(deadline, time.monotonic() + wait_s / 2))
            left = deadline - time.monotonic()
            if left <= 0 and not self._handovers:
                break
            self._cond.wait(left if left > 0 else None)   # a handover's end notifies

    def _fail_running(self, message: str) -> None:
        for seq in self._rows:
            if not seq.done:   # a row answered already (in this step or the last) keeps its one answer
                seq.done = True
                self.sink(Event(seq, "", True, message))
        self._rows, self._n, self._finished = [], 0, []
        self.cache.reset()   # nothing in it belongs to anyone now; reallocated on the next forward

    def _step(self) -> None:
        self._drop_finished()
        self._drop_cancelled()
        self._admit()
        if len(self._rows) > self._n:
            self._prefill()
        if self._n:
            self._decode()

    def _drop_finished(self) -> None:
        """Frees the slots of rows the last decode answered, now that before_step has seen their answers out.

        Freeing them in that decode (a cache copy per layer for each) held the GIL while the
        response thread sent their answers: in a tiny burst the decode that ends the sixteen short
        requests took 2.4-2.8 ms instead of 1.9, and their p50 through Triton was ~1 ms later.
        """
        for seq in sorted(self._finished, key=lambda s: -s.slot):   # highest first: lower slots stay put
            self._remove(seq)
        self._finished = []

    def _drop_cancelled(self) -> None:
        # Queued ones too: left for admission to find at the queue's head, a request whose client
        # went away waited, pending in Triton, until a running row finished and freed a slot.
        with self._cond:
            gone = [s for s in self._waiting if s.cancelled] if self._cancelled_waiting else []
            if gone:
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
            self._cancelled_waiting = False
        for seq in gone:
            self.sink(Event(seq, "", True))
        for seq in [s for s in self._rows if s.cancelled and not s.done]:
            seq.done = True
            self.sink(Event(seq, "", True))
            if self.settings.scheduling == INFLIGHT:
                self._remove(seq)

    def _admit(self) -> None:
        static = self.settings.scheduling == STATIC
        if static and self._rows:
            return
        with self._cond:
            reserved = sum(s.need() for s in self._rows)
            while self._waiting and len(self._rows) < self.settings.max_running:
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    self.sink(Event(seq, "", True))
                    continue
                if reserved + seq.need() > self.settings.budget():
                    break
                self._waiting.popleft()
                reserved += seq.need()
                seq.slot = len(self._rows)
                self._rows.append(seq)

    def _remove(self, seq: Sequence) -> None:
        """Frees a row's slot, keeping decoding rows in [0, n) and prefilling rows in [n, n+k)."""
        i, last_running = seq.slot, self._n - 1
        rows = self._rows
        if i < self._n:
            self._move(rows[last_running], i)
            rows[i] = rows[last_running]
            self._n -= 1
            i = last_running   # now a hole at the end of the decoding rows
        last = len(rows) - 1
        if i != last:
            self._move(rows[last], i)
            rows[i] = rows[last]
        rows.pop()

    def _move(self, seq: Sequence, dst: int) -> None:
        self.cache.move(seq.slot, dst, seq.prefilled + len(seq.tokens))
        seq.slot = dst

    def _mask(self, limits: Seq[tuple[int, int]], q_len: int, width: int) -> Any:
        """4D additive mask: query i of row r (at column off_r + i) sees columns [0, off_r + i]."""
        torch = self.torch
        offs = torch.tensor([o for o, _ in limits]).view(-1, 1, 1, 1)
        q = torch.arange(q_len).view(1, 1, -1, 1)
        k = torch.arange(width).view(1, 1, 1, -1)
        # Built on the host (a handful of tiny ops) and moved once: no per-row work.
        return torch.where(k <= offs + q, 0.0, self.mask_min).to(device=self.device, dtype=self.dtype)

    def _forward(self, ids: Any, positions: Any, mask: Any, keep: Any = None) -> Any:
        """Logits [rows, columns, vocab]: every column, or only those in `keep` (a 1D index tensor)."""
        extra: dict[str, Any] = {self.cache_arg: self.cache}
        if keep is not None:
            extra["logits_to_keep"] = keep
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **extra)
        return out.logits

    def _prefill(self) -> None:
        torch = self.torch
        static = self.settings.scheduling == STATIC
        pending = self._rows[self._n:]
        remaining = [len(s.prompt_ids) - s.prefilled for s in pending]
        if static:
            widths = remaining
        elif self._n == 0:
            # Nothing is decoding, so chunking would protect no stream: every newcomer gets up
            # to a chunk of its own in this one pass (a burst's prompts need one forward, not
            # one per chunk), while a long prompt is still spread over steps.
            widths = [min(r, self.settings.prefill_chunk) for r in remaining]
        else:
            widths = prefill_plan(remaining, self.settings.prefill_chunk)
        k = max(i + 1 for i, w in enumerate(widths) if w > 0) if any(widths) else 0
        if k == 0:
            return
        pending, widths = pending[:k], widths[:k]
        width = max(widths)
        # One tensor from padded lists: a copy into a row per sequence cost 0.17 ms for a burst's 32.
        pad = [self.pad_id] * width
        ids = torch.tensor([s.prompt_ids[s.prefilled:s.prefilled + w] + pad[w:] for s, w in zip(pending, widths)],
                           dtype=torch.long)
        offsets = [s.prefilled for s in pending]
        positions = torch.tensor(offsets).view(-1, 1) + torch.arange(width).view(1, -1)
        # Padding columns (past a row's w) are written too, with finite values, and masked
        # until that row's own tokens overwrite them.
        kv_width = self.cache.plan_prefill(self._n, offsets, width)
        mask = self._mask([(o, w) for o, w in zip(offsets, widths)], width, kv_width)
        # Logits only at the last prompt column of rows whose prompt this pass completes.
        cols = sorted({w - 1 for seq, w in zip(pending, widths) if w and seq.prefilled + w == len(seq.prompt_ids)})
        column = {c: i for i, c in enumerate(cols)} if self.keeps_logits else {c: c for c in range(width)}
        keep = torch.tensor(cols or [width - 1], device=self.device) if self.keeps_logits else None
        logits = self._forward(ids.to(self.device), positions.to(self.device), mask, keep)
        joined: list[Sequence] = []
        at: list[int] = []
        for r, (seq, w) in enumerate(zip(pending, widths)):
            seq.prefilled += w
            if w and seq.prefilled == len(seq.prompt_ids) and not seq.cancelled:
                joined.append(seq)
                at.append(r)
        if joined:
            index = torch.tensor(at, device=logits.device)
            last = logits[index, torch.tensor([column[widths[r] - 1] for r in at], device=logits.device)]
            for seq, tok in zip(joined, self._sample_rows(last, joined)):
                self._advance(seq, tok)
        for seq in joined:
            if seq.done and not static:
                self._remove(seq)
            else:
                # Into the first prefilling slot: it becomes the last decoding row.
                other = self._rows[self._n]
                if other is not seq:
                    self.cache.swap(seq.slot, other.slot, seq.prefilled, other.prefilled + len(other.tokens))
                    self._rows[seq.slot], self._rows[self._n] = other, seq
                    seq.slot, other.slot = other.slot, seq.slot
                self._n += 1

    def _decode(self) -> None:
        torch = self.torch
        rows = self._rows[:self._n]
        ids = torch.tensor([[s.tokens[-1] if s.tokens else self.pad_id] for s in rows], dtype=torch.long)
        pos = [len(s.prompt_ids) + max(len(s.tokens), 1) - 1 for s in rows]
        # A static batch keeps finished rows until the longest is done (decoding padding, as
        # the old code did); their column is clamped so the cache never overflows.
        pos = [min(p, self.settings.context_length - 1) for p in pos]
        positions = torch.tensor(pos).view(-1, 1)
        width = max(pos) + 1
        self.cache.plan_decode(len(rows), positions.view(-1).to(self.device), width)
        logits = self._forward(ids.to(self.device), positions.to(self.device), self._mask([(p, 1) for p in pos], 1, width))
        self.steps += 1
        finished = []
        # Finished rows of a static batch and cancelled rows (dropped at the start of the next
        # step, within one step of the cancel) are decoded but not sampled.
        live = [r for r, s in enumerate(rows) if not s.done and not s.cancelled]
        if len(live) == len(rows):
            last = logits[:, -1, :]
        else:
            last = logits[torch.tensor(live, dtype=torch.long, device=logits.device), -1, :]
        live_rows = [rows[r] for r in live]
        for seq, tok in zip(live_rows, self._sample_rows(last, live_rows)):
            self._advance(seq, tok)
            if seq.done:
                finished.append(seq)
        if self.settings.scheduling == STATIC:
            if all(s.done for s in self._rows):
                self._rows, self._n = [], 0
                for event in self._held:
                    self.sink(event)
                self._held = []
            return
        self._finished = finished   # their slots are freed at the next step's start (_drop_finished)

    def _sample_rows(self, logits: Any, rows: list[Sequence]) -> list[int]:
        """One token per row of `logits` ([rows, vocab], on the device).

        Greedy rows take one batched argmax on the device (only their ids cross to the host);
        sampled rows draw from their own seeded generator, one at a time, so each request's
        draws are the same as when it runs alone.
        """
        greedy = [r for r, s in enumerate(rows) if s.params.temperature == 0.0]
        if len(greedy) == len(rows):
            return [int(t) for t in logits.argmax(-1).tolist()]
        out = [0] * len(rows)
        if greedy:
            picked = logits[self.torch.tensor(greedy, device=logits.device)].argmax(-1).tolist()
            for r, tok in zip(greedy, picked):
                out[r] = int(tok)
        host = logits.float().cpu()
        for r, seq in enumerate(rows):
            if seq.params.temperature != 0.0:
                out[r] = self._sample(host[r], seq)
        return out

    def _detokenize(self, seq: Sequence, tok: int) -> str:
        """The output text after `tok`: the old text plus the new token's chunk.

        Decoding the whole output at every token costs O(length) per token (and a Python
        round-trip through transformers); the tokenizer's DecodeStream keeps a small window
        and returns only the new, complete characters (None while a UTF-8 character is still
        incomplete: the full decode would end in U+FFFD there, which safe_delta held back anyway).
        Tokenizers without one (slow, or cleaning up spaces after decode) decode in full.
        """
        if self._new_stream is None:
            return str(self.tokenizer.decode(seq.tokens, skip_special_tokens=True))
        if seq.stream is None:
            seq.stream = self._new_stream()
        chunk = seq.stream.step(self.tokenizer.backend_tokenizer, tok)
        if chunk is None:
            if len(seq.tokens) >= seq.params.max_tokens:
                # The last token: what the full decode gives, replacement character included.
                return str(self.tokenizer.decode(seq.tokens, skip_special_tokens=True))
            return seq.raw
        return seq.raw + chunk

    def _sample(self, logits: Any, seq: Sequence) -> int:
        torch, p = self.torch, seq.params
        if p.temperature == 0.0:
            return int(logits.argmax().item())
        # Scaled from the top logit down: every value is <= 0, so a tiny temperature (1e-40 is a
        # valid FP32) sends the others to -inf, not the top one to inf. logits / 1e-40 overflowed,
        # softmax gave NaN and multinomial's error failed every row in the step.
        probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator).item())

    def _advance(self, seq: Sequence, tok: int) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if tok == self.eos_id:
            seq.done = True
        else:
            seq.tokens.append(tok)
            self.generated += 1
            grown_from = len(seq.raw)
            seq.raw = self._detokenize(seq, tok)
            if seq.params.stop:
                # A stop string may begin in the old text and end in the new.
                start = max(0, grown_from - max(map(len, seq.params.stop)) + 1)
                seq.text, hit = cut_at_stop(seq.raw, seq.params.stop, start)
                if not hit:
                    seq.text = seq.raw
            else:
                seq.text, hit = seq.raw, False
            seq.done = hit or len(seq.tokens) >= seq.params.max_tokens
        # At the end, flush whatever was held back as a partial UTF-8 sequence.
        if seq.done:
            delta = seq.text[seq.emitted:]
        elif seq.streams and seq.params.stop:
            delta = safe_delta(seq.text[:len(seq.text) - stop_holdback(seq.text, seq.params.stop)], seq.emitted)
        else:
            delta = safe_delta(seq.text, seq.emitted)
        seq.emitted += len(delta)
        if seq.done and self.settings.scheduling == STATIC:
            # The old code answered a batch when its longest row was done: so does static mode.
            self._held.append(Event(seq, delta, True, tokens=len(seq.tokens)))
        elif seq.done or (delta and seq.streams):
            # A request answered once gets no event per token: 32 rows would wake the response
            # thread 32 times a step for events it drops.
            self.sink(Event(seq, delta, seq.done, tokens=len(seq.tokens)))
