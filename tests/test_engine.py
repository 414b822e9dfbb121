"""engine.py in-process on the tiny checkpoint: in-flight batching gives each request exactly what it gets alone.

The reference for greedy decoding is transformers' own `generate`, one request at a
time; for seeded sampling (a per-request generator transformers does not have) it is the
engine serving that request alone.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_model import m

# model.py puts its directory (engine.py beside it) on sys.path: the same module it uses.
e = importlib.import_module("engine")
assert m.Engine is e.Engine

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", "a", "seekgate",
           "Request number 7: hello there", "Once upon a time"]


class Collector:
    """The engine's sink: every event, and a wait for a sequence's last one."""

    def __init__(self) -> None:
        self.events: list[e.Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: e.Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, seq: e.Sequence) -> list[e.Event]:
        with self._cond:
            return [ev for ev in self.events if ev.seq is seq]

    def wait(self, *seqs: e.Sequence, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(any(ev.seq is s and ev.done for ev in self.events) for s in seqs):
                assert self._cond.wait(deadline - time.monotonic()), "engine did not finish in time"

    def wait_tokens(self, seq: e.Sequence, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(seq.tokens) < n and not seq.done:
                assert self._cond.wait(deadline - time.monotonic())


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype="float32", local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(tiny_checkpoint), local_files_only=True)


def make_engine(hf: tuple[Any, Any], **settings: Any) -> tuple[e.Engine, Collector]:
    model, tokenizer = hf
    sink = Collector()
    base: dict[str, Any] = {"max_running": 8, "context_length": 256}
    return e.Engine(model, tokenizer, model.device, e.EngineSettings(**(base | settings)), sink), sink


@pytest.fixture()
def engine(hf: tuple[Any, Any]) -> Iterator[tuple[e.Engine, Collector]]:
    eng, sink = make_engine(hf)
    yield eng, sink
    eng.stop(0)


def record_forward_shapes(eng: e.Engine) -> list[tuple[int, ...]]:
    """The input shape ([rows, tokens]) of every forward pass the engine runs from now on."""
    calls: list[tuple[int, ...]] = []
    forward = eng._forward

    def counted(ids: Any, positions: Any, mask: Any, keep: Any = None) -> Any:
        calls.append(tuple(ids.shape))
        return forward(ids, positions, mask, keep)
    eng._forward = counted  # type: ignore[method-assign]
    return calls


def seq(eng: e.Engine, text: str, max_tokens: int, **params: Any) -> e.Sequence:
    return e.Sequence(eng.encode(text), e.GenerationParams(max_tokens, **params))


def hf_greedy(hf: tuple[Any, Any], text: str, max_tokens: int) -> list[int]:
    import torch
    model, tokenizer = hf
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def alone(hf: tuple[Any, Any], text: str, max_tokens: int, **params: Any) -> e.Sequence:
    eng, sink = make_engine(hf)
    try:
        s = seq(eng, text, max_tokens, **params)
        eng.submit(s)
        sink.wait(s)
        return s
    finally:
        eng.stop(0)


def test_greedy_requests_joining_mid_decode_match_transformers_generate(
        hf: tuple[Any, Any], engine: tuple[e.Engine, Collector]) -> None:
    eng, sink = engine
    first = seq(eng, PROMPTS[1], 40)
    eng.submit(first)
    sink.wait_tokens(first, 5)       # the running batch is mid-decode when the others join
    others = [seq(eng, p, 3 + 5 * i) for i, p in enumerate(PROMPTS)]
    for s in others:
        eng.submit(s)
    sink.wait(first, *others)
    for s, text in zip([first, *others], [PROMPTS[1], *PROMPTS], strict=True):
        assert s.tokens == hf_greedy(hf, text, s.params.max_tokens), text
        assert "".join(ev.delta for ev in sink.of(s)) == s.text
        # The incremental detokenizer gives exactly what one decode of the whole output gives.
        assert s.text == hf[1].decode(s.tokens, skip_special_tokens=True)
    assert eng.steps < sum(len(s.tokens) for s in [first, *others])   # rows really shared steps


def test_seeded_sampling_batched_equals_alone(hf: tuple[Any, Any], engine: tuple[e.Engine, Collector]) -> None:
    eng, sink = engine
    params = [dict(temperature=0.8, seed=i, top_p=0.9 if i % 2 else 1.0) for i in range(len(PROMPTS))]
    seqs = [seq(eng, p, 12, **kw) for p, kw in zip(PROMPTS, params, strict=True)]
    eng.submit(seqs[0])
    sink.wait_tokens(seqs[0], 3)
    for s in seqs[1:]:
        eng.submit(s)
    sink.wait(*seqs)
    for s, p, kw in zip(seqs, PROMPTS, params, strict=True):
        assert s.tokens == alone(hf, p, 12, **kw).tokens
        assert s.text == hf[1].decode(s.tokens, skip_special_tokens=True)
    assert len({tuple(s.tokens) for s in seqs}) > 1


def test_leaving_early_with_stop_string_and_max_tokens_1(hf: tuple[Any, Any],
                                                          engine: tuple[e.Engine, Collector]) -> None:
    eng, sink = engine
    full = alone(hf, PROMPTS[0], 10).text
    stop = full[3:5]
    long_, stopped, one = seq(eng, PROMPTS[1], 30), seq(eng, PROMPTS[0], 10, stop=(stop,)), seq(eng, PROMPTS[2], 1)
    for s in (long_, stopped, one):
        eng.submit(s)
    sink.wait(stopped, one)
    assert not long_.done                      # they left while the long one still runs
    sink.wait(long_)
    assert stopped.text == full[:3] and stop not in stopped.text
    assert len(one.tokens) == 1 and one.tokens == hf_greedy(hf, PROMPTS[2], 1)
    assert long_.tokens == hf_greedy(hf, PROMPTS[1], 30)


def note_final_step(eng: e.Engine, sink: Collector, target: e.Sequence) -> list[int]:
    """The engine's step count when `target`'s final event is made (filled then), events still reaching `sink`.

    The engine thread calls the sink: the count is taken as the row leaves, not once the test's thread
    wakes (other rows go on stepping meanwhile, ~0.3 ms a step on a fast CPU).
    """
    left_at: list[int] = []

    def noting_the_step(event: e.Event) -> None:
        if event.seq is target and event.done:
            left_at.append(eng.steps)
        sink(event)
    eng.sink = noting_the_step
    return left_at


def test_cancelled_row_leaves_within_a_step_and_gets_a_final_event(
        hf: tuple[Any, Any], engine: tuple[e.Engine, Collector]) -> None:
    eng, sink = engine
    victim, other = seq(eng, PROMPTS[0], 60), seq(eng, PROMPTS[1], 40)
    left_at = note_final_step(eng, sink, victim)
    eng.submit(victim)
    eng.submit(other)
    sink.wait_tokens(victim, 3)
    steps = eng.steps
    eng.cancel(victim)
    sink.wait(victim)
    assert sink.of(victim)[-1].done and sink.of(victim)[-1].error is None
    assert left_at[0] - steps <= 2 and len(victim.tokens) < 60
    sink.wait(other)
    assert other.tokens == hf_greedy(hf, PROMPTS[1], 40)


def test_engine_error_fails_only_in_flight_rows_and_engine_keeps_serving(
        hf: tuple[Any, Any], engine: tuple[e.Engine, Collector], monkeypatch: pytest.MonkeyPatch) -> None:
    eng, sink = engine
    running = seq(eng, PROMPTS[1], 50)
    eng.submit(running)
    sink.wait_tokens(running, 2)
    real = eng._forward

    def broken(*args: Any) -> Any:
        monkeypatch.setattr(eng, "_forward", real)   # fails once: a transient device error
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(eng, "_forward", broken)
    sink.wait(running)
    assert "generation failed: RuntimeError: CUDA error" in (sink.of(running)[-1].error or "")
    after = seq(eng, PROMPTS[3], 8)
    eng.submit(after)
    sink.wait(after)
    assert sink.of(after)[-1].error is None and after.tokens == hf_greedy(hf, PROMPTS[3], 8)


def test_a_row_answered_in_a_step_that_then_fails_keeps_its_one_answer(
        hf: tuple[Any, Any], engine: tuple[e.Engine, Collector], monkeypatch: pytest.MonkeyPatch) -> None:
    """A step fails after one of its rows was answered: the others get the error, that row nothing more."""
    eng, sink = engine
    short, long_ = seq(eng, PROMPTS[0], 3), seq(eng, PROMPTS[1], 40)
    real = eng._detokenize

    def failing_after_short(s: e.Sequence, tok: int) -> str:
        if s is long_ and short.done:   # the step that answered `short`, at a later row
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(s, tok)
    monkeypatch.setattr(eng, "_detokenize", failing_after_short)
    eng.submit_many([short, long_])
    sink.wait(short, long_)
    assert sum(ev.done for ev in sink.of(short)) == 1 and sink.of(short)[-1].error is None
    assert short.tokens == hf_greedy(hf, PROMPTS[0], 3)
    assert "generation failed: UnicodeDecodeError" in (sink.of(long_)[-1].error or "")
    assert sum(ev.done for ev in sink.of(long_)) == 1


def test_finished_rows_leave_at_the_next_step_after_their_answers(
        hf: tuple[Any, Any], engine: tuple[e.Engine, Collector]) -> None:
    """Answers first, then slot bookkeeping: before_step sees the finished row still placed, not running."""
    eng, sink = engine
    short, long_ = seq(eng, PROMPTS[0], 3), seq(eng, PROMPTS[1], 12)
    seen: list[tuple[bool, int, int]] = []   # (short done, rows placed, rows running) before each step

    def before_step() -> None:
        seen.append((short.done, len(eng._rows), eng.stats().running))
    eng.before_step = before_step
    eng.submit_many([short, long_])
    sink.wait(short, long_)
    first_after = next(i for i, (done, _, _) in enumerate(seen) if done)
    assert seen[first_after][1:] == (2, 1)            # answered, its slot not yet freed, not counted
    assert seen[first_after + 1][1:] == (1, 1)        # freed by the step that followed
    assert long_.tokens == hf_greedy(hf, PROMPTS[1], 12)


def test_chunked_prefill_and_token_budget_change_nothing_but_timing(hf: tuple[Any, Any]) -> None:
    long_prompt = " ".join(PROMPTS * 3)
    eng, sink = make_engine(hf, prefill_chunk=5, token_budget=256, max_running=3)
    try:
        seqs = [seq(eng, long_prompt, 10)] + [seq(eng, p, 20) for p in PROMPTS]
        assert len(seqs[0].prompt_ids) > 5 * 4    # prefilled over several steps
        for s in seqs:
            eng.submit(s)
        peak = 0
        while not all(s.done for s in seqs):
            peak = max(peak, eng.stats().running)
            time.sleep(0.001)
        sink.wait(*seqs)
        assert peak <= 3
        for s, text in zip(seqs, [long_prompt, *PROMPTS], strict=True):
            assert s.tokens == hf_greedy(hf, text, s.params.max_tokens), text
    finally:
        eng.stop(0)


def hf_greedy_ids(hf: tuple[Any, Any], ids: list[int], max_tokens: int) -> list[int]:
    import torch
    model, tokenizer = hf
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    return new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def test_a_prompts_last_chunk_beside_a_wider_one_stays_inside_the_context(hf: tuple[Any, Any]) -> None:
    # Rows prefilled together are padded to the widest; a row at offset 30 of a 48-column
    # context, padded to 20 columns, would write past its slot's end (that failed the step).
    eng, sink = make_engine(hf, max_running=4, context_length=48, prefill_chunk=30)
    try:
        running = seq(eng, PROMPTS[0], 20)
        eng.submit(running)
        sink.wait_tokens(running, 2)    # decoding: newcomers share a chunk of 30 per step
        words = eng.encode(" ".join(PROMPTS * 4))
        late = [e.Sequence(words[:40], e.GenerationParams(3)), e.Sequence(words[5:30], e.GenerationParams(4))]
        eng.submit_many(late)           # step 1: 30 of the first; step 2: its last 10 beside 20 of the second
        sink.wait(running, *late)
        for s in (running, *late):
            assert sink.of(s)[-1].error is None
        assert late[0].tokens == hf_greedy_ids(hf, words[:40], 3)
        assert late[1].tokens == hf_greedy_ids(hf, words[5:30], 4)
        assert running.tokens == hf_greedy(hf, PROMPTS[0], 20)
    finally:
        eng.stop(0)


def test_encode_many_is_encode_of_each(engine: tuple[e.Engine, Collector]) -> None:
    eng, _ = engine
    for special in (True, False):
        assert eng.encode_many(PROMPTS, special) == [eng.encode(p, special) for p in PROMPTS]


def test_burst_handed_over_in_pieces_is_prefilled_in_one_pass(hf: tuple[Any, Any]) -> None:
    # Triton hands a burst over a few requests at a time; an idle engine's admission window
    # collects them (ending early here, once every slot is taken) and prefills them together.
    eng, sink = make_engine(hf, max_running=len(PROMPTS), admit_wait_ms=1000, prefill_chunk=4)
    calls = record_forward_shapes(eng)
    try:
        seqs = [seq(eng, p, 6) for p in PROMPTS]
        for i in range(0, len(seqs), 2):
            eng.submit(seqs[i])
            eng.submit(seqs[i + 1])
            time.sleep(0.02)
        sink.wait(*seqs)
        longest = max(len(s.prompt_ids) for s in seqs)
        # All rows in the first pass; with nothing decoding, each row gets a whole chunk of its own.
        assert calls[0] == (len(PROMPTS), min(longest, 4))
        for s, text in zip(seqs, PROMPTS, strict=True):
            assert s.tokens == hf_greedy(hf, text, 6), text
    finally:
        eng.stop(0)


def test_an_idle_engine_waits_for_a_handover_under_way(hf: tuple[Any, Any]) -> None:
    # execute() parses a burst inside handover(): the 5 ms window does not close while it
    # does, so the requests it submits late are prefilled with the first, not a step later.
    eng, sink = make_engine(hf, admit_wait_ms=5)
    calls = record_forward_shapes(eng)
    try:
        first, late = seq(eng, PROMPTS[0], 3), seq(eng, PROMPTS[1], 3)
        with eng.handover():
            eng.submit(first)
            time.sleep(0.2)   # forty windows
            eng.submit(late)
        sink.wait(first, late)
        assert calls[0][0] == 2, calls
        assert first.tokens == hf_greedy(hf, PROMPTS[0], 3) and late.tokens == hf_greedy(hf, PROMPTS[1], 3)
        # Without a handover the window closes on time: the late request joins a step later.
        first, late = seq(eng, PROMPTS[0], 3), seq(eng, PROMPTS[1], 3)
        calls.clear()
        eng.submit(first)
        time.sleep(0.2)
        eng.submit(late)
        sink.wait(first, late)
        assert calls[0][0] == 1, calls
    finally:
        eng.stop(0)


def test_the_admission_window_follows_a_burst_that_keeps_coming(hf: tuple[Any, Any]) -> None:
    # 200 ms window: arrivals 50 ms apart keep it open (half a window after the latest), up to
    # four windows (800 ms) in all. Eight arrivals over 350 ms share the first pass; thirty
    # over 1450 ms do not wait for the last.
    eng, sink = make_engine(hf, max_running=32, admit_wait_ms=200)
    calls = record_forward_shapes(eng)
    try:
        for n in (8, 30):
            calls.clear()
            seqs = [seq(eng, PROMPTS[i % len(PROMPTS)], 2) for i in range(n)]
            for s in seqs:
                eng.submit(s)
                time.sleep(0.05)
            sink.wait(*seqs)
            if n == 8:
                assert calls[0][0] == 8, calls
            else:
                assert 8 <= calls[0][0] < 30, calls
        assert all(s.tokens == hf_greedy(hf, PROMPTS[i % len(PROMPTS)], 2) for i, s in enumerate(seqs))
    finally:
        eng.stop(0)


def test_static_scheduling_gives_the_same_tokens(hf: tuple[Any, Any]) -> None:
    eng, sink = make_engine(hf, scheduling=e.STATIC)
    try:
        seqs = [seq(eng, p, 2 + 3 * i) for i, p in enumerate(PROMPTS)]
        for s in seqs:
            eng.submit(s)
        sink.wait(*seqs)
        for s, text in zip(seqs, PROMPTS, strict=True):
            assert s.tokens == hf_greedy(hf, text, s.params.max_tokens)
    finally:
        eng.stop(0)


def test_submit_refuses_what_can_never_be_admitted(engine: tuple[e.Engine, Collector]) -> None:
    eng, _ = engine
    with pytest.raises(e.RequestError, match="token budget of 256"):
        eng.submit(e.Sequence([1] * 250, e.GenerationParams(10)))


def test_stop_drains_running_rows_and_fails_waiting_ones(hf: tuple[Any, Any]) -> None:
    eng, sink = make_engine(hf, max_running=1)
    running, queued = seq(eng, PROMPTS[0], 20), seq(eng, PROMPTS[1], 20)
    eng.submit(running)
    eng.submit(queued)
    sink.wait_tokens(running, 1)
    eng.stop(30)
    assert running.done and sink.of(running)[-1].error is None and len(running.tokens) == 20
    assert sink.of(queued)[-1].error == "the model is shutting down"
    with pytest.raises(e.RequestError, match="shutting down"):
        eng.submit(seq(eng, "late", 2))


def test_cut_at_stop_from_a_start_finds_stops_spanning_it() -> None:
    assert e.cut_at_stop("hello world", ("lo w",), start=3) == ("hel", True)
    assert e.cut_at_stop("hello world", ("he",), start=1) == ("hello world", False)


def test_sampling_mixed_greedy_and_seeded_rows_in_one_batch(hf: tuple[Any, Any],
                                                            engine: tuple[e.Engine, Collector]) -> None:
    eng, sink = engine
    kinds = [dict(), dict(temperature=0.7, seed=3), dict(), dict(temperature=1.2, seed=9, top_p=0.8)]
    seqs = [seq(eng, p, 10, **kw) for p, kw in zip(PROMPTS, kinds, strict=False)]
    for s in seqs:
        eng.submit(s)
    sink.wait(*seqs)
    for s, p, kw in zip(seqs, PROMPTS, kinds, strict=False):
        assert s.tokens == (alone(hf, p, 10, **kw).tokens if kw else hf_greedy(hf, p, 10)), p


def test_prefill_plan_shares_the_chunk_first_come_first_served() -> None:
    assert e.prefill_plan([3, 10, 4], 8) == [3, 5, 0]
    assert e.prefill_plan([2], 8) == [2]


def test_requests_handed_over_together_are_prefilled_together_and_a_bad_one_is_refused_alone(
        hf: tuple[Any, Any]) -> None:
    """execute() queues Triton's handful at once (one wake-up), so no forward pass starts with
    the first of them while the rest are still being parsed; one that can never fit is refused."""
    eng, sink = make_engine(hf, max_running=len(PROMPTS), context_length=64)
    calls = record_forward_shapes(eng)
    try:
        seqs = [seq(eng, p, 4) for p in PROMPTS]
        too_long = seq(eng, "Hello", 200)
        refused = eng.submit_many([seqs[0], too_long, *seqs[1:]])
        assert [(s, "over this model's token budget of 64" in str(err)) for s, err in refused] == [(too_long, True)]
        sink.wait(*seqs)
        assert calls[0][0] == len(PROMPTS)   # every request in the first pass
        for s, text in zip(seqs, PROMPTS, strict=True):
            assert s.tokens == hf_greedy(hf, text, 4), text
        assert too_long.generator is None and not too_long.tokens
    finally:
        eng.stop(0)


def test_a_prefill_computes_logits_only_at_the_prompts_last_columns(hf: tuple[Any, Any]) -> None:
    """Every other column's logits would be thrown away: with a 129k vocabulary a 1024-token
    chunk's would be ~0.5 GB of bf16. A pass that completes no prompt asks for one column."""
    eng, sink = make_engine(hf, max_running=len(PROMPTS), prefill_chunk=4)
    forward, passes = eng._forward, []

    def recorded(ids: Any, positions: Any, mask: Any, keep: Any = None) -> Any:
        logits = forward(ids, positions, mask, keep)
        passes.append((tuple(ids.shape), tuple(logits.shape[:2])))
        return logits
    eng._forward = recorded  # type: ignore[method-assign]
    try:
        short, long_ = seq(eng, "Hi", 3), seq(eng, "The quick brown fox jumps over the lazy dog", 3)
        lengths = (len(short.prompt_ids), len(long_.prompt_ids))
        assert lengths[0] <= 4 < lengths[1] - 4   # the long prompt needs three chunks of 4
        eng.submit_many([short, long_])
        sink.wait(short, long_)
        prefills = [(shape, kept) for shape, kept in passes if shape[1] > 1]
        # First pass: both rows, width 4; only the short prompt ends in it, at its own last column.
        assert prefills[0] == ((2, 4), (2, 1))
        assert all(kept[1] == 1 for _, kept in prefills)   # one column each pass, never the width
        assert short.tokens == hf_greedy(hf, "Hi", 3)
        assert long_.tokens == hf_greedy(hf, "The quick brown fox jumps over the lazy dog", 3)
    finally:
        eng.stop(0)


