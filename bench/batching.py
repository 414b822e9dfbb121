#!/usr/bin/env python
"""Static batching (the old whole-batch decode) against in-flight batching, side by side in one run.

What it does
    For each checkpoint (the tiny one, and with --large a compute-bound random
    DeepSeek-V3 of about 17M parameters built here) and each scheduling mode
    (`static`: a batch is admitted when the previous one is done and decoded until its
    longest row finishes -- what model.py did before issue 19; `inflight`: rows join and
    leave at every step), it starts the real tritonserver on a model repository whose
    `deepseek` config differs only in the `scheduling` parameter (static also gets the
    old dynamic batcher: preferred sizes 8/16/32, 5 ms queue delay), puts seekgate in
    front of it, and sends two workloads through Triton directly and through seekgate:
      burst:   N requests at once, half short (max_tokens --short), half long (--long);
      poisson: M requests of the same mix arriving at random (exponential gaps, --gap-ms).
    Greedy decoding, prompts varied per request.

What it prints (and writes with --json)
    One row per (checkpoint, workload, path, mode): total time, output tokens/s,
    time to first token (mean and p50, measured by the model itself: its
    deepseek_time_to_first_token_seconds histogram, from arrival in the engine), and
    short / long request latency p50 and p95 (client side). Then the ratios in-flight vs
    static and the issue's targets: short p50 >= 10x lower in the burst, throughput not
    lower anywhere, >= 1.5x throughput on the large checkpoint's burst.

GPU
    Runs unchanged on a GPU host: with a visible NVIDIA GPU (or --device gpu) each
    repository is built from configs/gpu.pbtxt (KIND_GPU, bf16) instead of config.pbtxt.

Usage
    python bench/batching.py [--large] [--burst 32] [--poisson 64] [--gap-ms 17]
        [--short 4] [--long 64] [--device auto|cpu|gpu] [--json out.json]

A benchmark, not a test: it asserts nothing and exits 0 whether or not targets are met
(1 only if requests fail).
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stack  # noqa: E402
from proxy.local.triton import TritonLaunch, TritonProcess, free_ports  # noqa: E402

MODEL_DIR = stack.REPO / "triton_models" / "deepseek"
NO_WINDOW = "inflight0"   # in-flight with admit_wait_ms 0 (--no-window-too)
STATIC_BATCHER = "dynamic_batching {\n  preferred_batch_size: [ 8, 16, 32 ]\n  max_queue_delay_microseconds: 5000\n}"


# ------------------------------------------------------------------ set-up


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def repository(root: Path, mode: str, gpu: bool) -> Path:
    """A repository whose `deepseek` is triton_models/deepseek with `scheduling` set to `mode`."""
    source = (MODEL_DIR / "configs" / "gpu.pbtxt" if gpu else MODEL_DIR / "config.pbtxt").read_text()
    config = re.sub(r'(key: "scheduling" value: \{ string_value: )"\w+"', rf'\1"{mode.rstrip("0")}"', source)
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
    """A random DeepSeek-V3 big enough that a decode step is compute-bound on a CPU (about 17M parameters)."""
    import torch
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    config = DeepseekV3Config(
        vocab_size=len(tok), hidden_size=512, intermediate_size=1536, moe_intermediate_size=384,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)   # decisive greedy choices, as in the tiny checkpoint
    model.save_pretrained(str(out), safe_serialization=True)
    model.generation_config.save_pretrained(str(out))
    return out


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


async def send(session: aiohttp.ClientSession, url: str, headers: dict[str, str], at: float, start: float,
               prompt: str, max_tokens: int) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    sent = time.perf_counter()
    # ignore_eos is not a model input: "tell me everything" prompts run to max_tokens on these checkpoints.
    async with session.post(url + "/v2/models/deepseek/generate", headers=headers,
                            json={"text_input": prompt, "max_tokens": max_tokens}) as r:
        body = await r.json(content_type=None)
        ok = r.status == 200
    return {"ok": ok, "latency": time.perf_counter() - sent, "max_tokens": max_tokens,
            "tokens": body.get("output_tokens", 0) if ok else 0, "error": None if ok else body}


def ttft(metrics_url: str) -> tuple[float, float, list[tuple[float, float]]]:
    """The model's TTFT histogram: (sum, count, cumulative buckets)."""
    with urllib.request.urlopen(metrics_url) as r:
        fams = text_string_to_metric_families(r.read().decode())
    s = c = 0.0
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
    return s, c, sorted(buckets)


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


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_workload(url: str, headers: dict[str, str], metrics_url: str,
                       plan: list[tuple[float, str, int]], short: int) -> dict[str, Any]:
    before = ttft(metrics_url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(send(session, url, headers, at, start, p, n) for at, p, n in plan))
        total = time.perf_counter() - start
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
            f"{'spread':>6} fail")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["m"]
        lines.append(f"{r['checkpoint']:<8} {r['workload']:<8} {r['path']:<9} {r['mode']:<9} {fmt(m['total_s']):>9} "
                     f"{fmt(m['tokens_per_s'], False):>8} {fmt(m['ttft_mean_s']):>9} {fmt(m['ttft_p50_s']):>9} "
                     f"{fmt(m['short_p50_s']):>9} {fmt(m['short_p95_s']):>9} {fmt(m['long_p50_s']):>9} "
                     f"{fmt(m['long_p95_s']):>9} {m.get('spread', 0) * 100:>5.0f}% {m['failed']}")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> str:
    by = {(r["checkpoint"], r["workload"], r["path"], r["mode"]): r["m"] for r in rows}
    lines = ["", "in-flight vs static (same checkpoint, workload, path):"]
    verdicts = []
    for (ck, wl, path, mode), s in by.items():
        if mode != "static":
            continue
        if (ck, wl, path, NO_WINDOW) in by:   # printed only: the targets are the engine's, as configured
            f = by[(ck, wl, path, NO_WINDOW)]
            short = (s["short_p50_s"] / f["short_p50_s"]) if f["short_p50_s"] else None
            thr = f["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else None
            lines.append(f"  {ck:<6} {wl:<8} {path:<9} short p50 {short or 0:.1f}x lower, throughput {thr or 0:.2f}x"
                         f"  (admit_wait_ms 0)")
        if (ck, wl, path, "inflight") not in by:
            continue
        f = by[(ck, wl, path, "inflight")]
        short = (s["short_p50_s"] / f["short_p50_s"]) if f["short_p50_s"] else None
        thr = f["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else None
        lines.append(f"  {ck:<6} {wl:<8} {path:<9} short p50 {short or 0:.1f}x lower, throughput {thr or 0:.2f}x")
        if thr is not None:
            verdicts.append(f"throughput not lower ({ck} {wl} {path}): {'MET' if thr >= 0.95 else 'MISSED'} "
                            f"({thr:.2f}x; 5% noise allowed)")
        if wl == "burst" and ck == "tiny" and short is not None:
            verdicts.append(f"short p50 >= 10x lower ({ck} burst {path}): {'MET' if short >= 10 else 'MISSED'} "
                            f"({short:.1f}x)")
        if wl == "burst" and ck == "large" and thr is not None:
            verdicts.append(f">= 1.5x throughput (large burst {path}): {'MET' if thr >= 1.5 else 'MISSED'} ({thr:.2f}x)")
    return "\n".join(lines + ["", "targets:"] + [f"  {v}" for v in verdicts])


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--large", action="store_true", help="also the compute-bound checkpoint")
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--poisson", type=int, default=64)
    p.add_argument("--gap-ms", type=float, default=17.0)
    p.add_argument("--short", type=int, default=4)
    p.add_argument("--long", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="runs of each workload per path; medians reported")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--no-seekgate", action="store_true", help="Triton directly only")
    p.add_argument("--no-window-too", action="store_true",
                   help=f"also run the engine with admit_wait_ms 0 (mode {NO_WINDOW}), side by side")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = has_gpu() if args.device == "auto" else args.device == "gpu"
    from proxy.local.tinymodel import build_tiny_checkpoint

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="seekgate-batching-") as tmp:
        root = Path(tmp)
        checkpoints = {"tiny": build_tiny_checkpoint(root / "ck-tiny", seed=0)}
        if args.large:
            checkpoints["large"] = build_large_checkpoint(root / "ck-large", checkpoints["tiny"])
        for ck_name, ck in checkpoints.items():
            for mode in ("static", "inflight") + ((NO_WINDOW,) if args.no_window_too else ()):
                triton = start_triton(repository(root / ck_name, mode, gpu), root / ck_name / f"data-{mode}", ck)
                gw = None
                try:
                    paths = {"triton": (triton.http_url, {})}
                    if not args.no_seekgate:
                        config = stack.seekgate_config(root / ck_name / f"gw-{mode}", stack.upstream_of(triton))
                        key = issue_key(config)
                        gw = stack.start_seekgate(config)
                        paths["seekgate"] = (gw.url, {"Authorization": f"Bearer {key}"})
                    metrics_url = f"http://127.0.0.1:{triton.launch.metrics_port}/metrics"
                    # Warm-up: one full burst, thrown away. A 4-request warm-up left the first
                    # full-size batch paying torch's first-use costs (a 14 s static burst, once).
                    warm = workload("burst", args.burst, args.short, args.long, 0)
                    stack.run_loop(run_workload(triton.http_url, {}, metrics_url, warm, args.short))
                    for wl, n in (("burst", args.burst), ("poisson", args.poisson)):
                        plan = workload(wl, n, args.short, args.long, args.gap_ms)
                        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
                        for _ in range(args.rounds):   # paths take turns, so drifting load hits both
                            for path, (url, headers) in paths.items():
                                runs[path].append(stack.run_loop(run_workload(url, headers, metrics_url, plan,
                                                                              args.short)))
                        for path, ms in runs.items():
                            row = {"checkpoint": ck_name, "workload": wl, "path": path, "mode": mode,
                                   "m": median_of(ms), "rounds": ms}
                            rows.append(row)
                            print(table([row]).splitlines()[-1], flush=True)
                finally:
                    if gw is not None:
                        gw.stop()
                    triton.stop()
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
