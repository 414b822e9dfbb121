#!/usr/bin/env python
"""Static batching (the old whole-batch decode) against in-flight batching, side by side in one run.

What it does
    For each checkpoint (the tiny one, and with --large LARGE_CONFIG: a random DeepSeek-V3 of
    about 27M parameters built here, whose decode steps cost about in proportion to their rows;
    see "The large checkpoint" below) and each scheduling mode (`static`: a batch is admitted
    when the previous one is done and decoded until its longest row finishes -- what model.py
    did before issue 19; `inflight`: rows join and leave at every step), it starts the real
    tritonserver on a model repository whose `deepseek` config differs only in the `scheduling`
    parameter (static also gets the old dynamic batcher: preferred sizes 8/16/32, 5 ms queue
    delay), puts seekgate in front of it, and sends two workloads through Triton directly and
    through seekgate, and to the same engine run in this process with no server around it
    (path `engine`, bench/inprocess.py: the scheduling's own effect, without the ~10 ms of
    HTTP, batcher, IPC and answer sends a request pays through Triton in both modes alike):
      burst:   N requests at once, half short (max_tokens --short), half long (--long);
      poisson: M requests of the same mix arriving at random (exponential gaps, --gap-ms).
    Greedy decoding, prompts varied per request, sent by a lean HTTP client (bench/burstclient.py:
    a burst leaves in about half a millisecond). Every mode's servers are up at once and each
    round runs every (mode, path) back to back, the order reversed every other round, so load
    drifting over the run (a shared machine) hits both modes alike. The large checkpoint gets
    fresh servers every round (--fresh-servers: the tiny one too): two Tritons with the same
    config, up side by side, differed by 6-18% in tok/s for as long as they ran, so one
    process's luck would otherwise sit in every round's ratio.

What it prints (and writes with --json)
    One row per (checkpoint, workload, path, mode), medians over the rounds: total time,
    output tokens/s, time to first token (mean and p50, measured by the model itself: its
    deepseek_time_to_first_token_seconds histogram, from arrival in the engine), short / long
    request latency p50 and p95 (client side), decode steps the run took (the model's
    deepseek_decode_steps_total), and `spread` ((max - min) / median of tok/s over the rounds).
    Then in-flight vs static: per round the two modes' ratio (they ran back to back), the
    median of those and their range, and the issue's targets: short p50 >= 10x lower in the
    tiny burst, throughput not lower anywhere, >= 1.5x throughput on the large checkpoint's burst.

The large checkpoint
    Per-step scheduling can only win throughput if a step with half the rows costs about half
    as much. `--step-costs` measures that in-process, through the engine's own forward path
    (float32, as model.py on a CPU). On the shared 2-core Xeon this was chosen on (AVX-512, MKL),
    ms per decode step, least of 2-4 bursts, and the ratio to 32 rows:
        rows                                 1           4           8          16          32
        old: 8 heads, latent 128,            5.7 (0.24)  8.2 (0.35) 11.0 (0.46) 16.9 (0.71) 23.8 (1.00)
             8 experts top-2 (48 tokens)
        16 heads, latent 256, 4 experts     12.3 (0.25) 18.0 (0.36) 23.0 (0.46) 32.1 (0.65) 49.8 (1.00)
             top-2 (64 tokens)
        LARGE_CONFIG: 32 heads, latent 256, 14.8 (0.18) 23.6 (0.28) 31.1 (0.37) 47.7 (0.57) 83.5 (1.00)
             4 experts top-2 (64 tokens)
    A 32-request burst, half 4 and half 64 tokens, can gain at most 64 T(32) / (4 T(32) + 60 T(16))
    from per-step scheduling: 1.3x for the old checkpoint, 1.5x for the 16-head one, 1.67x here.
    Wider weight matrices do not help on this CPU: a float32 matmul (MKL) costs 0.74-0.79 as
    much with 16 rows as with 32 (and 1.5x for 64) at 512x1536 to 2048x8192, weights being
    streamed, not multiplied, at these row counts (the experts already run transformers'
    grouped_mm here, not a per-expert Python loop). What grows with rows is per-row work:
    transformers' DeepSeek-V3 attention re-expands every cached latent of every row through
    kv_b_proj at each step (rows x context x kv_lora_rank x heads x (nope + v) multiply-adds,
    a compute-bound matmul), so LARGE_CONFIG widens that (32 heads, kv_lora_rank 256, 64 + 64
    head dims) and routes over 4 experts instead of 8 (each expert's matmul gets more
    rows). Under load from other processes the 32-row step slows more than the 16-row one (its
    per-row state outgrows the 2 MB L2 per core), so on a busy machine the ratio comes out higher.

GPU
    Runs unchanged on a GPU host: with a visible NVIDIA GPU (or --device gpu) each
    repository is built from configs/gpu.pbtxt (KIND_GPU, bf16) instead of config.pbtxt.

Usage
    python bench/batching.py [--large] [--rounds 5] [--large-rounds 3] [--burst 32] [--poisson 64]
        [--gap-ms 17] [--short 4] [--long 64] [--device auto|cpu|gpu] [--json out.json]
    python bench/batching.py --step-costs      # the large checkpoint's step cost against rows

A benchmark, not a test: it asserts nothing and exits 0 whether or not targets are met
(1 only if requests fail).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stack  # noqa: E402
from bench.burstclient import Connection, build_request  # noqa: E402
from bench.inprocess import InProcessEngines, load_checkpoint, pct  # noqa: E402
from proxy.local.triton import TritonLaunch, TritonProcess, free_ports  # noqa: E402

MODEL_DIR = stack.REPO / "triton_models" / "deepseek"
NO_WINDOW = "inflight0"   # in-flight with admit_wait_ms 0 (--no-window-too)
ENGINE = "engine"         # the path of the engine run in this process (bench/inprocess.py), no server around it
REQUEST_TIMEOUT_S = 1800  # a server that stops answering fails the run instead of hanging it
# The large checkpoint. Chosen from `--step-costs` tables (module docstring): a decode step's cost must
# grow with its rows, or per-step scheduling has nothing to save when half the rows are done.
LARGE_CONFIG: dict[str, Any] = dict(
    hidden_size=512, intermediate_size=1536, moe_intermediate_size=512, num_hidden_layers=4,
    first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
    topk_group=1, num_attention_heads=32, num_key_value_heads=32, kv_lora_rank=256, q_lora_rank=256,
    qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=256,
    tie_word_embeddings=False)
STATIC_BATCHER = "dynamic_batching {\n  preferred_batch_size: [ 8, 16, 32 ]\n  max_queue_delay_microseconds: 5000\n}"


# ------------------------------------------------------------------ set-up


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def repository(root: Path, mode: str, gpu: bool, threads: int | None = None) -> Path:
    """A repository whose `deepseek` is triton_models/deepseek with `scheduling` set to `mode`.

    `threads` overrides the CPU config's `intra_op_threads` (the large checkpoint is compute-bound:
    its 32-row step takes 164 ms on one thread against 95 on two).
    """
    source = (MODEL_DIR / "configs" / "gpu.pbtxt" if gpu else MODEL_DIR / "config.pbtxt").read_text()
    config = re.sub(r'(key: "scheduling" value: \{ string_value: )"\w+"', rf'\1"{mode.rstrip("0")}"', source)
    if threads is not None:
        config = re.sub(r'(key: "intra_op_threads" value: \{ string_value: )"\d+"', rf'\1"{threads}"', config)
    if mode == NO_WINDOW:   # the engine before its admission window, to compare in the same run
        config = re.sub(r'(key: "admit_wait_ms" value: \{ string_value: )"[\d.]+"', r'\1"0"', config)
    if mode == "static":
        config = re.sub(r"dynamic_batching \{[^}]*\}", STATIC_BATCHER, config)
    model = root / f"repo-{mode}" / "deepseek"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(config)
    if not (model / "1").exists():
        (model / "1").symlink_to(MODEL_DIR / "1", target_is_directory=True)
    return model.parent


def start_triton(repo: Path, data: Path, checkpoint: Path) -> TritonProcess:
    http, grpc_, metrics = free_ports(3)
    launch = TritonLaunch(repo, data, checkpoint, http_port=http, grpc_port=grpc_, metrics_port=metrics,
                          config_name="default", startup_timeout_s=300)
    return TritonProcess(launch).__enter__()


def build_large_checkpoint(out: Path, tokenizer_from: Path) -> Path:
    """A random DeepSeek-V3 (LARGE_CONFIG, about 27M parameters) whose decode steps cost about in proportion to rows."""
    import torch
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    config = DeepseekV3Config(**LARGE_CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)   # decisive greedy choices, as in the tiny checkpoint
    model.save_pretrained(str(out), safe_serialization=True)
    model.generation_config.save_pretrained(str(out))
    return out


def step_costs(checkpoint: Path, rows: tuple[int, ...] = (1, 4, 8, 16, 32), steps: int = 64,
               reps: int = 3) -> dict[int, float]:
    """Seconds per decode step against rows, in-process through the engine's own forward path.

    Loads the checkpoint as model.py does (float32 on the CPU), runs bursts of `rows` greedy
    requests of the bench's prompts for `steps` tokens, and times every decode forward pass
    (Engine._forward with one query column); per burst the mean step, per row count the least
    of `reps` bursts (the sizes take turns, so load drifting over the run hits all of them).
    """
    import threading

    sys.path.insert(0, str(MODEL_DIR / "1"))
    from engine import Engine, EngineSettings, GenerationParams, Sequence

    model, tok, device = load_checkpoint(checkpoint, gpu=False)
    left, done = [0], threading.Event()

    def sink(event: Any) -> None:
        if event.done:
            left[0] -= 1
            if not left[0]:
                done.set()

    engine = Engine(model, tok, device, EngineSettings(max_running=max(rows), context_length=256), sink)
    forward, timed = engine._forward, []

    def timed_forward(ids: Any, positions: Any, mask: Any, keep: Any = None) -> Any:
        t = time.perf_counter()
        out = forward(ids, positions, mask, keep)
        if ids.shape[1] == 1:
            timed.append(time.perf_counter() - t)
        return out

    engine._forward = timed_forward  # type: ignore[method-assign]
    best: dict[int, float] = {}
    order = [max(rows)] + [n for r in range(reps) for n in (rows if r % 2 == 0 else rows[::-1])]
    for i, n in enumerate(order):   # the first burst warms up
        timed.clear()
        done.clear()
        left[0] = n
        for j in range(n):
            engine.submit(Sequence(engine.encode(f"Request {j}: tell me everything"), GenerationParams(steps)))
        done.wait()
        if i:
            best[n] = min(best.get(n, float("inf")), statistics.mean(timed))
    engine.stop(1)
    return best


# ------------------------------------------------------------------ load


def workload(kind: str, n: int, short: int, long_: int, gap_ms: float, seed: int = 0) -> list[tuple[float, str, int]]:
    """(send at seconds, prompt, max_tokens): alternating short and long, at once or Poisson."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        out.append((t, f"Request {i}: tell me everything", short if i % 2 == 0 else long_))
        if kind == "poisson":
            t += rng.expovariate(1000 / gap_ms)
    return out