def test_stop_holdback_is_the_longest_end_that_could_begin_a_stop() -> None:
    assert e.stop_holdback("hello wo", ("world", "x")) == 2
    assert e.stop_holdback("hello", ("lo!", "llo!")) == 3
    assert e.stop_holdback("hello", ("z", "abc")) == 0
    assert e.stop_holdback("aaa", ("aab",)) == 2 and e.stop_holdback("abab", ("ababc",)) == 4
    assert e.stop_holdback("ab", ("b",)) == 0   # a whole stop is cut_at_stop's, not held back


def test_a_cancelled_request_still_queued_leaves_at_the_next_step(hf: tuple[Any, Any]) -> None:
    # Only admission dropped queued cancels, at the queue's head, once a running row freed its
    # slot: with every slot busy, a client gone away kept its request pending for a whole answer.
    eng, sink = make_engine(hf, max_running=1)
    try:
        running, queued = seq(eng, PROMPTS[0], 200), seq(eng, PROMPTS[1], 10)
        left_at = note_final_step(eng, sink, queued)
        eng.submit(running)
        sink.wait_tokens(running, 3)
        eng.submit(queued)
        steps = eng.steps
        eng.cancel(queued)
        sink.wait(queued)
        assert sink.of(queued)[-1].done and sink.of(queued)[-1].error is None and not queued.tokens
        assert left_at[0] - steps <= 2
        sink.wait(running)
        assert running.tokens == hf_greedy(hf, PROMPTS[0], 200)
    finally:
        eng.stop(0)
