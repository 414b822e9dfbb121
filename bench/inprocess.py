"""The engine alone, in the bench's own process: what the scheduling is worth without a server around it.

Through Triton every request also pays the HTTP frontend, the dynamic batcher, the IPC to the
Python stub, the parse in execute() and one send per answer, in both scheduling modes alike:
about 10 ms of a tiny burst's short-request latency on the 2-core box this was written on.
Here the same engine (triton_models/deepseek/1/engine.py), with the settings the model
repository's config.pbtxt gives it, gets the bench's workloads straight from a thread, so the
in-flight against static ratio is the scheduler's own. batching.py reports it as path `engine`.
Requests due together are submitted together, so static mode here takes a burst as one batch
(through Triton its dynamic batcher sometimes splits one in two).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_DIR = Path(__file__).resolve().parent.parent / "triton_models" / "deepseek" / "1"


@functools.cache
def torch_default_threads() -> int:
    """torch's own CPU thread count (one per core), read once: before InProcessEngines first changes it."""
    import torch

    return torch.get_num_threads()


def config_parameters(config_text: str) -> dict[str, str]:
    """config.pbtxt's `parameters { key: "k" value: { string_value: "v" } }` as {k: v}."""
    return dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', config_text))


def load_model_module() -> ModuleType:
    """model.py (which imports engine.py beside it), for its settings parsers; pb_utils is absent here."""
    spec = importlib.util.spec_from_file_location("deepseek_model_inprocess", MODEL_DIR / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def load_checkpoint(checkpoint: Path, gpu: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, device) as model.py loads them: bf16 on the first GPU, else float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = (torch.device("cuda:0"), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype, device_map=str(device),
                                                 local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True), device


class InProcessEngines:
    """One Engine per scheduling mode over one loaded checkpoint, each set up from its repository's config."""

    def __init__(self, checkpoint: Path, configs: dict[str, Path], gpu: bool) -> None:
        import torch

        default_threads = torch_default_threads()
        self.model_py = load_model_module()
        self.model, self.tokenizer, device = load_checkpoint(checkpoint, gpu)
        self._finished: dict[int, float] = {}
        self._errors: dict[int, str] = {}
        self._lock = threading.Condition()
        self.engines: dict[str, Any] = {}
        for mode, config in configs.items():
            params = config_parameters(config.read_text())
            limits = self.model_py.parse_limits(params, int(self.model.config.max_position_embeddings))
            # As model.py does in its own process; here one process serves every checkpoint in turn
            # (intra_op_threads is the same for every mode of one).
            torch.set_num_threads(self.model_py.parse_threads(params) or default_threads)
            self.engines[mode] = self.model_py.Engine(self.model, self.tokenizer, device,
                                                      self.model_py.parse_settings(params, limits), self._sink)

    def _sink(self, event: Any) -> None:
        if event.done:
            with self._lock:
                self._finished[id(event.seq)] = time.perf_counter()
                if event.error is not None:
                    self._errors[id(event.seq)] = event.error
                self._lock.notify_all()

    def run(self, mode: str, plan: list[tuple[float, str, int]], short: int) -> dict[str, Any]:
        """The plan's requests submitted at their times (greedy); the figures batching.run_workload reports."""
        engine = self.engines[mode]
        mp = self.model_py
        prompts = [engine.encode(p) for _, p, _ in plan]   # tokenized ahead: the engine's work only
        steps_before = engine.steps
        seqs: list[Any] = []
        start, i = time.perf_counter(), 0
        while i < len(plan):
            delay = start + plan[i][0] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            due = []   # every request whose time has come, in one submit: a burst arrives whole
            while i < len(plan) and start + plan[i][0] <= time.perf_counter():
                due.append(mp.Sequence(prompts[i], mp.GenerationParams(plan[i][2])))   # arrives now
                i += 1
            seqs += due
            for seq, error in engine.submit_many(due):
                self._sink(mp.Event(seq, "", True, str(error)))
        with self._lock:
            self._lock.wait_for(lambda: all(id(s) in self._finished for s in seqs), timeout=1800)
            finished = [self._finished.pop(id(s), None) for s in seqs]
            errors = [self._errors.pop(id(s), None) for s in seqs]
        ok = [(s, f) for s, f, e in zip(seqs, finished, errors, strict=True) if f is not None and e is None]
        total = max((f for _, f in ok), default=time.perf_counter()) - start
        latency = [(f - s.arrived, s.params.max_tokens) for s, f in ok]
        shorts = [lat for lat, n in latency if n == short]
        longs = [lat for lat, n in latency if n != short]
        ttfts = [s.first_token_at - s.arrived for s, _ in ok if s.first_token_at is not None]
        tokens = sum(len(s.tokens) for s, _ in ok)
        return {
            "requests": len(seqs), "failed": len(seqs) - len(ok), "errors": [e for e in errors if e][:3],
            "total_s": total, "tokens": tokens, "tokens_per_s": tokens / total,
            "ttft_mean_s": statistics.mean(ttfts) if ttfts else None,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None, "steps": engine.steps - steps_before,
            "short_p50_s": pct(shorts, 0.5), "short_p95_s": pct(shorts, 0.95),
            "long_p50_s": pct(longs, 0.5), "long_p95_s": pct(longs, 0.95),
        }

    def close(self) -> None:
        for engine in self.engines.values():
            engine.stop(5)


def pct(values: list[float], q: float) -> float | None:
    """The value at quantile `q` (nearest rank); batching.py takes its HTTP latencies' percentiles from here too."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]