async def send(conn: Connection, request: bytes, at: float, start: float, max_tokens: int) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    sent = time.perf_counter()
    response = await asyncio.wait_for(conn.send(request), REQUEST_TIMEOUT_S)
    latency = time.perf_counter() - sent
    ok = response.status == 200
    body = response.json() if ok else response.body.decode(errors="replace")
    return {"ok": ok, "latency": latency, "max_tokens": max_tokens,
            "tokens": body.get("output_tokens", 0) if ok else 0, "error": None if ok else body}


def ttft(metrics_url: str) -> tuple[float, float, list[tuple[float, float]], float]:
    """The model's TTFT histogram (sum, count, cumulative buckets) and its decode steps so far."""
    with urllib.request.urlopen(metrics_url) as r:
        fams = text_string_to_metric_families(r.read().decode())
    s = c = steps = 0.0
    buckets = []
    for f in fams:
        for x in f.samples:
            if x.labels.get("model") != "deepseek":
                continue
            if x.name == "deepseek_time_to_first_token_seconds_sum":
                s = x.value
            elif x.name == "deepseek_time_to_first_token_seconds_count":
                c = x.value
            elif x.name == "deepseek_time_to_first_token_seconds_bucket":
                buckets.append((float(x.labels["le"]), x.value))
            elif x.name == "deepseek_decode_steps_total":
                steps = x.value
    return s, c, sorted(buckets), steps


def hist_p50(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    delta = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = delta[-1][1] if delta else 0
    if not total:
        return None
    prev_le, prev_c = 0.0, 0.0
    for le, cum in delta:
        if cum >= total / 2:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (total / 2 - prev_c) / max(cum - prev_c, 1e-9)
        prev_le, prev_c = le, cum
    return None


async def run_workload(url: str, headers: dict[str, str], metrics_url: str,
                       plan: list[tuple[float, str, int]], short: int) -> dict[str, Any]:
    before = ttft(metrics_url)
    # One open connection per request before the clock starts, as a client with a pool has
    # (tritonclient, perf_analyzer): a burst then measures scheduling, not 32 TCP handshakes.
    conns = await asyncio.gather(*(Connection.open(url) for _ in plan))
    try:
        ready = build_request("GET", url + "/v2/health/ready")
        await asyncio.gather(*(c.send(ready) for c in conns))
        # ignore_eos is not a model input: "tell me everything" prompts run to max_tokens on these checkpoints.
        requests = [build_request("POST", url + "/v2/models/deepseek/generate", headers,
                                  {"text_input": p, "max_tokens": n}) for _, p, n in plan]
        # Through seekgate those probes are audited and counted like any request: a pool opened
        # ahead of time would not have its own audit records still being written under the burst.
        await asyncio.sleep(0.3)
        start = time.perf_counter()
        results = await asyncio.gather(*(send(c, req, at, start, n)
                                         for c, req, (at, _, n) in zip(conns, requests, plan, strict=True)))
        total = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    await asyncio.sleep(0.3)   # the model sets its metrics after the step that answered
    after = ttft(metrics_url)
    shorts = [r["latency"] for r in results if r["ok"] and r["max_tokens"] == short]
    longs = [r["latency"] for r in results if r["ok"] and r["max_tokens"] != short]
    count = after[1] - before[1]
    return {
        "requests": len(results), "failed": sum(not r["ok"] for r in results),
        "errors": [r["error"] for r in results if not r["ok"]][:3],
        "total_s": total, "tokens": sum(r["tokens"] for r in results),
        "tokens_per_s": sum(r["tokens"] for r in results) / total,
        "ttft_mean_s": (after[0] - before[0]) / count if count else None,
        "ttft_p50_s": hist_p50(before[2], after[2]),
        "steps": after[3] - before[3],   # decode steps (forward passes, less prefills) the run took
        "short_p50_s": pct(shorts, 0.5), "short_p95_s": pct(shorts, 0.95),
        "long_p50_s": pct(longs, 0.5), "long_p95_s": pct(longs, 0.95),
    }


def median_of(ms: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over rounds; failures summed; `spread`: (max - min) / median of tok/s."""
    out: dict[str, Any] = {"requests": ms[0]["requests"], "failed": sum(m["failed"] for m in ms),
                           "errors": [x for m in ms for x in m["errors"]][:3]}
    for key in ms[0]:
        if key in out:
            continue
        values = [m[key] for m in ms if m[key] is not None]
        out[key] = statistics.median(values) if values else None
    tps = [m["tokens_per_s"] for m in ms]
    out["spread"] = (max(tps) - min(tps)) / statistics.median(tps) if len(tps) > 1 and min(tps) > 0 else 0.0
    return out


def issue_key(config: Path) -> str:
    return stack.create_key(config, "batching-bench")


# ------------------------------------------------------------------ report


def fmt(v: Any, ms: bool = True) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}" if ms else f"{v:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'checkpoint':<8} {'workload':<8} {'path':<9} {'mode':<9} {'total ms':>9} {'tok/s':>8} "
            f"{'TTFT mean':>9} {'TTFT p50':>9} {'short p50':>9} {'short p95':>9} {'long p50':>9} {'long p95':>9} "
            f"{'steps':>6} {'spread':>6} fail")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["m"]
        lines.append(f"{r['checkpoint']:<8} {r['workload']:<8} {r['path']:<9} {r['mode']:<9} {fmt(m['total_s']):>9} "
                     f"{fmt(m['tokens_per_s'], False):>8} {fmt(m['ttft_mean_s']):>9} {fmt(m['ttft_p50_s']):>9} "
                     f"{fmt(m['short_p50_s']):>9} {fmt(m['short_p95_s']):>9} {fmt(m['long_p50_s']):>9} "
                     f"{fmt(m['long_p95_s']):>9} {m.get('steps') or 0:>6.0f} {m.get('spread', 0) * 100:>5.0f}% {m['failed']}")
    return "\n".join(lines)


def paired(static: dict[str, Any], other: dict[str, Any]) -> tuple[float | None, float | None, list[float]]:
    """(short p50 lower by, throughput ratio, per-round throughput ratios): medians of per-round ratios.

    Round i of both modes ran back to back (modes take turns), so each round's ratio compares
    the two under the same load; the median of those is steadier than a ratio of medians.
    """
    shorts = [s["short_p50_s"] / f["short_p50_s"] for s, f in zip(static["rounds"], other["rounds"], strict=True)
              if s["short_p50_s"] and f["short_p50_s"]]
    thr = [f["tokens_per_s"] / s["tokens_per_s"] for s, f in zip(static["rounds"], other["rounds"], strict=True)
           if s["tokens_per_s"]]
    return (statistics.median(shorts) if shorts else None, statistics.median(thr) if thr else None, thr)


def ratios(rows: list[dict[str, Any]]) -> str:
    by = {(r["checkpoint"], r["workload"], r["path"], r["mode"]): r for r in rows}
    lines = ["", "in-flight vs static (same checkpoint, workload, path; medians of per-round ratios, "
                 "throughput's per-round range in brackets):"]
    verdicts = []
    for (ck, wl, path, mode), s in by.items():
        if mode != "static":
            continue
        for other, note in ((NO_WINDOW, "  (admit_wait_ms 0)"), ("inflight", "")):
            if (ck, wl, path, other) not in by:
                continue
            short, thr, each = paired(s, by[(ck, wl, path, other)])
            lines.append(f"  {ck:<6} {wl:<8} {path:<9} short p50 {short or 0:.1f}x lower, throughput {thr or 0:.2f}x "
                         f"[{min(each, default=0):.2f}-{max(each, default=0):.2f}]{note}")
            if other != "inflight":   # printed only: the targets are the engine's, as configured
                continue
            if thr is not None:
                verdicts.append(f"throughput not lower ({ck} {wl} {path}): {'MET' if thr >= 0.95 else 'MISSED'} "
                                f"({thr:.2f}x; 5% noise allowed)")
            if wl == "burst" and ck == "tiny" and short is not None:
                verdicts.append(f"short p50 >= 10x lower ({ck} burst {path}): {'MET' if short >= 10 else 'MISSED'} "
                                f"({short:.1f}x)")
            if wl == "burst" and ck == "large" and thr is not None:
                verdicts.append(f">= 1.5x throughput (large burst {path}): {'MET' if thr >= 1.5 else 'MISSED'} "
                                f"({thr:.2f}x)")
    return "\n".join(lines + ["", "targets:"] + [f"  {v}" for v in verdicts])


# ------------------------------------------------------------------ main


Side = tuple[str, str, str, dict[str, str], str]   # (mode, path, url, headers, metrics url)


@contextlib.contextmanager
def serving(root: Path, ck_name: str, ck: Path, modes: tuple[str, ...], gpu: bool,
            args: argparse.Namespace) -> Iterator[tuple[list[Side], InProcessEngines | None]]:
    """One real Triton per mode (each with a seekgate unless --no-seekgate; none with --engine-only),
    and the engine in-process (path `engine`, unless --no-engine), all warmed up; stopped on exit.

    Every mode's servers are up at once and the modes take turns within each round, order
    reversed every other round: load drifting over the run (a shared machine) then hits every
    mode alike instead of whichever ran last.
    """
    servers: list[tuple[TritonProcess, Any]] = []
    sides: list[Side] = []
    configs: dict[str, Path] = {}
    in_process: InProcessEngines | None = None
    warm = workload("burst", args.burst, args.short, args.long, 0)
    try:
        for mode in modes:
            repo = repository(root / ck_name, mode, gpu, threads=0 if ck_name == "large" else None)
            configs[mode] = repo / "deepseek" / "config.pbtxt"
            if args.engine_only:
                continue
            triton = start_triton(repo, root / ck_name / f"data-{mode}", ck)
            servers.append((triton, None))
            metrics_url = f"http://127.0.0.1:{triton.launch.metrics_port}/metrics"
            sides.append((mode, "triton", triton.http_url, {}, metrics_url))
            if not args.no_seekgate:
                config = stack.seekgate_config(root / ck_name / f"gw-{mode}", stack.upstream_of(triton))
                key = issue_key(config)
                servers[-1] = (triton, stack.start_seekgate(config))
                sides.append((mode, "seekgate", servers[-1][1].url, {"Authorization": f"Bearer {key}"}, metrics_url))
            # Warm-up: one full burst, thrown away, through seekgate when there is one (it reaches
            # Triton too). A 4-request warm-up left the first full-size batch paying torch's
            # first-use costs (a 14 s static burst, once); a Triton-only one left seekgate's first
            # burst paying its own (the key's first verification, cold caches): 85 ms once.
            _, _, warm_url, warm_headers, _ = sides[-1]
            stack.run_loop(run_workload(warm_url, warm_headers, metrics_url, warm, args.short))
        if not args.no_engine:
            in_process = InProcessEngines(ck, configs, gpu)
            for mode in modes:
                in_process.run(mode, warm, args.short)   # its first burst pays torch's first-use costs too
                sides.append((mode, ENGINE, "", {}, ""))
        yield sides, in_process
    finally:
        if in_process is not None:
            in_process.close()
        for triton, gw in servers:
            if gw is not None:
                gw.stop()
            triton.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--large", action="store_true", help="also the compute-bound checkpoint")
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--poisson", type=int, default=64)
    p.add_argument("--gap-ms", type=float, default=17.0)
    p.add_argument("--short", type=int, default=4)
    p.add_argument("--long", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5,
                   help="runs of each workload per mode and path (tiny checkpoint); medians reported")
    p.add_argument("--large-rounds", type=int, default=3, help="the same for the large checkpoint")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--no-seekgate", action="store_true", help="Triton directly only")
    p.add_argument("--no-engine", action="store_true", help="not the engine in-process (path `engine`)")
    p.add_argument("--engine-only", action="store_true",
                   help="only the engine in-process: no Triton, no seekgate (a GPU host without tritonserver)")
    p.add_argument("--fresh-servers", action="store_true",
                   help="a fresh Triton (and seekgate) per mode for every round of the tiny checkpoint too "
                        "(the large one always gets them)")
    p.add_argument("--no-window-too", action="store_true",
                   help=f"also run the engine with admit_wait_ms 0 (mode {NO_WINDOW}), side by side")
    p.add_argument("--json", type=Path)
    p.add_argument("--step-costs", action="store_true",
                   help="only print the large checkpoint's decode-step cost against rows (in-process) and exit")
    args = p.parse_args(argv)
    if args.engine_only and args.no_engine:
        p.error("--engine-only and --no-engine leave nothing to run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = has_gpu() if args.device == "auto" else args.device == "gpu"
    from proxy.local.tinymodel import build_tiny_checkpoint

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="seekgate-batching-") as tmp:
        root = Path(tmp)
        if args.step_costs:
            costs = step_costs(build_large_checkpoint(root / "ck-large", build_tiny_checkpoint(root / "ck-tiny")))
            top = costs[max(costs)]
            print("rows  ms/step  vs 32 rows")
            for n, c in costs.items():
                print(f"{n:>4} {c * 1000:>8.1f} {c / top:>10.2f}")
            return 0
        checkpoints = {"tiny": build_tiny_checkpoint(root / "ck-tiny", seed=0)}
        if args.large:
            checkpoints["large"] = build_large_checkpoint(root / "ck-large", checkpoints["tiny"])
        modes = ("static", "inflight") + ((NO_WINDOW,) if args.no_window_too else ())
        for ck_name, ck in checkpoints.items():
            rounds = args.large_rounds if ck_name == "large" else args.rounds
            fresh = args.fresh_servers or ck_name == "large"
            plans = {wl: workload(wl, n, args.short, args.long, args.gap_ms)
                     for wl, n in (("burst", args.burst), ("poisson", args.poisson))}
            runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
            with contextlib.ExitStack() as up:
                sides, in_process = up.enter_context(serving(root, ck_name, ck, modes, gpu, args))
                for r in range(rounds):
                    if fresh and r:
                        up.close()
                        sides, in_process = up.enter_context(serving(root, ck_name, ck, modes, gpu, args))
                    for wl, plan in plans.items():
                        for mode, path, url, headers, metrics_url in (sides if r % 2 == 0 else sides[::-1]):
                            if path == ENGINE:
                                assert in_process is not None
                                measured = in_process.run(mode, plan, args.short)
                            else:
                                measured = stack.run_loop(run_workload(url, headers, metrics_url, plan, args.short))
                            runs.setdefault((wl, mode, path), []).append(measured)
            for (wl, mode, path), ms in runs.items():   # first round's order: workload by workload
                row = {"checkpoint": ck_name, "workload": wl, "path": path, "mode": mode,
                       "m": median_of(ms), "rounds": ms}
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print()
    print(f"device: {'GPU (configs/gpu.pbtxt)' if gpu else 'CPU (config.pbtxt)'}; short={args.short} "
          f"long={args.long} tokens; burst {args.burst}, poisson {args.poisson} at {args.gap_ms} ms mean gap")
    print(table(rows))
    print(ratios(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any(r["m"]["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
